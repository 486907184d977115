"""Sharding rules: for one node and ONE mesh dim, the placement each tensor input must have and
the placement of the output. A table of small functions, one per op family (gpt-fast style).

Entry point: `decide(node, placement_of) -> Decision`. `placement_of(input_node)` is the input's
current placement on this mesh dim (a list for multi-output nodes such as `split`). Global shapes
come from `node.meta["val"]`. Rules never create nodes; `spmd_partition` turns the differences
between current and required placements into collectives.

An op without a rule gets every input replicated and a replicated output (`Decision.fallback`),
which is always correct and is listed in the partition report.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from meshc.placement import InterleavedShard, Partial, Placement, Replicate, Shard

aten = torch.ops.aten
R = Replicate()


@dataclass
class Decision:
    needs: dict[fx.Node, Placement] = field(default_factory=dict)  # required placement per tensor input
    out: Placement | list[Placement] | None = R
    fallback: bool = False  # no rule: everything replicated


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes holding tensors (or tuples of tensors), in argument order, without repeats."""
    return [a for a in node.all_input_nodes if _is_tensorish(a.meta.get("val"))]  # FX keeps them in order


def _is_tensorish(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))


def ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def size_is_one(node: fx.Node, d: int) -> bool:
    s = node.meta["val"].shape[d]
    return isinstance(s, int) and s == 1


def at_dim(p: Placement, d: int) -> Placement:
    """A shard like `p` (plain or interleaved) on dim `d`."""
    return InterleavedShard(d, p.groups) if isinstance(p, InterleavedShard) else Shard(d)


def is_shard(p: Any) -> bool:
    return isinstance(p, Shard)


def is_partial(p: Any) -> bool:
    return isinstance(p, Partial)


def hint_int(s: Any) -> int:
    """The example value of a (possibly symbolic) size."""
    if isinstance(s, int):
        return s
    hint = getattr(s.node, "hint", None)
    return int(hint if hint is not None else s.node.shape_env.size_hint(s.node.expr))


def _norm(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


# ---- pointwise and cat: align every input on one sharded dim ----------------------------------

def _align(node: fx.Node, inputs: list[fx.Node], P: Callable, broadcast: bool, linear: bool) -> Decision:
    out_nd = ndim(node)
    cur = {a: P(a) for a in inputs}
    if any(is_partial(p) for p in cur.values()):
        if linear:
            return Decision({a: cur[a] for a in inputs}, Partial())
        cur = {a: (R if is_partial(p) else p) for a, p in cur.items()}
    target = next(((a, p) for a, p in cur.items() if is_shard(p)), None)
    if target is None:
        return Decision({a: R for a in inputs}, R)
    src, tp = target
    out_dim = tp.dim + out_nd - ndim(src)
    needs = {}
    for a in inputs:
        local = out_dim - (out_nd - ndim(a))
        if local < 0 or (broadcast and size_is_one(a, local)):
            needs[a] = R
        else:
            needs[a] = at_dim(tp, local)
    return Decision(needs, at_dim(tp, out_dim))


def pointwise(node: fx.Node, P: Callable) -> Decision:
    inputs = tensor_inputs(node)
    parts = [a for a in inputs if is_partial(P(a))]
    t = node.target
    linear = bool(parts) and (
        (t in (aten.add.Tensor, aten.sub.Tensor) and len(parts) == len(inputs))
        or (t in (aten.mul.Tensor, aten.div.Tensor) and len(parts) == 1 and parts[0] is node.args[0]
            and all(P(a) == R for a in inputs if a is not parts[0]))
        or (len(inputs) == 1 and t in (aten.neg.default, aten.mul.Scalar, aten.div.Scalar, aten.clone.default,
                                        aten.alias.default, aten._to_copy.default, aten.contiguous.default)))
    return _align(node, inputs, P, broadcast=True, linear=linear)


def cat(node: fx.Node, P: Callable) -> Decision:
    inputs = tensor_inputs(node)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    bad = {a for a in inputs if (is_shard(P(a)) and P(a).dim == dim)}
    cur = lambda a: R if a in bad else P(a)
    return _align(node, inputs, cur, broadcast=False, linear=all(is_partial(P(a)) for a in inputs))


# ---- views: a dim map from input dims to output dims ------------------------------------------

def _passthrough(node: fx.Node, P: Callable, dim_map: Callable[[int], int | None]) -> Decision:
    x = node.args[0]
    p = P(x)
    if is_shard(p):
        new = dim_map(p.dim)
        if new is None:
            return Decision({x: R}, R)
        return Decision({x: p}, at_dim(p, new))
    return Decision({x: p}, p)


def transpose(node, P):
    nd = ndim(node)
    a, b = _norm(node.args[1], nd), _norm(node.args[2], nd)
    return _passthrough(node, P, lambda d: b if d == a else a if d == b else d)


def permute(node, P):
    dims = [_norm(d, ndim(node)) for d in node.args[1]]
    return _passthrough(node, P, lambda d: dims.index(d))


def unsqueeze(node, P):
    at = _norm(node.args[1], ndim(node))
    return _passthrough(node, P, lambda d: d + (d >= at))


def squeeze_dim(node, P):
    nd_in = ndim(node.args[0])
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    dims = {_norm(d, nd_in) for d in dims}
    return _passthrough(node, P, lambda d: None if d in dims else d - sum(1 for x in dims if x < d))


def expand(node, P):
    off = ndim(node) - ndim(node.args[0])
    x_shape = node.args[0].meta["val"].shape
    return _passthrough(node, P, lambda d: None if size_is_one(node.args[0], d) and
                        str(node.meta["val"].shape[d + off]) != str(x_shape[d]) else d + off)


def view(node, P):
    """Dims are grouped where the products of input and output sizes agree; a sharded input dim
    must be the first of its group and moves to the first dim of the matching output group."""
    src = [hint_int(s) for s in node.args[0].meta["val"].shape]
    dst = [hint_int(s) for s in node.meta["val"].shape]
    groups, i, j = {}, 0, 0
    while i < len(src) and j < len(dst):
        first_i, first_j, pi, pj = i, j, src[i], dst[j]
        while pi != pj:
            if pi < pj and i + 1 < len(src):
                i += 1
                pi *= src[i]
            elif j + 1 < len(dst):
                j += 1
                pj *= dst[j]
            else:
                break
        groups[first_i] = first_j
        i, j = i + 1, j + 1
    return _passthrough(node, P, lambda d: groups.get(d))


def slice_like(node, P):
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, ndim(node.args[0]))
    if node.target is aten.slice.Tensor and _is_full_slice(node, dim):
        return _passthrough(node, P, lambda d: d)
    removes = node.target is aten.select.int
    return _passthrough(node, P, lambda d: None if d == dim else d - (removes and d > dim))


def _is_full_slice(node: fx.Node, dim: int) -> bool:
    start, end = (list(node.args[2:4]) + [None, None])[:2]
    step = node.args[4] if len(node.args) > 4 else 1
    size = node.args[0].meta["val"].shape[dim]
    return start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62)
                                                 or str(end) == str(size))


def split(node, P):
    x = node.args[0]
    p, nd = P(x), ndim(x)
    dim = _norm(node.args[2] if len(node.args) > 2 else 0, nd)
    n_out = len(node.meta["val"])
    if isinstance(p, InterleavedShard) and p.dim == dim and p.groups == n_out:
        return Decision({x: p}, [Shard(dim)] * n_out)
    if is_shard(p) and p.dim == dim:
        return Decision({x: R}, [R] * n_out)
    return Decision({x: p}, [p] * n_out)


def getitem(node, P):
    src, i = node.args
    p = P(src)
    return Decision({}, p[i] if isinstance(p, list) else p)


# ---- compute ----------------------------------------------------------------------------------

def linear_family(node, P):
    """linear(x, w[out,in], b), addmm(b, x, w[in,out]), mm(x, w[in,out])."""
    t = node.target
    if t is aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        out_dim = 0
    else:
        x, w = (node.args[1], node.args[2]) if t is aten.addmm.default else (node.args[0], node.args[1])
        b = node.args[0] if t is aten.addmm.default else None
        out_dim = 1
    px, pw, last = P(x), P(w), ndim(x) - 1
    needs: dict[fx.Node, Placement] = {}
    if is_shard(pw) and pw.dim == out_dim:  # column parallel: output features sharded
        needs = {x: R, w: pw}
        out = at_dim(pw, ndim(node) - 1)
        if isinstance(b, fx.Node):
            needs[b] = at_dim(pw, 0)
    elif is_shard(pw):  # row parallel: contraction sharded, partial sums out
        if isinstance(b, fx.Node):
            return Decision({x: R, w: R, b: R}, R, fallback=True)  # spmd_partition splits biases first
        needs, out = {x: at_dim(pw, last), w: pw}, Partial()  # x split exactly like w's contraction dim
    else:
        keep = is_shard(px) and px.dim != last
        needs = {x: px if keep else R, w: R}
        out = px if keep else R
        if isinstance(b, fx.Node):
            needs[b] = R
    return Decision(needs, out)


def sdpa(node, P):
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    shard = next((P(a) for a in (q, k, v) if is_shard(P(a)) and P(a).dim in (0, 1)), None)
    needs = {a: (Shard(shard.dim) if shard else R) for a in (q, k, v)}
    if isinstance(mask, fx.Node):
        off = 4 - ndim(mask)
        local = shard.dim - off if shard else -1
        needs[mask] = Shard(local) if shard and local >= 0 and not size_is_one(mask, local) else R
    return Decision(needs, Shard(shard.dim) if shard else R)


def index_copy(node, P):
    """self.index_copy_(dim, index, source) - the KV cache write. The written tensor keeps its
    placement (an in-place write cannot redistribute it: the copy would be written, not the
    tensor); the source follows it, the index is replicated. A tensor sharded on the indexed dim
    is replicated (only possible for a functional index_copy)."""
    self_, dim, index, source = node.args[:4]
    p = P(self_)
    if is_partial(p) or (is_shard(p) and p.dim == _norm(dim, ndim(node))):
        p = R
    return Decision({self_: p, index: R, source: p}, p)


def embedding(node, P):
    w, ids = node.args[:2]
    pw, pi = P(w), P(ids)
    if is_shard(pw) and pw.dim == 1:
        return Decision({w: pw, ids: R}, at_dim(pw, ndim(node) - 1))
    keep = is_shard(pi)
    return Decision({w: R, ids: pi if keep else R}, pi if keep else R)


def reduction(dims_of: Callable[[fx.Node], list[int]], keepdim_of: Callable[[fx.Node], bool]):
    """A rule for ops reducing `dims_of(node)` of their first input; weights must be replicated."""
    def rule(node, P):
        x = node.args[0]
        nd, p = ndim(x), P(x)
        dims = {_norm(d, nd) for d in dims_of(node)}
        others = {a: R for a in tensor_inputs(node) if a is not x}
        if not is_shard(p) or p.dim in dims:
            return Decision({x: R, **others}, R)
        keep = keepdim_of(node)
        new = p.dim if keep else p.dim - sum(1 for d in dims if d < p.dim)
        return Decision({x: p, **others}, at_dim(p, new))
    return rule


def _arg(i: int, name: str, default: Any) -> Callable[[fx.Node], Any]:
    return lambda n: n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _dims(i: int, name: str, default: Any) -> Callable[[fx.Node], list[int]]:
    def get(n):
        v = _arg(i, name, default)(n)
        if v is None:
            return list(range(ndim(n.args[0])))
        return list(v) if isinstance(v, (list, tuple)) else [v]
    return get


RULES: dict[Any, Callable[[fx.Node, Callable], Decision]] = {
    aten.sym_size.int: lambda node, P: Decision({}, None),  # reads the local size; made global on emit
    aten.transpose.int: transpose, aten.permute.default: permute, aten.unsqueeze.default: unsqueeze,
    aten.squeeze.dim: squeeze_dim, aten.squeeze.dims: squeeze_dim, aten.expand.default: expand,
    aten.view.default: view, aten._unsafe_view.default: view, aten.reshape.default: view,
    aten.slice.Tensor: slice_like, aten.select.int: slice_like, aten.split.Tensor: split,
    operator.getitem: getitem, aten.cat.default: cat,
    aten.linear.default: linear_family, aten.addmm.default: linear_family, aten.mm.default: linear_family,
    aten.scaled_dot_product_attention.default: sdpa, aten.embedding.default: embedding,
    aten.index_copy_.default: index_copy, aten.index_copy.default: index_copy,
    aten.mean.dim: reduction(_dims(1, "dim", None), _arg(2, "keepdim", False)),
    aten.sum.dim_IntList: reduction(_dims(1, "dim", None), _arg(2, "keepdim", False)),
    aten.amax.default: reduction(_dims(1, "dim", None), _arg(2, "keepdim", False)),
    aten._softmax.default: reduction(_dims(1, "dim", -1), lambda n: True),
    aten._log_softmax.default: reduction(_dims(1, "dim", -1), lambda n: True),
    aten.cumsum.default: reduction(_dims(1, "dim", 0), lambda n: True),
    aten.diff.default: reduction(_dims(2, "dim", -1), lambda n: True),
    aten.layer_norm.default: reduction(lambda n: list(range(-len(n.args[1]), 0)), lambda n: True),
    aten.clone.default: pointwise, aten.alias.default: pointwise, aten._to_copy.default: pointwise,
    aten.contiguous.default: pointwise,
}
#: Ops whose inputs are always replicated by design (index math, masks); not reported as fallbacks.
REPLICATED_BY_DESIGN = {aten.index.Tensor, aten.arange.default, aten.arange.start, aten.new_ones.default,
                        aten.full.default, aten.zeros.default, aten.ones.default, aten.scalar_tensor.default}


def decide(node: fx.Node, P: Callable[[fx.Node], Any]) -> Decision:
    rule = RULES.get(node.target)
    if rule is None and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        rule = pointwise
    if rule is not None:
        return rule(node, P)
    inputs = tensor_inputs(node)
    sharded = any(not isinstance(P(a), Replicate) for a in inputs)
    return Decision({a: R for a in inputs}, R, fallback=sharded and node.target not in REPLICATED_BY_DESIGN)
