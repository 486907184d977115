"""`meshc schedule`: the step x rank table, its summary, its errors and the `--run` hook."""

import sys
import types

import pytest
from meshc.cli import main
from meshc.schedules import build_schedule

pytestmark = pytest.mark.timeout(60)


def test_1f1b_table(capsys):
    assert main(["schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("time"))
    assert lines[head].split() == ["time", "rank", "0", "rank", "1", "rank", "2", "rank", "3"]
    assert lines[head + 1].split() == ["0", "F0.0", ".", ".", "."]
    assert lines[head + 4].split() == ["3", "F0.3", "F1.2", "F2.1", "F3.0"]
    assert lines[head + 5].split() == ["4", ".", ".", ".", "B3.0"]
    for s in range(4):
        for m in range(8):
            assert f"F{s}.{m}" in out and f"B{s}.{m}" in out
    assert "overall 27.3%" in out  # (p-1)/(m+p-1) = 3/11
    assert "r0 4  r1 3  r2 2  r3 1" in out and "makespan 33" in out


def test_interleaved_and_zero_bubble(capsys):
    assert main(["schedule", "--schedule", "interleaved-1f1b", "--pp", "2", "--microbatches", "4",
                 "--virtual", "2"]) == 0
    out = capsys.readouterr().out
    assert "F3.3" in out and "B0.3" in out and "virtual=2" in out
    assert main(["schedule", "--schedule", "zb-h1", "--pp", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert "I0.7" in out and "W0.7" in out and "overall 11.1%" in out  # (p-1)/(3m+p-1) = 3/27


def test_default_microbatches_and_p2p(capsys):
    assert main(["schedule", "--pp", "2", "--p2p", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "microbatches=4" in out and "1.5" in out and "p2p transfer 0.5" in out


@pytest.mark.parametrize("argv,match", [
    (["--schedule", "interleaved-1f1b", "--pp", "4", "--microbatches", "6", "--virtual", "2"],
     "needs microbatches to be a multiple of pp=4; got 6: use 4, 8, 12"),
    (["--schedule", "gpipe", "--pp", "2", "--virtual", "2"], "virtual=2 is only for interleaved-1f1b"),
    (["--schedule", "pipedream", "--pp", "2"], "unknown schedule 'pipedream'"),
    (["--pp", "0"], "pp must be a positive integer"),
])
def test_errors_exit_2_with_the_cause(argv, match, capsys):
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshc: error:") and match in err


def test_run_hook_calls_the_runtime(monkeypatch, capsys):
    seen = {}

    def cli_run(args, schedule):
        seen.update(model=args.run, trace=args.trace, schedule=schedule)
        return 0

    monkeypatch.setitem(sys.modules, "meshc.runtime.pipeline_trace",
                        types.SimpleNamespace(cli_run=cli_run))
    assert main(["schedule", "--pp", "2", "--microbatches", "3", "--run", "llama-tiny", "--trace", "t.json"]) == 0
    assert seen == {"model": "llama-tiny", "trace": "t.json", "schedule": build_schedule("1f1b", 2, 3)}


def test_run_without_the_runtime_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "meshc.runtime.pipeline_trace", None)
    assert main(["schedule", "--pp", "2", "--run", "llama-tiny"]) == 2
    assert "drop --run to see the predicted table" in capsys.readouterr().err
