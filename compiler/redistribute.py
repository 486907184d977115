"""The one redistribution table: how a tensor's placement changes, as steps. Defined here only.

Entry points:

* `steps(have, want)` — on ONE mesh dim, the steps that turn placement `have` into `want`
  (the table below). auto_shard prices them, spmd_partition emits them, the differentiable
  collectives of the pipeline and training take their backward from `ADJOINT`.
* `plan_steps(have, want, shape, itemsize, mesh)` — over every mesh dim of a tuple placement, in
  the order spmd_partition emits them (dim 0 first), each collective with its mesh dim and the
  bytes it moves (`Step.nbytes`, the convention of `meshc.cost_model.collective_time`).
* `step_time(step, n, preset)` — seconds for one step, priced as the process-group backend of
  the preset implements it (gloo's reduce-scatter is an all-reduce plus a local chunk).
* `shardable(size, n)` — the one rule for whether mesh size `n` may shard a dim of `size`:
  shard what divides, replicate what does not.
* `flat_shard(numel, n)` — ZeRO's exception to that rule (`passes/zero.py`): a parameter is
  sharded flat over dp, padded with zeros to a multiple of `n`; (padded numel, shard numel).
  `pad_flat(t, numel)` and `flat_block(t, n, coord)` make those padded tensors and blocks.

The table (R = Replicate, P = Partial, S(d) = Shard(d), IS = InterleavedShard):

    have -> want           steps
    x    -> x              none
    R    -> S(d) | IS      chunk (local, free)
    P    -> R              all_reduce
    P    -> S(d)           reduce_scatter_tensor
    P    -> IS             all_reduce, chunk
    S|IS -> R              all_gather_into_tensor
    S(a) -> S(b), a != b   all_to_all_single
    S|IS -> other S|IS     all_gather_into_tensor, chunk
    *    -> P              not expressible (an error naming both placements)

Never creates graph nodes or process groups: the table is data and arithmetic (and the two
tensor helpers of the flat shards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from meshc.errors import MeshError
from meshc.placement import Partial, Placement, Replicate, Shard, describe


def c10d():
    """torch's functional collectives (`_c10d_functional`), the ops every emitted collective calls;
    imported on first use (registering them costs start-up time)."""
    import torch.distributed._functional_collectives  # noqa: F401 - registers the ops

    return torch.ops._c10d_functional


#: collective -> the collective its backward runs (all-gather <-> reduce-scatter).
ADJOINT = {"all_reduce": "all_reduce", "all_gather_into_tensor": "reduce_scatter_tensor",
           "reduce_scatter_tensor": "all_gather_into_tensor", "all_to_all_single": "all_to_all_single"}

#: How a process-group backend implements a collective, where it is not natively: priced as that.
IMPLEMENTED_AS = {"gloo": {"reduce_scatter_tensor": "all_reduce"}}


@dataclass(frozen=True)
class Step:
    """One step of a redistribution. `op` is a collective name (`meshc.collectives.COLLECTIVES`)
    or 'chunk' (take this rank's block locally). `have`/`want`: the placements on `dim` before
    and after. `nbytes`: bytes as `collective_time` counts them (the full tensor on this dim for
    all_reduce / all_gather / reduce_scatter, the local operand for all_to_all); 0 for chunk."""

    op: str
    have: Placement
    want: Placement
    dim: str = ""
    nbytes: int = 0

    @property
    def is_collective(self) -> bool:
        return self.op != "chunk"


def shardable(size: object, n: int) -> bool:
    """Whether mesh size `n` may shard a tensor dim of `size` (a symbolic size: never)."""
    return isinstance(size, int) and size >= n and size % n == 0


def flat_shard(numel: int, n: int) -> tuple[int, int]:
    """(padded numel, numel per rank) of a tensor of `numel` elements flattened and sharded over
    `n` ranks; the padding (zeros, at the end) is what makes every size shardable."""
    size = -(-numel // n)
    return size * n, size


def pad_flat(t: torch.Tensor, numel: int) -> torch.Tensor:
    """`t` flattened and padded with zeros at the end to `numel` elements (`t` itself, flattened,
    when it already has them)."""
    flat = t.reshape(-1)
    return torch.nn.functional.pad(flat, (0, numel - flat.numel())) if numel > flat.numel() else flat


def flat_block(t: torch.Tensor, n: int, coord: int, view: bool = False) -> torch.Tensor:
    """Rank `coord`'s block of `t` flattened and sharded over `n` ranks (`flat_shard`): a padded
    copy, or with `view` a view into `t` (the last ranks' may be shorter: no padding held)."""
    padded, size = flat_shard(t.numel(), n)
    if view:
        return t.view(-1)[coord * size:(coord + 1) * size]
    return pad_flat(t.detach(), padded)[coord * size:(coord + 1) * size].clone()


def steps(have: Placement, want: Placement) -> list[Step]:
    """The table above, on one mesh dim."""
    if describe(have) == describe(want):
        return []
    if isinstance(want, Partial):
        raise MeshError(f"cannot redistribute a {describe(have)} tensor to Partial; only an op's output is Partial")
    if isinstance(have, Replicate):
        return [Step("chunk", have, want)]
    if isinstance(have, Partial):
        if isinstance(want, Replicate):
            return [Step("all_reduce", have, want)]
        if type(want) is Shard:
            return [Step("reduce_scatter_tensor", have, want)]
        return [Step("all_reduce", have, Replicate()), Step("chunk", Replicate(), want)]
    # have is a Shard (plain or interleaved)
    if isinstance(want, Replicate):
        return [Step("all_gather_into_tensor", have, want)]
    if type(have) is Shard and type(want) is Shard:
        return [Step("all_to_all_single", have, want)]
    return [Step("all_gather_into_tensor", have, Replicate()), Step("chunk", Replicate(), want)]


def _bytes(step: Step, full: float, n: int) -> int:
    """Bytes `step` moves when the tensor on this mesh dim has `full` bytes (other dims applied)."""
    if step.op == "all_to_all_single":
        return int(full // n)
    return 0 if step.op == "chunk" else int(full)


def plan_steps(have: Sequence[Placement], want: Sequence[Placement], shape: Sequence[int], itemsize: int,
               mesh) -> list[Step]:
    """Every step of changing tuple placement `have` into `want` (one placement per mesh dim),
    dim 0 first, as spmd_partition emits them. `shape`: the global shape (size hints)."""
    current = list(have)
    full_bytes = math.prod(shape) * itemsize
    out: list[Step] = []
    for i, (name, n) in enumerate(zip(mesh.names, mesh.sizes)):
        for s in steps(current[i], want[i]):
            others = math.prod(m for j, (p, m) in enumerate(zip(current, mesh.sizes))
                               if j != i and isinstance(p, Shard))
            on_dim = full_bytes / others
            out.append(Step(s.op, s.have, s.want, name, _bytes(s, on_dim, n)))
            current[i] = s.want
    return out


def step_time(step: Step, n: int, preset, nbytes: float | None = None) -> float:
    """Seconds for `step` over `n` ranks on `preset` (chunks are free: a local view)."""
    from meshc.cost_model import collective_time, get_preset

    if not step.is_collective:
        return 0.0
    p = get_preset(preset)
    op = IMPLEMENTED_AS.get(p.collective_backend, {}).get(step.op, step.op)
    return collective_time(op, step.nbytes if nbytes is None else nbytes, n, p)


def transition_time(have: Placement, want: Placement, full_bytes: float, n: int, preset) -> float:
    """Seconds to change `have` into `want` on one mesh dim of size `n` for a tensor of
    `full_bytes` on that dim (what auto_shard's strategies cost)."""
    return sum(step_time(s, n, preset, _bytes(s, full_bytes, n)) for s in steps(have, want))


def describe_steps(have: Placement, want: Placement) -> str:
    """'all_gather_into_tensor+chunk' — the collectives of one transition, for explanations."""
    return "+".join(s.op for s in steps(have, want) if s.is_collective)


__all__ = ["ADJOINT", "IMPLEMENTED_AS", "Step", "describe_steps", "flat_block", "flat_shard", "pad_flat",
           "plan_steps", "shardable",
           "step_time", "steps", "transition_time"]
