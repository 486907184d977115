"""The ATen backend runs the Program's graph with each call spelled the cheap way (FAST_CALLS):
every entry must compute exactly what its ATen overload computes, on the same arguments."""

import pytest
import torch
from meshc.backends.aten import FAST_CALLS, fast_calls, lower

aten = torch.ops.aten


def _samples() -> dict:
    """Per FAST_CALLS entry: (args, kwargs) in the overload's schema, exercising its options."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, y = r(2, 3, 4), r(2, 3, 4)
    mask = torch.zeros(1, 1, 3, 5).masked_fill(torch.eye(3, 5) > 0, -1e9)
    return {
        aten.add.Tensor: ((x, y), {"alpha": 2}), aten.sub.Tensor: ((x, y), {}), aten.mul.Tensor: ((x, 1.5), {}),
        aten.div.Tensor: ((x, y), {}), aten.neg.default: ((x,), {}), aten.pow.Tensor_Scalar: ((x, 2), {}),
        aten.rsqrt.default: ((x.abs() + 1,), {}), aten.sqrt.default: ((x.abs(),), {}), aten.exp.default: ((x,), {}),
        aten.sin.default: ((x,), {}), aten.cos.default: ((x,), {}), aten.tanh.default: ((x,), {}),
        aten.sigmoid.default: ((x,), {}), aten.erf.default: ((x,), {}), aten.where.self: ((x > 0, x, y), {}),
        aten.mean.dim: ((x, [-1], True), {}), aten.sum.dim_IntList: ((x, [1], False), {"dtype": torch.float64}),
        aten.softmax.int: ((x, -1), {}), aten.view.default: ((x, [6, 4]), {}),
        aten.reshape.default: ((x.transpose(0, 1), [12, 2]), {}), aten.transpose.int: ((x, 0, 2), {}),
        aten.permute.default: ((x, [2, 0, 1]), {}), aten.t.default: ((r(3, 4),), {}),
        aten.unsqueeze.default: ((x, 1), {}), aten.squeeze.dim: ((r(2, 1, 3), 1), {}),
        aten.cat.default: (([x, y], -1), {}), aten.sym_size.int: ((x, 1), {}),
        aten.index_copy_.default: ((torch.zeros(2, 5, 4), 1, torch.tensor([0, 3]), r(2, 2, 4)), {}),
        aten.linear.default: ((x, r(5, 4), r(5)), {}), aten.mm.default: ((r(3, 4), r(4, 5)), {}),
        aten.bmm.default: ((r(2, 3, 4), r(2, 4, 5)), {}),
        aten.addmm.default: ((r(5), r(3, 4), r(4, 5)), {"beta": 0.5, "alpha": 2.0}),
        aten.silu.default: ((x,), {}), aten.gelu.default: ((x,), {"approximate": "tanh"}),
        aten.embedding.default: ((r(10, 4), torch.tensor([[1, 2], [3, 9]]), 2), {}),
        aten.layer_norm.default: ((x, [4], r(4), r(4), 1e-3), {}),
        aten.scaled_dot_product_attention.default: (
            (r(1, 2, 3, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), mask),
            {"scale": 0.3}),
    }


def _clone(args):
    return torch.utils._pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, list(args))


def test_every_fast_call_computes_what_its_aten_overload_computes():
    samples = _samples()
    assert set(samples) == set(FAST_CALLS), "every FAST_CALLS entry needs a sample here"
    for overload, (args, kwargs) in samples.items():
        a, b = _clone(args), _clone(args)
        want, got = overload(*a, **kwargs), FAST_CALLS[overload](*b, **kwargs)
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), overload
            assert torch.equal(got, want), overload
        else:
            assert got == want, overload
        assert all(torch.equal(p, q) for p, q in zip(a, b) if isinstance(p, torch.Tensor)), overload  # in-place writes


def test_the_lowered_program_runs_the_same_nodes_with_fast_calls_and_equal_outputs(llama):
    import meshc

    program = meshc.capture(llama.model, llama.example_inputs, llama.example_kwargs)
    lowered = lower(program)
    assert lowered.gm is program.gm  # what `meshc show` prints
    fast = fast_calls(program.gm)
    before = [n.op for n in program.graph.nodes]
    assert [n.op for n in fast.graph.nodes] == before
    assert not any(n.target in FAST_CALLS for n in fast.graph.nodes if n.op == "call_function")
    assert any(n.target in FAST_CALLS for n in program.graph.nodes if n.op == "call_function")  # untouched
    flat = program.bind_inputs(llama.example_inputs, llama.example_kwargs)
    with torch.no_grad():
        want = program.gm(*program.state_args(), *flat)
        got = lowered(flat)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("overload", [aten.add.Tensor, aten.view.default])
def test_a_fast_call_keeps_autograd(overload):
    args, kwargs = _samples()[overload]
    leaf = args[0].clone().requires_grad_(True)
    FAST_CALLS[overload](leaf, *args[1:], **kwargs).sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape
