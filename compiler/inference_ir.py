"""torch.export's training IR to the inference IR that meshc compiles, by a local rewrite where one is exact.

Entry point: `to_inference_ir(ep)` -> the ExportedProgram to read: `ep` itself with its graph
rewritten in place, or the one `ep.run_decompositions({})` returns.

Why: `run_decompositions({})` traces the whole graph a second time (functionalization, fake
tensors, symbolic shapes), and with dynamic batch and sequence that costs more than the export
itself — on a 2-layer Hugging Face decoder about 2.3 s against 1.1 s, nearly all of it symbolic
shape arithmetic. On a graph with no higher-order op (grad mode, autocast) and no mutation of
anything but fresh intermediates, all that second trace changes is small: the composite
(CompositeImplicitAutograd) ops torch does not preserve are replaced by their decompositions, in-place
ops become functional, and dead code goes. The ops decoders use have
short, exact decompositions, emitted here as torch emits them:

    to.* (no change)            -> (its input)          to.* (a change)   -> _to_copy
    dropout(train=False)        -> clone                contiguous        -> (its input) | clone
    reshape / flatten           -> view | clone + _unsafe_view           chunk -> split.Tensor
    numpy_T                     -> permute              lift_fresh_copy   -> clone
    x.op_(...) (x a fresh tensor nothing else reads)    -> op(x, ...), as functionalization does

`reshape` is a view exactly when torch's own reshape of the fake value aliases it (run under the
program's fake mode, so symbolic sizes decide as in the trace). Anything else — a mutation of an
input, a buffer or a tensor something else reads, a higher-order op, a composite op torch does not
preserve and this table does not cover, a rule's case it does not cover (dropout in training, a -1
for a symbolic size no node holds) — makes the
whole graph take `run_decompositions({})`. `tests/compiler/test_inference_ir.py` checks the
rewritten graph against `run_decompositions({})` on every built-in model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten


class _Retrace(Exception):
    """This graph needs torch's own run_decompositions."""


def to_inference_ir(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    try:
        edits = _plan(ep)
    except _Retrace:
        return ep.run_decompositions({})
    gm = ep.graph_module
    for node, edit in edits:
        edit(gm.graph, node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return ep


def _plan(ep) -> list[tuple[fx.Node, Callable]]:
    """Every node's edit, decided before anything changes; _Retrace if any node has none."""
    if any(s.kind.name != "USER_OUTPUT" for s in ep.graph_signature.output_specs):
        raise _Retrace  # buffer or input mutations
    preserved = _preserved()
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"])
    if fake_mode is None:
        raise _Retrace
    edits = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target in _RULES:
                edits.append((node, _RULES[target](node, fake_mode)))
            elif target._schema.is_mutable:
                edits.append((node, _in_place(node, fake_mode)))
            elif _is_composite(target) and target not in preserved:
                raise _Retrace
        elif not (callable(target) and getattr(target, "__module__", None) in ("_operator", "operator", "math")
                  or target in _SYM_FUNCTIONS):
            raise _Retrace  # higher-order ops and anything else
    return edits


@functools.cache
def _preserved() -> frozenset:
    """The composite ops run_decompositions({}) keeps whole (torch's own list; ~30 ms to build, so
    once per process: an op registered later is missing from it, which only sends its graph to the
    retrace)."""
    try:
        from torch._export.utils import _collect_all_valid_cia_ops
    except ImportError as e:  # a torch without it: let torch decide everything
        raise _Retrace from e
    return frozenset(_collect_all_valid_cia_ops())


def _is_composite(op: torch._ops.OpOverload) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


_SYM_FUNCTIONS = {torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_float, torch.sym_int, torch.sym_ite,
                  torch.sym_sqrt}


# --------------------------------------------------------------------------- rules
# Each rule checks its node (raising _Retrace for a case it does not cover) and returns the edit.


def _kwargs(node: fx.Node) -> dict:
    found = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if found is None:
        raise _Retrace
    return found.kwargs


def _val(a):
    return fx.node.map_arg(a, lambda n: n.meta["val"])


def _replace(graph: fx.Graph, node: fx.Node, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(target, args, kwargs or {})
    new.meta = {**node.meta, "val": None}
    return new


class _Arg:
    """In a step's args: the node's i-th argument when the edit runs (an earlier edit may have
    replaced the node that was there when the plan was made)."""

    def __init__(self, i: int):
        self.i = i


def _emit(node: fx.Node, fake_mode, steps: list[tuple]) -> Callable:
    """The edit that replaces `node` by `steps`: (target, args, kwargs) each, where the arg None
    stands for the previous step's output (the node's first input before the first step) and
    `_Arg(i)` for the node's i-th argument; no steps: the node's uses read its input."""

    def edit(graph: fx.Graph, node: fx.Node) -> None:
        value = node.args[0]
        for target, args, kwargs in steps:
            args = tuple(value if a is None else node.args[a.i] if isinstance(a, _Arg) else a for a in args)
            new = _replace(graph, node, target, args, kwargs)
            with fake_mode:
                new.meta["val"] = target(*_val(args), **_val(kwargs))
            value = new
        node.replace_all_uses_with(value)
        graph.erase_node(node)

    return edit


def _to(node: fx.Node, fake_mode) -> Callable:
    kw, x = _kwargs(node), node.args[0].meta["val"]
    if kw.get("copy") or kw.get("pin_memory") or kw.get("memory_format") not in (None, torch.preserve_format):
        raise _Retrace
    wanted = {k: kw.get(k) for k in ("dtype", "layout", "device") if kw.get(k) is not None}
    same = (wanted.get("dtype", x.dtype) == x.dtype and wanted.get("layout", x.layout) == x.layout
            and torch.device(wanted.get("device", x.device)) == x.device)
    return _emit(node, fake_mode, [] if same else [(aten._to_copy.default, (None,), wanted)])


def _dropout(node: fx.Node, fake_mode) -> Callable:
    if _kwargs(node)["train"]:
        raise _Retrace
    return _emit(node, fake_mode, [(aten.clone.default, (None,), {})])


def _contiguous(node: fx.Node, fake_mode) -> Callable:
    if _kwargs(node).get("memory_format", 0) not in (0, torch.contiguous_format):  # the schema's default is 0
        raise _Retrace
    with fake_mode:
        contiguous = bool(node.args[0].meta["val"].is_contiguous())
    return _emit(node, fake_mode, [] if contiguous else
                 [(aten.clone.default, (None,), {"memory_format": torch.contiguous_format})])


def _reshape_to(node: fx.Node, fake_mode, shape: list) -> Callable:
    """ATen's reshape: a view with the shape as given if the input is contiguous; else a view with
    -1 resolved if the strides allow one (torch's reshape of the fake value aliases it); else a
    contiguous copy, viewed."""
    x = node.args[0].meta["val"]
    with fake_mode:
        if bool(x.is_contiguous()):
            return _emit(node, fake_mode, [(aten.view.default, (None, shape), {})])
        aliases = torch._C._is_alias_of(aten.reshape.default(x, _val(shape)), x)
    if -1 in shape:
        size = x.numel() // math.prod(_val(s) for s in shape if s != -1)
        fill = _static(size)
        if fill is None:  # a symbolic size: an earlier node that holds it
            fill = _sym_nodes(node).get(size.node.expr)
            if fill is None:
                raise _Retrace
        shape = [fill if s == -1 else s for s in shape]
    if aliases:
        return _emit(node, fake_mode, [(aten.view.default, (None, shape), {})])
    return _emit(node, fake_mode, [(aten.clone.default, (None,), {"memory_format": torch.contiguous_format}),
                                   (aten._unsafe_view.default, (None, shape), {})])


def _reshape(node: fx.Node, fake_mode) -> Callable:
    return _reshape_to(node, fake_mode, list(node.args[1]))


def _flatten(node: fx.Node, fake_mode) -> Callable:
    kw, x = _kwargs(node), node.args[0].meta["val"]
    if x.dim() < 2:
        raise _Retrace
    start, end = kw.get("start_dim", 0) % x.dim(), kw.get("end_dim", -1) % x.dim()
    sizes = [_static(s) for s in x.shape]
    nodes = _size_nodes(node, x)
    if start >= end or None in sizes[start:end + 1] or nodes is None:
        raise _Retrace
    shape = [nodes.get(d, s) for d, s in enumerate(sizes)]
    return _reshape_to(node, fake_mode, shape[:start] + [math.prod(sizes[start:end + 1])] + shape[end + 1:])


def _chunk(node: fx.Node, fake_mode) -> Callable:
    kw, x = _kwargs(node), node.args[0].meta["val"]
    size = _static(x.shape[kw.get("dim", 0)])
    if size is None or size == 0:
        raise _Retrace
    split = -(-size // kw["chunks"])
    return _emit(node, fake_mode, [(aten.split.Tensor, (None, split, kw.get("dim", 0)), {})])


def _in_place(node: fx.Node, fake_mode) -> Callable:
    """`x.op_(...)` on a fresh tensor nothing else reads -> `op(x, ...)`, as functionalization does."""
    functional = _functional(node)
    if functional is None:
        raise _Retrace
    return _emit(node, fake_mode, [(functional, (None, *(_Arg(i) for i in range(1, len(node.args)))),
                                    dict(node.kwargs))])


def _functional(node: fx.Node):
    """The functional op of an in-place `node` whose written tensor (its first argument) is fresh and
    read by nothing else, and whose keyword arguments hold no node; else None."""
    schema, x = node.target._schema, node.args[0] if node.args else None
    writes = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    functional = getattr(getattr(aten, schema.name.split("::")[-1].rstrip("_"), None), node.target._overloadname, None)
    if (len(writes) != 1 or writes[0] is not schema.arguments[0] or functional is None or not isinstance(x, fx.Node)
            or len(x.users) != 1 or not _fresh(x) or any(isinstance(v, fx.Node) for v in node.kwargs.values())):
        return None
    return functional


def _fresh(node: fx.Node) -> bool:
    """The node makes a new tensor: an op whose result aliases no input, or an in-place op this
    module makes functional (so chains like `x.mul_(a).add_(b)` are fresh all along)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target._schema.is_mutable:
        return _functional(node) is not None
    return all(r.alias_info is None for r in node.target._schema.returns)


def _static(size) -> int | None:
    if isinstance(size, int):
        return size
    return int(size.node.expr) if size.node.expr.is_number else None


def _sym_nodes(node: fx.Node) -> dict:
    """symbolic size expression -> the first node before `node` that holds it."""
    found = {}
    for n in node.graph.nodes:
        if n is node:
            break
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt):
            found.setdefault(v.node.expr, n)
    return found


def _size_nodes(node: fx.Node, x) -> dict[int, fx.Node] | None:
    """dim -> an earlier node holding that symbolic size of `x` (export keeps a `sym_size.int` per
    input size); None if some symbolic size has none."""
    by_expr = _sym_nodes(node)
    found = {d: by_expr.get(s.node.expr) for d, s in enumerate(x.shape) if _static(s) is None}
    return None if None in found.values() else found


_RULES: dict = {
    aten.to.dtype: _to, aten.to.device: _to, aten.to.dtype_layout: _to,
    aten.dropout.default: _dropout,
    aten.contiguous.default: _contiguous,
    aten.reshape.default: _reshape,
    aten.flatten.using_ints: _flatten,
    aten.chunk.default: _chunk,
    aten.numpy_T.default: lambda node, fake_mode: _emit(node, fake_mode, [
        (aten.permute.default, (None, list(range(node.args[0].meta["val"].dim()))[::-1]), {})]),
    aten.lift_fresh_copy.default: lambda node, fake_mode: _emit(node, fake_mode, [(aten.clone.default, (None,), {})]),
}

__all__ = ["to_inference_ir"]
