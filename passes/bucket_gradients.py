"""bucket_gradients: one dp all-reduce per bucket of gradients in the training-step graph.

Entry point: the pass `bucket_gradients(bucket_mb=25)`, run on the training-step Program
(`meshc.training_step`; ZeRO stages 0/1, whose `zero_param` backward all-reduces each parameter's
gradient over dp). Walking the graph in order, consecutive dp all-reduces of one dtype are grouped
while their gradients add up to at most `bucket_mb` (a larger one alone). A group of two or more
becomes, at its last member's place,

    cat(flattened gradients) -> all_reduce(sum, dp) -> wait -> split -> view as each gradient

so a step issues one collective per bucket, as DDP does. A member joins a group only if no reader of
the group's earlier results comes before it (the results move to the last member's place). Stages
2/3 have their reduce-scatters bucketed per layer by the zero pass itself (`bucket_layers`). Other
groups' all-reduces (tp) are left alone. Preserves semantics (a sum of concatenated tensors is the
concatenation of their sums).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from meshc.mesh import DP
from meshc.pipeline import register_pass
from meshc.program import Program
from meshc.redistribute import c10d


@register_pass("bucket_gradients", preserves_semantics=True,
               description="training step: consecutive dp gradient all-reduces in buckets of bucket_mb, one each")
def bucket_gradients(program: Program, *, bucket_mb: float = 25.0) -> Program:
    if program.mesh.dp <= 1:
        program.notes.append("bucket_gradients: no dp dim, nothing to bucket")
        return program
    buckets = _buckets(program.graph, program.mesh.group_name(DP), int(bucket_mb * 2**20))
    for members in buckets:
        if len(members) > 1:
            _merge(program.graph, members)
    program.graph.lint()
    program.gm.recompile()
    total = sum(len(b) for b in buckets)
    program.notes.append(f"bucket_gradients: {total} dp gradient all-reduces in {len(buckets)} buckets "
                         f"of at most {bucket_mb:g} MB")
    return program


def _buckets(graph: fx.Graph, group: str, max_bytes: int) -> list[list[tuple[fx.Node, fx.Node]]]:
    """(all_reduce, wait) pairs on `group` in graph order, grouped as the module docstring says."""
    c = c10d()
    order = {n: i for i, n in enumerate(graph.nodes)}
    pairs = [(n, next(iter(n.users))) for n in graph.nodes
             if n.target is c.all_reduce.default and n.args[2] == group and len(n.users) == 1]
    out: list[list] = []
    size, first_read, dtype = 0, None, None
    for ar, wait in pairs:
        val = wait.meta["val"]
        nbytes = val.numel() * val.element_size()
        if not out or size + nbytes > max_bytes or val.dtype != dtype or order[ar] > first_read:
            out.append([])
            size, first_read, dtype = 0, len(order), val.dtype
        out[-1].append((ar, wait))
        size += nbytes
        first_read = min([first_read, *(order[u] for u in wait.users)])
    return out


def _merge(graph: fx.Graph, members: list[tuple[fx.Node, fx.Node]]) -> None:
    c, aten = c10d(), torch.ops.aten
    last = members[-1][0]
    group = last.args[2]
    vals = [w.meta["val"] for _, w in members]
    sizes = [v.numel() for v in vals]
    flat_val = vals[0].new_empty(sum(sizes))

    def add(target, args, val):
        with graph.inserting_before(last):
            node = graph.call_function(target, args)
        node.meta.update(val=val, stack_trace=last.meta.get("stack_trace"))
        return node

    flats = [add(aten.reshape.default, (ar.args[0], [-1]), v.new_empty(n))
             for (ar, _), v, n in zip(members, vals, sizes)]
    cat = add(aten.cat.default, (flats,), flat_val)
    reduced = add(c.wait_tensor.default, (add(c.all_reduce.default, (cat, "sum", group), flat_val),), flat_val)
    split = add(aten.split_with_sizes.default, (reduced, sizes), [v.new_empty(n) for v, n in zip(vals, sizes)])
    for i, ((ar, wait), v) in enumerate(zip(members, vals)):
        part = add(operator.getitem, (split, i), v.new_empty(sizes[i]))
        view = add(aten.view.default, (part, list(v.shape)), v)
        wait.replace_all_uses_with(view)
        graph.erase_node(wait)
        graph.erase_node(ar)
