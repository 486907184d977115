"""differentiable_collectives: give every functional collective of a program its adjoint.

Entry point: the pass `differentiable_collectives` (on a pipelined Program: every stage). The
`_c10d_functional` collectives spmd_partition emits have no autograd; for training each one
becomes a call of an autograd Function whose backward is the adjoint collective from the one
redistribution table (`meshc.redistribute.ADJOINT`: all_reduce <-> all_reduce, all_gather <->
reduce_scatter, all_to_all <-> the reverse all_to_all), and its `wait_tensor` the value itself
(the Function waits). With every tp rank seeding its loss with 1/tp, this gives each rank the
exact gradient of its shards; the runtime sums replicated parameters' gradients over the tp group.

The collectives keep their group names (`MeshSpec.group_name`); the runtime binds the process
groups. Forward values are unchanged, so the pass preserves semantics.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from meshc.collectives import collective_name
from meshc.errors import MeshError
from meshc.pipeline import register_pass
from meshc.program import Program
from meshc.redistribute import ADJOINT, c10d


def _run(op: str, x: torch.Tensor, n: int, group: str, splits: tuple | None = None) -> torch.Tensor:
    """Issue collective `op` (sum reductions) and wait for it."""
    c = c10d()
    x = x.contiguous()
    if op == "all_reduce":
        return c.wait_tensor(c.all_reduce(x, "sum", group))
    if op == "all_gather_into_tensor":
        return c.wait_tensor(c.all_gather_into_tensor(x, n, group))
    if op == "reduce_scatter_tensor":
        return c.wait_tensor(c.reduce_scatter_tensor(x, "sum", n, group))
    out_splits, in_splits = splits
    return c.wait_tensor(c.all_to_all_single(x, out_splits, in_splits, group))


class _Collective(torch.autograd.Function):
    """Forward: collective `op`; backward: ADJOINT[op] (all_to_all with its splits swapped)."""

    @staticmethod
    def forward(ctx, x, op, n, group, splits):
        ctx.op, ctx.n, ctx.group, ctx.splits = op, n, group, splits
        return _run(op, x, n, group, splits)

    @staticmethod
    def backward(ctx, g):
        back = ctx.splits[::-1] if ctx.splits is not None else None
        return _run(ADJOINT[ctx.op], g, ctx.n, ctx.group, back), None, None, None, None


def differentiable_all_reduce(x, op, group):
    if op != "sum":
        raise MeshError(f"differentiable_collectives: all_reduce({op!r}) has no adjoint here; only 'sum'")
    return _Collective.apply(x, "all_reduce", 1, group, None)


def differentiable_all_gather_into_tensor(x, n, group):
    return _Collective.apply(x, "all_gather_into_tensor", n, group, None)


def differentiable_reduce_scatter_tensor(x, op, n, group):
    if op != "sum":
        raise MeshError(f"differentiable_collectives: reduce_scatter({op!r}) has no adjoint here; only 'sum'")
    return _Collective.apply(x, "reduce_scatter_tensor", n, group, None)


def differentiable_all_to_all_single(x, out_splits, in_splits, group):
    return _Collective.apply(x, "all_to_all_single", 1, group, (list(out_splits), list(in_splits)))


_DIFFERENTIABLE = {"all_reduce": differentiable_all_reduce,
                   "all_gather_into_tensor": differentiable_all_gather_into_tensor,
                   "reduce_scatter_tensor": differentiable_reduce_scatter_tensor,
                   "all_to_all_single": differentiable_all_to_all_single}


@register_pass("differentiable_collectives", preserves_semantics=True,
               description="replace each functional collective by one whose backward is its adjoint (training)")
def differentiable_collectives(program: Program) -> Program:
    graphs = [st.program for st in program.split.stages] if program.split is not None else [program]
    count = 0
    for p in graphs:
        count += _rewrite(p.gm)
    program.notes.append(f"differentiable_collectives: {count} collectives carry their adjoint for backward")
    return program


def _rewrite(gm: fx.GraphModule) -> int:
    wait = c10d().wait_tensor.default
    replaced: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        name = collective_name(node)
        if name:
            node.target = _DIFFERENTIABLE[name]
            replaced.add(node)
        elif node.target is wait and node.args[0] in replaced:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return len(replaced)
