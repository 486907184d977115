"""Measured pipeline timelines: idle fractions, the Chrome trace and the report of a known
timeline, and `meshc schedule --run` end to end on a 2-process gloo mesh."""

import pytest


def test_idle_fractions_and_chrome_trace_of_a_known_timeline():
    from meshc.runtime.pipeline_trace import chrome_trace, idle_fractions, report
    from meshc.schedules import build_schedule

    ev = lambda r, op, s, mb, a, b, w=0.0: {"op": op, "stage": s, "mb": mb, "start": a, "end": b, "wait": w,
                                            "rank": r, "pp_rank": r}
    traces = [[ev(0, "F", 0, 0, 0, 1), ev(0, "B", 0, 0, 3, 5, w=1.0)],  # rank 0 waits 1 s inside its B
              [ev(1, "F", 1, 0, 1, 2), ev(1, "B", 1, 0, 2, 4)]]
    assert idle_fractions(traces) == pytest.approx([1 - 2 / 5, 1 - 3 / 5])
    events = chrome_trace(traces)["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in slices] == ["F0.0", "B0.0", "recv wait", "F1.0", "B1.0"]
    assert slices[1]["ts"] == 3e6 and slices[1]["dur"] == 2e6 and slices[2]["dur"] == 1e6
    text = report(build_schedule("gpipe", 2, 1), traces, {0: 0.5, 1: 1.5})
    assert "500.00" in text.splitlines()[1] and "measured r0 60.0%  r1 40.0%" in text


@pytest.mark.timeout(180)
def test_meshc_schedule_run_writes_a_trace(tmp_path, capsys):
    import json

    from meshc.cli import main

    trace = tmp_path / "trace.json"
    assert main(["schedule", "--pp", "2", "--schedule", "1f1b", "--microbatches", "2", "--run", "mlp",
                 "--batch", "4", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "measured F ms" in out and "idle fraction per rank: measured r0" in out
    names = {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"}
    assert {f"{op}{s}.{m}" for op in "FB" for s in (0, 1) for m in (0, 1)} <= names
