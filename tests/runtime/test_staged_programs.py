"""Pipelined Programs are printable and are what runs: `meshc show --after split_stages` prints
every stage, `--after differentiable_collectives` shows the tp all-reduces as differentiable
calls, each pp rank executes exactly the stage graph `meshc show ... --after lint` prints, and
the Triton backend lowers every stage (inference equals eager; training says it cannot)."""

from __future__ import annotations

import pytest
import torch

from ..capture_once import capture_once

STAGE_HEADER = "# ---- stage "


@pytest.fixture(scope="module")
def captures():
    """Each (model, mesh) is captured once (tests/capture_once.py): the `meshc show` calls differ after capture."""
    with capture_once() as memo:
        yield memo


@pytest.fixture
def shown(monkeypatch, capsys, captures):
    """Run `meshc show ...`; return its printed output and the Program after every step that
    the command itself computed (0 = captured), so stage Programs can be compared by their code."""
    import meshc.cli

    kept = {}
    real = meshc.cli._programs_by_step

    def keep(args):
        loaded, manager, programs = real(args)
        kept["names"], kept["programs"], kept["pipeline"] = [c.name for c in manager.calls], programs, str(manager)
        return loaded, manager, programs

    monkeypatch.setattr(meshc.cli, "_programs_by_step", keep)

    def run(*argv: str):
        capsys.readouterr()
        assert meshc.cli.main(["show", *argv]) == 0
        return capsys.readouterr().out, kept["names"], kept["programs"]

    run.pipeline = lambda: kept["pipeline"]
    return run


def _stage_sections(text: str) -> list[str]:
    parts = text.split(STAGE_HEADER)
    assert parts[0].strip() == "", parts[0][:200]
    return [STAGE_HEADER + p for p in parts[1:]]


@pytest.mark.timeout(120)
def test_show_after_split_stages_prints_every_stage(shown):
    out, names, programs = shown("llama-tiny", "--mesh", "pp=2", "--after", "split_stages")
    sections = _stage_sections(out)
    assert [s.splitlines()[0].split(":")[0] for s in sections] == [
        "# ---- stage 0 on pipeline rank 0", "# ---- stage 1 on pipeline rank 1"]
    split = programs[names.index("split_stages") + 1]
    assert len(split.split.stages) == 2
    for section, stage in zip(sections, split.split.stages):
        assert "def forward" in section and len(stage.program.graph.nodes) > 10
    assert "sends the model outputs" in sections[1] and "receives -" in sections[0]


@pytest.mark.timeout(120)
def test_show_after_differentiable_collectives_on_pp_tp(shown):
    out, names, programs = shown("llama-tiny", "--mesh", "pp=2,tp=2", "--after", "differentiable_collectives")
    assert len(_stage_sections(out)) == 2
    assert "wait_tensor" not in out
    assert "differentiable_all_reduce" in out
    assert "tp@pp=2,tp=2" in out  # the group is named by mesh dim, bound by the runtime
    before = programs[names.index("differentiable_collectives")]  # after split_stages: functional collectives
    assert "wait_tensor" in before.code() and "differentiable_all_reduce" not in before.code()


def _stage_codes(device_mesh) -> dict:
    import meshc
    from meshc.models import load_model

    loaded = load_model("llama-tiny", batch=2, seq=16)  # the CLI's defaults
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs, backend="aten")
    with torch.no_grad():
        out = compiled(*loaded.example_inputs, **loaded.example_kwargs).logits
        ref = loaded.model(*loaded.example_inputs, **loaded.example_kwargs).logits
    return {"codes": {s: run.gm.code for s, run in compiled._run.items()}, "backend": compiled.backend,
            "history": ",".join(compiled.program.history), "err": float((out - ref).abs().max()),
            "microbatches": compiled.schedule.microbatches}


def _triton_pipeline(device_mesh) -> dict:
    import meshc
    from meshc.errors import MeshcError
    from meshc.models import load_model

    loaded = load_model("llama-tiny", batch=2, seq=4)
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs, backend="triton")
    with torch.no_grad():
        out = compiled(*loaded.example_inputs, **loaded.example_kwargs).logits
        ref = loaded.model(*loaded.example_inputs, **loaded.example_kwargs).logits
    kernels = {s: len(run.kernels) for s, run in compiled._run.items()}
    try:
        ids = loaded.example_inputs[0]
        compiled.train_step((ids,), ids, lambda o, t: o.logits.float().mean(), loaded.example_kwargs)
        error = None
    except MeshcError as e:
        error = str(e)
    return {"backend": compiled.backend, "kernels": kernels, "err": float((out - ref).abs().max()),
            "shape": tuple(out.shape) == tuple(ref.shape), "train_error": error}


def _aten_and_triton(device_mesh, triton: bool) -> dict:
    """Both pp=2 compiles on one launch (one start of the ranks): the aten backend's, whose stage
    graphs are compared with `meshc show`, and the Triton backend's (when Triton is installed)."""
    torch.set_num_threads(1)
    return {"aten": _stage_codes(device_mesh), "triton": _triton_pipeline(device_mesh) if triton else None}


@pytest.fixture(scope="module")
def pp2_ranks() -> list[dict]:
    """Every pp=2 rank's results of `_aten_and_triton`, run once for this module."""
    import importlib.util

    import meshc

    return meshc.launch(_aten_and_triton, "pp=2", importlib.util.find_spec("triton") is not None, timeout=240)


@pytest.mark.timeout(300)
def test_each_pp_rank_runs_the_stage_graph_meshc_show_prints(pp2_ranks, shown):
    results = [r["aten"] for r in pp2_ranks]
    out, names, programs = shown("llama-tiny", "--mesh", "pp=2", "--after", "lint")
    final = programs[-1]
    assert out == final.code() + "\n"  # what was printed is this Program
    assert ",".join(final.history) == shown.pipeline() and len(final.history) == len(names)
    stages = [st.program.gm.code for st in final.split.stages]
    assert len(stages) == 2 and stages[0] != stages[1]
    for rank, r in enumerate(results):
        # a batch of 2 gets 2 micro-batches (it used to get 4 and fail at the first call)
        assert r["backend"] == "aten" and r["microbatches"] == 2 and r["err"] <= 1e-5
        assert r["history"] == ",".join(final.history)  # the same passes, with the same options
        assert list(r["codes"]) == [rank]  # 1f1b on pp=2: stage r on pp rank r
        assert r["codes"][rank] == stages[rank], f"pp rank {rank} runs another graph than `meshc show` prints"


@pytest.mark.timeout(300)
def test_triton_backend_lowers_every_stage_and_refuses_training(pp2_ranks):
    pytest.importorskip("triton")
    for rank, r in enumerate(r["triton"] for r in pp2_ranks):
        assert r["backend"] == "triton", r
        assert list(r["kernels"]) == [rank] and r["kernels"][rank] > 0, r
        assert r["shape"] and r["err"] <= 1e-4, r
        assert r["train_error"] is not None and "no backward kernels" in r["train_error"], r
