"""The one resolver (`meshc.pipeline.resolve`): `meshc compile/show/kernels/run` and
`meshc.compile` run the same passes with the same plan on a tp mesh, and on a pp mesh the default
number of micro-batches divides the example batch (a batch of 2 used to get 4 micro-batches and
fail at the first call)."""

from __future__ import annotations

import re

import pytest
import torch
from meshc.pipeline import default_microbatches, resolve

from ..capture_once import capture_once

PLAN_NOTE = re.compile(r"spmd_partition: plan '(\w+)' \(hash ([0-9a-f]{16})\) on mesh 'tp=2', rank 0")
TIMINGS_ROW = re.compile(r"^\d+\s+(\S+)\s+[\d.]+\s+\d+\s+\d+\s+(?:yes|no)\s*$", re.M)


@pytest.fixture
def recorded(monkeypatch):
    """Every pipeline a PassManager is built with in this process (the CLI builds them as meshc.PassManager)."""
    import meshc

    seen: list[str] = []

    class Recording(meshc.PassManager):
        def __init__(self, pipeline, instruments=()):
            super().__init__(pipeline, instruments)
            seen.append(str(self))

    monkeypatch.setattr(meshc, "PassManager", Recording)
    return seen


def _cli(capsys, *argv: str) -> str:
    from meshc.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def captures():
    """llama-tiny is captured once (tests/capture_once.py): the CLI commands here differ after capture."""
    with capture_once() as memo:
        yield memo


@pytest.fixture(scope="module")
def cli_compile_tp2(captures):
    """`meshc compile llama-tiny --mesh tp=2` (rank 0, no processes): its output, run once."""
    import contextlib
    import io

    from meshc.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["compile", "llama-tiny", "--mesh", "tp=2"]) == 0
    return buf.getvalue()


def test_resolver_defaults():
    assert resolve("tp=2").pipeline == "dce,auto_shard,spmd_partition,lint"
    assert resolve("tp=2", plan="megatron").pipeline == "dce,spmd_partition,lint"
    assert resolve("tp=2", pipeline="dce,lint").pipeline == "dce,lint"
    # pp: the most micro-batches, up to 2 per stage, that divide the batch (of each dp replica)
    assert resolve("pp=2", batch=2).schedule.microbatches == 2
    assert resolve("pp=2", batch=3).schedule.microbatches == 3
    assert resolve("pp=2", batch=8).schedule.microbatches == 4
    assert resolve("pp=2").schedule.microbatches == 4  # batch unknown: 2 per stage
    assert resolve("dp=2,pp=2", batch=2).schedule.microbatches == 1
    assert "microbatches=2" in resolve("pp=2", batch=2).pipeline
    for stages in (1, 2, 3, 4):
        for batch in range(1, 13):
            m = default_microbatches(stages, batch)
            assert batch % m == 0 and 1 <= m <= 2 * stages


@pytest.mark.timeout(180)
def test_cli_compile_show_kernels_run_the_resolved_pipeline(cli_compile_tp2, captures, recorded, capsys):
    want = resolve("tp=2").pipeline
    assert f"pipeline: {want}\n" in cli_compile_tp2
    assert TIMINGS_ROW.findall(cli_compile_tp2) == want.split(",")
    captured = len(captures)
    _cli(capsys, "show", "llama-tiny", "--mesh", "tp=2", "--after", "spmd_partition")
    assert recorded == [want]
    pytest.importorskip("triton")
    _cli(capsys, "kernels", "llama-tiny", "--mesh", "tp=2")
    assert recorded == [want, want]
    assert len(captures) == captured  # show and kernels got the Program compile captured (captured once)


def _compile_tp2(device_mesh) -> dict:
    import meshc
    from meshc.models import load_model

    torch.set_num_threads(1)
    loaded = load_model("llama-tiny", batch=2, seq=16)  # the CLI's defaults
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs)
    with torch.no_grad():
        err = float((compiled(*loaded.example_inputs, **loaded.example_kwargs).logits
                     - loaded.model(*loaded.example_inputs, **loaded.example_kwargs).logits).abs().max())
    return {"hash": compiled.program.plan.hash(), "source": compiled.program.plan.source,
            "history": ",".join(compiled.program.history), "report": compiled.report, "err": err}


@pytest.mark.timeout(240)
def test_compile_under_launch_runs_the_cli_passes_with_the_cli_plan(cli_compile_tp2):
    import meshc

    (source, cli_hash), = PLAN_NOTE.findall(cli_compile_tp2)
    results = meshc.launch(_compile_tp2, "tp=2", timeout=120)
    want = resolve("tp=2").pipeline
    for r in results:
        assert r["history"] == want
        assert TIMINGS_ROW.findall(r["report"]) == want.split(",")
        assert r["err"] <= 1e-5
    rank0 = results[0]
    assert (rank0["source"], rank0["hash"]) == (source, cli_hash) == ("auto_shard", cli_hash)
    assert f"(hash {cli_hash}) on mesh 'tp=2', rank 0" in rank0["report"]
    assert results[1]["hash"] == cli_hash  # every rank compiles the same plan


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_meshc_run_runs_the_cli_passes_with_the_cli_plan(cli_compile_tp2, capsys):
    (_, cli_hash), = PLAN_NOTE.findall(cli_compile_tp2)
    out = _cli(capsys, "run", "llama-tiny", "--mesh", "tp=2", "--iters", "1", "--timeout", "120")
    report = out.split("rank 0's compile:", 1)[1]
    assert TIMINGS_ROW.findall(report) == resolve("tp=2").pipeline.split(",")
    assert PLAN_NOTE.findall(report) == [("auto_shard", cli_hash)]
    assert "FAILED" not in out


def _pp2_batch2(device_mesh) -> tuple:
    import meshc
    from meshc.models import load_model

    torch.set_num_threads(1)
    loaded = load_model("llama-tiny", batch=2, seq=8)
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs)  # microbatches: the default
    with torch.no_grad():
        out = compiled(*loaded.example_inputs, **loaded.example_kwargs).logits
        ref = loaded.model(*loaded.example_inputs, **loaded.example_kwargs).logits
    return compiled.schedule.microbatches, tuple(out.shape) == tuple(ref.shape), float((out - ref).abs().max())


@pytest.mark.slow  # ~35 s; tests/runtime/test_staged_programs.py runs the same case (batch 2, pp=2) unmarked
@pytest.mark.timeout(240)
def test_pp2_with_a_batch_of_two_compiles_and_runs():
    import meshc

    results = meshc.launch(_pp2_batch2, "pp=2", timeout=120)
    for microbatches, same_shape, err in results:
        assert microbatches == 2 and same_shape and err <= 1e-5, results
