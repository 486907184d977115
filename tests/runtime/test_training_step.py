"""The training-step Program (`meshc.training_step`): `meshc show --training` prints the graph
`train_step` executes on each rank; the `bucket_gradients` pass makes one dp all-reduce per bucket
of at most bucket_mb; zero=3's all-gathers are prefetched one layer ahead in the step graph."""

from __future__ import annotations

import argparse

import pytest
import torch

HEADER = "# loss: causal-LM cross-entropy of the shifted logits"


def _show(capsys, *argv: str) -> tuple[str, str]:
    """(the header comment lines, the code) that `meshc show ... --training` prints."""
    from meshc.cli import main

    capsys.readouterr()
    assert main(["show", *argv, "--training"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = [ln for ln in lines[:3] if ln.startswith("#")]
    return "\n".join(head), "\n".join(lines[len(head):])


def _step_codes(device_mesh, stages: list[int]) -> dict:
    """Every rank: compile llama-tiny as the CLI's defaults (batch 2, seq 16) for each stage, run one
    train_step with the causal-LM loss; the loss and the code of the step Program it ran."""
    import meshc
    from meshc.models import load_model
    from meshc.training_step import causal_lm_loss

    torch.set_num_threads(1)
    out = {}
    for stage in stages:
        loaded = load_model("llama-tiny", batch=2, seq=16)
        compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                                 example_kwargs=loaded.example_kwargs, training=True, zero=stage, backend="aten")
        ids = loaded.example_inputs[0]
        loss = compiled.train_step(loaded.example_inputs, ids, causal_lm_loss, loaded.example_kwargs)
        ran = compiled.trainer._programs  # the one Program train_step traced and ran
        assert len(ran) == 1
        out[stage] = (float(loss), next(iter(ran.values())).code())
    return out


@pytest.mark.timeout(300)
def test_meshc_show_training_prints_the_step_train_step_runs(capsys):
    from meshc.runtime import launch

    per_rank = launch(_step_codes, "dp=2", [1, 3], timeout=240)
    for stage in (1, 3):
        header, code = _show(capsys, "llama-tiny", "--mesh", "dp=2", "--zero", str(stage))
        assert HEADER in header and f"zero={stage}" in header, header
        assert per_rank[0][stage][1] == code  # rank 0's executed step is what show prints for rank 0
        assert per_rank[0][stage][0] == per_rank[1][stage][0]  # the whole batch's loss on every rank
        assert 5.5 < per_rank[0][stage][0] < 7.0  # about ln(512) for an untrained 512-token LM
        if stage == 3:  # prefetch: layer 1's parameters are gathered before layer 0's first matmul
            assert _layer_gathers(code)[1] < code.index("aten.mm.default("), code


def _layer_gathers(code: str) -> list[int]:
    """Where each decoder layer's parameter bucket is all-gathered (the gathers of the size most of them have)."""
    lines = [ln for ln in code.splitlines() if "all_gather_into_tensor.default(" in ln]
    shapes = [ln.split('"')[1] for ln in lines]
    common = max(set(shapes), key=shapes.count)
    assert shapes.count(common) == 4, lines  # llama-tiny's 4 layers
    return [code.index(ln) for ln, shape in zip(lines, shapes) if shape == common]


def test_without_prefetch_the_next_layer_is_gathered_later(capsys):
    """The control of the prefetch check above: with prefetch=0, layer 1 is gathered after layer 0's matmuls."""
    pipeline = "dce,auto_shard,spmd_partition,differentiable_collectives,zero(stage=3,prefetch=0),lint"
    _, code = _show(capsys, "llama-tiny", "--mesh", "dp=2", "--pipeline", pipeline)
    assert _layer_gathers(code)[1] > code.index("aten.mm.default("), code


def _step_programs(pipeline: str) -> tuple[list[str], list]:
    from meshc.cli import _programs_by_step

    args = argparse.Namespace(model="llama-tiny", mesh="dp=2", pipeline=pipeline, plan="auto", schedule="1f1b",
                              batch=2, seq=16, static=False, zero=None, training=True)
    _, manager, programs = _programs_by_step(args)
    return [c.name for c in manager.calls], programs


def _dp_all_reduces(program) -> list[int]:
    """The element count of every dp all-reduce in the step graph, in order."""
    target = torch.ops._c10d_functional.all_reduce.default
    return [n.meta["val"].numel() for n in program.graph.nodes if n.target is target and n.args[2] == "dp@dp=2"]


@pytest.mark.timeout(200)
def test_bucket_gradients_makes_one_all_reduce_per_bucket():
    base = "dce,auto_shard,spmd_partition,differentiable_collectives,zero(stage=1,bucket_mb={}),lint"
    names, programs = _step_programs(base.format(1))
    traced = programs[names.index("training_step") + 1]
    bucketed = programs[names.index("bucket_gradients") + 1]
    per_param = _dp_all_reduces(traced)
    assert len(per_param) == 39  # llama-tiny's trained tensors, one all-reduce each before the pass
    expected, size = [[]], 0  # consecutive gradients, at most 1 MB a bucket (a larger one alone)
    for n in per_param:
        if expected[-1] and size + 4 * n > 2**20:
            expected.append([])
            size = 0
        expected[-1].append(n)
        size += 4 * n
    assert _dp_all_reduces(bucketed) == [sum(b) for b in expected]
    assert 3 < len(expected) < 39
    assert "bucket_gradients: 39 dp gradient all-reduces in" in "\n".join(bucketed.notes)
    names, programs = _step_programs(base.format(0))  # bucket_mb=0: no buckets, one per parameter
    assert "bucket_gradients" not in names and len(_dp_all_reduces(programs[-1])) == 39
