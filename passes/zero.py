"""zero: ZeRO stages 0-3 as placements of the trainable parameters on the dp dim (training).

Entry point: the pass `zero(stage=N)`, run after `spmd_partition` and `differentiable_collectives`
(`meshc.compile(..., training=True, zero=N)` puts it there). Every trainable parameter
placeholder gets one node, `zero_param`, right before its first reader; the readers then read
that node. It is an autograd Function whose forward makes the parameter Replicate on dp and whose
backward is the adjoint, both steps of the one redistribution table (`meshc.redistribute`):

    stage  placeholder holds              forward             backward (gradient of the placeholder)
    0, 1   the full parameter (R on dp)   identity            Partial -> R: all_reduce over dp
    2      a flat dp shard (S(0) on dp)   the held full copy  Partial -> S(0): reduce_scatter over dp
           + the full copy ('<name>_full', a buffer the optimizer step refreshes by all-gather)
    3      a flat dp shard (S(0) on dp)   all_gather          Partial -> S(0): reduce_scatter over dp

Stage 1 differs from 0 only in the optimizer (its state is sharded: `meshc.runtime.training`).
A shard is this rank's block of the flattened parameter, padded to a multiple of dp
(`meshc.redistribute.flat_shard`), so parameters dp does not divide need no special case. On a
tp dim, a parameter Replicate on tp has its gradient summed over tp as well (every tp rank seeds
its loss with 1/tp, as in the pipeline). Each trainable placeholder records what it holds in
`meta['meshc_zero']`; the runtime reads only that.

Stage 3's all-gathers are issued right before the first reader; the option `prefetch=1` moves
each one before the previous layer's (one layer ahead). `recompute=true` (stage 3): what
autograd saves of a gathered parameter for backward is not kept; backward gathers it again
(`regather`; `meshc.training_step` traces the step under saved-tensor hooks that call it), so
each full parameter lives only while it is used. The default saves it (no second all-gather).
`compute_dtype=bfloat16`: the traced step runs forward and loss under autocast to it (master
weights, gradients, optimizer stay fp32; collectives move fp32). `bucket_mb` (default 25, as
DDP): stages 2/3 gather and reduce-scatter each layer's parameters in buckets of at most that
size (`bucket_layers`); stages 0/1 record it (`bucket_mb`), and the `bucket_gradients` pass on
the training-step graph (`meshc.training_step`) merges consecutive gradient all-reduces into
buckets of that size (one collective per bucket instead of one per parameter). Never touches a process group.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from meshc.errors import MeshError
from meshc.mesh import DP
from meshc.passes.differentiable_collectives import _run
from meshc.pipeline import register_pass
from meshc.placement import Partial, Replicate, Shard
from meshc.program import Program, trainable
from meshc.redistribute import ADJOINT, flat_block, flat_shard, pad_flat, steps

STAGES = (0, 1, 2, 3)


def _dp_op(stage: int) -> str:
    """Stage 3's forward on dp: S(0) -> R from the table (all_gather_into_tensor)."""
    return next(s.op for s in steps(Shard(0), Replicate()) if s.is_collective)


def _grad_op(stage: int) -> str:
    """The collective that turns the Partial gradient on dp into the placeholder's placement; it
    is the adjoint of the forward's (all_gather <-> reduce_scatter, as `ADJOINT` says)."""
    want = Replicate() if stage < 2 else Shard(0)
    op = next(s.op for s in steps(Partial(), want) if s.is_collective)
    assert stage != 3 or op == ADJOINT[_dp_op(stage)]
    return op


class _ZeroParam(torch.autograd.Function):
    """Forward: the parameter Replicate on dp; backward: the gradient in the placeholder's placement."""

    @staticmethod
    def forward(ctx, x, full, stage, n, shape, group, sum_groups):
        ctx.stage, ctx.n, ctx.shape, ctx.group, ctx.sum_groups = stage, n, shape, group, sum_groups
        ctx.numel = x.numel()
        if stage < 2:
            return x.view_as(x)
        if stage == 2:
            return full.view(shape)
        return _run(_dp_op(stage), x, n, group)[:torch.Size(shape).numel()].view(shape)

    @staticmethod
    def backward(ctx, g):
        for name in ctx.sum_groups:  # Replicate on tp: every tp rank holds 1/tp of the gradient
            g = _run("all_reduce", g, 1, name)
        if ctx.n > 1:
            op = _grad_op(ctx.stage)
            if op == "reduce_scatter_tensor":
                g = _run(op, pad_flat(g, flat_shard(g.numel(), ctx.n)[0]), ctx.n, ctx.group)[:ctx.numel]
            else:
                g = _run(op, g, ctx.n, ctx.group)
        return g, None, None, None, None, None, None


def zero_param(x, full, stage: int, n: int, shape: tuple, group: str, sum_groups: tuple):
    """Graph op: parameter `x` (full or this rank's flat dp shard) as the full local tensor. A
    stage-3 result says how to gather it again (`regather`), for the recompute policy."""
    out = _ZeroParam.apply(x, full, stage, n, shape, group, sum_groups)
    if stage == 3:
        _tag(out, x, n, group)
    return out


def _tag(out: torch.Tensor, x: torch.Tensor, n: int, group: str) -> None:
    """Mark the tensor `out` views (the gathered flat block) with how to gather it again."""
    root = out._base if out._base is not None else out
    root.meshc_regather = (regather, (x, n, group))


def regather(x: torch.Tensor, n: int, group: str) -> torch.Tensor:
    """The gathered flat block (dp x shard, padded) again from the dp shard `x`, without autograd."""
    size = flat_shard(x.numel() * n, n)[1]
    return _run(_dp_op(3), pad_flat(x.detach(), size), n, group)


class _ZeroLayer(torch.autograd.Function):
    """Stages 2/3, one layer's parameters in one bucket: forward one all-gather (stage 3) or the
    held full copies (stage 2); backward one reduce-scatter. The bucket is laid out (dp, sum of
    shard sizes), so rank d's row is its shard of every parameter."""

    @staticmethod
    def forward(ctx, stage, n, shapes, group, sum_groups, fulls, *xs):
        sizes = [flat_shard(torch.Size(sh).numel(), n)[1] for sh in shapes]
        ctx.stage, ctx.n, ctx.shapes, ctx.group, ctx.sum_groups = stage, n, shapes, group, sum_groups
        ctx.sizes, ctx.numels = sizes, [x.numel() for x in xs]
        if stage == 2:
            return tuple(f.view(sh) for f, sh in zip(fulls, shapes))
        bucket = torch.cat([pad_flat(x, size) for x, size in zip(xs, sizes)])
        rows = _run(_dp_op(3), bucket, n, group).view(n, -1)
        outs, off = [], 0
        for size, sh in zip(sizes, shapes):
            outs.append(rows[:, off:off + size].reshape(-1)[:torch.Size(sh).numel()].view(sh))
            off += size
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):
        parts = []
        for g, sh, size, groups in zip(gs, ctx.shapes, ctx.sizes, ctx.sum_groups):
            g = torch.zeros(sh) if g is None else g
            for name in groups:
                g = _run("all_reduce", g, 1, name)
            parts.append(pad_flat(g, ctx.n * size).view(ctx.n, size))
        mine = _run(_grad_op(ctx.stage), torch.cat(parts, dim=1).reshape(-1), ctx.n, ctx.group)
        grads = [p[:k] for p, k in zip(mine.split(ctx.sizes), ctx.numels)]
        return (None,) * 6 + tuple(grads)


def zero_layer(xs: tuple, fulls: tuple, stage: int, n: int, shapes: tuple, group: str, sum_groups: tuple):
    """Graph op: one layer's parameters (flat dp shards) as full local tensors, in one bucket."""
    outs = _ZeroLayer.apply(stage, n, shapes, group, sum_groups, fulls, *xs)
    if stage == 3:
        for out, x in zip(outs, xs):
            _tag(out, x, n, group)
    return outs


def bucket_layers(graph: fx.Graph, max_bytes: int) -> int:
    """Replace each layer's stage-2/3 `zero_param` nodes (same `_layer_of`, up to `max_bytes` of
    full parameters) by one `zero_layer` node and a getitem per parameter. Returns the buckets made."""
    import operator

    groups: dict[str, list[list[fx.Node]]] = {}
    for node in [n for n in graph.nodes if n.target is zero_param and n.args[2] >= 2]:
        runs = groups.setdefault(_layer_of(node), [[]])
        nbytes = sum(torch.Size(m.args[4]).numel() * 4 for m in runs[-1])
        if runs[-1] and nbytes + torch.Size(node.args[4]).numel() * 4 > max_bytes:
            runs.append([])
        runs[-1].append(node)
    made = 0
    for runs in groups.values():
        for members in runs:
            if len(members) < 2:
                continue
            _, _, stage, n, _, group, _ = members[0].args
            args = (tuple(m.args[0] for m in members), tuple(m.args[1] for m in members), stage, n,
                    tuple(m.args[4] for m in members), group, tuple(m.args[6] for m in members))
            with graph.inserting_before(members[0]):
                layer = graph.call_function(zero_layer, args)
            layer.meta.update({k: v for k, v in members[0].meta.items() if k != "val"})
            layer.meta["val"] = tuple(m.meta["val"] for m in members)
            anchor = layer
            for i, m in enumerate(members):  # getitems right after the bucket, before any reader
                with graph.inserting_after(anchor):
                    anchor = graph.call_function(operator.getitem, (layer, i))
                anchor.meta.update(m.meta)
                m.replace_all_uses_with(anchor)
                graph.erase_node(m)
            made += 1
    return made


@register_pass("zero", preserves_semantics=True,
               description="ZeRO stage 0-3: trainable parameters' placements on dp and their gradients' reductions")
def zero(program: Program, *, stage: int = 0, prefetch: int = 1, bucket_mb: float = 25.0,
         recompute: bool = False, compute_dtype: str = "float32") -> Program:
    if program.split is not None:
        raise MeshError("zero: the pipeline runtime reduces gradients itself; ZeRO on a pp mesh is not "
                        "implemented yet (train with zero=0 there, or use a dp/tp mesh)")
    if not isinstance(getattr(torch, compute_dtype, None), torch.dtype):
        raise MeshError(f"zero: compute_dtype={compute_dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    if stage not in STAGES:
        raise MeshError(f"zero: stage={stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    mesh = program.mesh
    if stage > 0 and mesh.dp <= 1:
        raise MeshError(f"zero: stage {stage} partitions over the '{DP}' dim, but mesh '{mesh}' has no dp>1; "
                        f"use zero=0 or a mesh like 'dp=2'")
    n = mesh.dp
    dp_i = mesh.index(DP)
    coord = mesh.coord(program.rank, DP)
    group = mesh.group_name(DP) if n > 1 else ""
    graph, made, shards = program.graph, 0, {}
    order = {node: i for i, node in enumerate(graph.nodes)}
    last_ph = program.state_placeholders()[-1]
    for ph in [p for p in program.placeholders() if trainable(p)]:
        if not ph.users:
            continue
        pls = ph.meta.get("meshc_placement") or ()
        sum_groups = tuple(mesh.group_name(i) for i, (p, size) in enumerate(zip(pls, mesh.sizes))
                           if i != dp_i and size > 1 and isinstance(p, Replicate))
        t = program.state[ph.name]
        shape = tuple(int(s) for s in t.shape)
        full = None
        if stage >= 2:
            key = id(t)
            t = t.detach().contiguous() if stage == 2 else t
            if key not in shards:  # tied weights: one shard object, as they had one tensor
                # stage 2: a view into the full copy (the optimizer's update lands in it; the last
                # ranks' views may be shorter); stage 3: a padded copy (the full tensor is dropped)
                shards[key] = flat_block(t, n, coord, view=stage == 2)
            program.state[ph.name] = shards[key]
            if stage == 2:
                with graph.inserting_after(last_ph):
                    full = graph.placeholder(f"{ph.name}_full")
                full.meta.update(val=ph.meta["val"], meshc_input="buffer", meshc_pass="zero",
                                 meshc_name=f"{ph.meta['meshc_name']}#full", meshc_placement=pls or None)
                program.state[full.name] = t
                last_ph = full
            ph.meta["val"] = _fake_like(ph.meta["val"], tuple(shards[key].shape))
        first = min(ph.users, key=order.__getitem__)
        with graph.inserting_before(first):
            node = graph.call_function(zero_param, (ph, full, stage, n, shape, group, sum_groups))
        node.meta.update({k: v for k, v in first.meta.items() if k in ("stack_trace", "nn_module_stack")})
        node.meta.update(val=_fake_like(ph.meta["val"], shape), meshc_pass="zero",
                         meshc_placement=tuple(Replicate() if i == dp_i else p for i, p in enumerate(pls)) or None)
        ph.replace_all_uses_with(node, delete_user_cb=lambda u, node=node: u is not node)
        ph.meta["meshc_zero"] = {"stage": stage, "dp": n, "shape": shape, "full": full.name if full else None,
                                 "recompute": bool(recompute and stage == 3), "compute_dtype": compute_dtype,
                                 "bucket_mb": bucket_mb if stage < 2 and n > 1 else 0}
        made += 1
    if stage >= 2 and bucket_mb > 0 and n > 1:
        buckets = bucket_layers(graph, int(bucket_mb * 2**20))
        program.notes.append(f"zero: parameters bucketed per layer into {buckets} collectives each way")
    if stage == 3 and prefetch:
        moved = prefetch_gathers(graph)
        program.notes.append(f"zero: {moved} parameter all-gathers prefetched one layer ahead")
    graph.lint()
    program.gm.recompile()
    what = {0: "gradients all-reduced", 1: "gradients all-reduced, optimizer state sharded",
            2: "gradients reduce-scattered, optimizer state sharded",
            3: "parameters gathered per use, gradients reduce-scattered, optimizer state sharded"}[stage]
    program.notes.append(f"zero: stage {stage} on dp={n}: {made} parameters; {what}")
    return program


def _fake_like(val, shape):
    return val.new_empty(shape) if isinstance(val, torch.Tensor) else val


def prefetch_gathers(graph: fx.Graph) -> int:
    """Move each stage-3 `zero_param` (an all-gather) before the first reader of the previous
    distinct group of gathers, so the next layer's parameters are gathered one layer ahead. Only
    moves a gather above nodes it does not depend on (its input is a placeholder)."""
    gathers = [n for n in graph.nodes if n.target in (zero_param, zero_layer) and n.args[2] == 3]
    # group gathers that sit together (one layer's parameters are read close to each other)
    layers: list[list[fx.Node]] = []
    for g in gathers:
        key = _layer_of(g)
        if layers and _layer_of(layers[-1][0]) == key:
            layers[-1].append(g)
        else:
            layers.append([g])
    moved = 0
    for prev, cur in reversed(list(zip(layers, layers[1:]))):  # last first: each anchor is still in place
        for g in cur:
            prev[0].prepend(g)
            if g.target is zero_layer:  # its getitems stay right after it
                for item in [u for u in g.users]:
                    prev[0].prepend(item)
            moved += 1
    return moved


def _layer_of(node: fx.Node) -> str:
    """The module path of the layer a node belongs to ('model.layers.3'), from nn_module_stack:
    the first numbered module on the path, else the innermost module."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values()]
    for p in paths:
        parts = p.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[: i + 1])
    return paths[-1] if paths else ""
