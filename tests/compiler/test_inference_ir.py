"""meshc.inference_ir: the local rewrite gives the graph `run_decompositions({})` gives — the same ops
(size arithmetic and metadata asserts aside), the same inputs and outputs, the same values at two
shapes — and anything it does not cover takes torch's retrace."""

from collections import Counter

import pytest
import torch
from meshc.capture import _auto_dynamic
from meshc.families import FAMILIES
from meshc.inference_ir import to_inference_ir
from meshc.models import load_model

_IGNORED = {"aten.sym_size.int", "aten._assert_tensor_metadata.default"}


def _ops(ep) -> Counter:
    return Counter(str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and str(n.target) not in _IGNORED)


def _export(model, args, kwargs=None, dynamic=True):
    shapes = _auto_dynamic(model, args, kwargs or {}) if dynamic else None
    return torch.export.export(model, args, kwargs=kwargs or {}, dynamic_shapes=shapes, strict=False)


def _same_as_retrace(model, args, kwargs=None, more_args=()) -> torch.export.ExportedProgram:
    """Rewrite one export, retrace another; check they agree; return the rewritten one."""
    retraced = _export(model, args, kwargs).run_decompositions({})
    ep = _export(model, args, kwargs)
    rewritten = to_inference_ir(ep)
    assert rewritten is ep, "the local rewrite did not apply"
    assert _ops(rewritten) == _ops(retraced)
    # the same inputs; the retrace may order a model's constants and buffers differently (Falcon's)
    specs = lambda e: sorted((s.kind.name, s.arg.name) for s in e.graph_signature.input_specs)  # noqa: E731
    assert specs(rewritten) == specs(retraced)
    assert rewritten.graph_signature.user_inputs == retraced.graph_signature.user_inputs
    with torch.no_grad():
        for inputs in (args, *more_args):
            want, got = retraced.module()(*inputs, **(kwargs or {})), rewritten.module()(*inputs, **(kwargs or {}))
            for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
                assert torch.equal(w, g)
    return rewritten


# --------------------------------------------------------------------------- each rule, on a small module


class Rules(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):  # x: [batch, seq, 8]
        h = self.drop(self.proj(x)).to(torch.float32)  # dropout (eval) -> clone; same-dtype to -> nothing
        a, b = h.chunk(2, dim=-1)  # -> split.Tensor
        batch, seq = x.shape[0], x.shape[1]
        heads = a.reshape(batch, seq, 2, 4).transpose(1, 2)  # contiguous input -> view
        same = heads.reshape(batch, -1, seq, 4)  # strides allow a view: view, -1 resolved to 2
        flat = heads.reshape(batch, 2, seq * 4)  # they do not: clone + _unsafe_view
        merged = heads.transpose(1, 2).contiguous().flatten(-2)  # contiguous -> clone; flatten -> view
        return flat.sum(-1).to(torch.float64), merged + b, same  # a dtype change -> _to_copy


def test_every_rule_matches_the_retrace():
    args = (torch.randn(2, 3, 8),)
    ep = _same_as_retrace(Rules().eval(), args, more_args=[(torch.randn(3, 5, 8),)])
    ops = _ops(ep)
    assert ops["aten.split.Tensor"] == 1 and ops["aten._unsafe_view.default"] == 1 and ops["aten._to_copy.default"] == 1
    assert not {"aten.reshape.default", "aten.chunk.default", "aten.dropout.default", "aten.contiguous.default",
                "aten.flatten.using_ints", "aten.to.dtype"} & set(ops)


class InPlace(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        z = y.transpose(0, 1)
        y.add_(1)  # z reads y's storage: functionalization must rewrite z too
        return y, z


class FreshInPlace(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        y.mul_(3)  # nothing else reads y: mul
        y.add_(x.to(torch.float32))  # its argument is itself rewritten (a same-dtype to: gone) first
        return y.T


def test_in_place_op_on_a_fresh_tensor_matches_the_retrace():
    ops = _ops(_same_as_retrace(FreshInPlace(), (torch.randn(2, 3),), more_args=[(torch.randn(4, 5),)]))
    assert ops["aten.mul.Tensor"] == 2 and ops["aten.add.Tensor"] == 1 and ops["aten.permute.default"] == 1
    assert not {"aten.mul_.Tensor", "aten.add_.Tensor", "aten.to.dtype"} & set(ops)


class SymbolicFill(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], -1)  # -1 is 8 * seq: no node holds it


@pytest.mark.parametrize("model", [InPlace(), Rules().train(), SymbolicFill()],
                         ids=["in-place op", "dropout in training", "a -1 for a size no node holds"])
def test_what_the_rewrite_does_not_cover_takes_the_retrace(model):
    args = (torch.randn(2, 3, 8),)
    ep = _export(model, args)
    out = to_inference_ir(ep)
    assert out is not ep
    assert not {"aten.add_.Tensor", "aten.dropout.default", "aten.reshape.default"} & set(_ops(out))
    # (the in-place case: y has two users, the view z and add_)


# --------------------------------------------------------------------------- real models

#: by default: ALiBi's -1 that an input size's node holds; contiguous + chunk; an in-place add, numpy_T and
#: lifted constants (the rest under -m slow;
#: every compile in the suite goes through the rewrite and is checked against eager besides)
_DEFAULT = {"bloom-tiny", "phi3-tiny", "falcon-tiny"}
_MODELS = ["llama-tiny", "gpt2-tiny", "reference-lm", *FAMILIES]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in _DEFAULT else [pytest.mark.slow]) for n in _MODELS])
def test_decoders_match_the_retrace(name):
    loaded = load_model(name, batch=2, seq=8)
    config = getattr(loaded.model, "config", None)
    kwargs = {**(loaded.example_kwargs or {}), **({"use_cache": False} if getattr(config, "use_cache", False) else {})}
    _same_as_retrace(loaded.model, loaded.example_inputs, kwargs, more_args=[loaded.inputs_at(3, 13)])
