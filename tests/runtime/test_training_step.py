"""The training-step Program (`meshc.training_step`): the `bucket_gradients` pass makes one dp
all-reduce per bucket of at most bucket_mb with the same values; under `-m slow`, `meshc show
--training` prints the step `train_step` runs at zero=1 and 3 (the default suite checks zero=3 in
`test_training.py`'s dp=2 launch) and zero=3's all-gathers are prefetched one layer ahead."""

from __future__ import annotations

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


@pytest.mark.slow  # the default suite compares zero=3 in test_training.py's dp=2 launch
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


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_without_prefetch_the_next_layer_is_gathered_later(capsys):
    """The control of the prefetch check above: with prefetch=0, layer 1 is gathered after layer 0's matmuls."""
    pipeline = "dce,auto_shard,spmd_partition,differentiable_collectives,zero(stage=3,prefetch=0),lint"
    _, code = _show(capsys, "llama-tiny", "--mesh", "dp=2", "--pipeline", pipeline)
    assert _layer_gathers(code)[1] > code.index("aten.mm.default("), code


def _mlp_step(bucket_mb: float):
    """Rank 0's dp=2 zero=1 MLP step (mse loss), no processes: the traced Program, then bucketed."""
    import meshc
    from meshc.models import load_model
    from meshc.pipeline import resolve
    from meshc.training import training_pipeline
    from meshc.training_step import step_pipeline, trace_training_step

    loaded = load_model("mlp", batch=4, seq=8)
    program = meshc.capture(loaded.model, loaded.example_inputs, mesh="dp=2")
    program.plan = "auto"
    pipeline = training_pipeline(resolve("dp=2").pipeline, program.mesh, 1).replace("zero(stage=1)",
                                                                                     f"zero(stage=1,bucket_mb={bucket_mb})")
    program = meshc.PassManager(pipeline).run(program)
    x = loaded.example_inputs[0]
    traced = trace_training_step(program, [x], x, torch.nn.functional.mse_loss)
    return traced, meshc.PassManager(step_pipeline(program)).run(traced), step_pipeline(program)


def _dp_all_reduces(program) -> list[int]:
    """The element count of every dp all-reduce in the step graph, in order."""
    target = torch.ops._c10d_functional.all_reduce.default
    return [n.meta["val"].numel() for n in program.graph.nodes if n.target is target and n.args[2] == "dp@dp=2"]


@pytest.mark.timeout(120)
def test_bucket_gradients_makes_one_all_reduce_per_bucket():
    traced, bucketed, pipeline = _mlp_step(0.1)
    assert pipeline == "bucket_gradients(bucket_mb=0.1),lint"
    per_param = _dp_all_reduces(traced)
    assert len(per_param) == 6  # the MLP's weights and biases, one all-reduce each before the pass
    expected, size = [[]], 0  # consecutive gradients, at most 0.1 MB a bucket (a larger one alone)
    for n in per_param:
        if expected[-1] and size + 4 * n > 0.1 * 2**20:
            expected.append([])
            size = 0
        expected[-1].append(n)
        size += 4 * n
    assert _dp_all_reduces(bucketed) == [sum(b) for b in expected]
    assert 1 < len(expected) < 6
    assert f"bucket_gradients: 6 dp gradient all-reduces in {len(expected)} buckets" in "\n".join(bucketed.notes)
    # each gradient output is its slice of its bucket's sum: the same values as the unbucketed step
    inputs = [torch.randn(v.meta["val"].shape) if v.meta["val"].is_floating_point() else v.meta["val"]
              for v in traced.placeholders()]
    with torch.no_grad(), _all_reduce_doubles():
        for got, want in zip(bucketed.gm(*inputs), traced.gm(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _all_reduce_doubles():
    """Run a rank's graph without a process group: each collective as if the other dp rank held the
    same values (all_reduce doubles, all_gather repeats, reduce_scatter keeps the doubled first block)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    c = torch.ops._c10d_functional

    class TwoEqualRanks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is c.all_reduce.default:
                return args[0] * 2
            if func is c.wait_tensor.default:
                return args[0]
            if func is c.all_gather_into_tensor.default:
                return torch.cat([args[0]] * args[1])
            if func is c.reduce_scatter_tensor.default:
                return args[0].chunk(args[2])[0] * args[2]
            return func(*args, **(kwargs or {}))

    return TwoEqualRanks()


@pytest.mark.parametrize("argv, match", [
    (["show", "mlp"], "meshc show needs --after PASS"),
    (["show", "mlp", "--mesh", "dp=2", "--training"], "the model is no causal LM"),
    (["show", "llama-tiny", "--mesh", "pp=2", "--training"], "use --after split_stages"),
])
def test_show_training_misuse_is_one_clear_line(argv, match, capsys):
    from meshc.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshc: error:") and match in err and "Traceback" not in err
