"""The placement vocabulary: how one tensor is laid out over one mesh dim. Defined here only.

Entry points: `Shard(d)`, `Replicate()`, `Partial()` (PyTorch's DTensor classes, so plans read
and interoperate like DTensor's), `InterleavedShard(d, groups)` for fused projections, and
`local_shape` / `local_shard` (what one rank holds of a full tensor). A tensor's layout on a
mesh is a tuple with one placement per mesh dim, outermost dim first.

`InterleavedShard(d, groups)`: dim `d` is `groups` equal blocks (GPT-2's fused `c_attn` is
q|k|v) and each block is sharded on its own, so rank r holds block-slice r of every block.
Splitting the local tensor into `groups` parts gives each rank its shard of q, k and v.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from meshc.errors import SpecError
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

__all__ = ["InterleavedShard", "Partial", "Placement", "Replicate", "Shard", "describe", "local_shape",
           "local_shard", "parse_placement"]


class InterleavedShard(Shard):
    """Shard(dim) of each of `groups` equal blocks along `dim` (fused q|k|v projections)."""

    def __init__(self, dim: int, groups: int):
        super().__init__(dim)
        object.__setattr__(self, "groups", groups)

    def __eq__(self, other: object) -> bool:
        return type(other) is InterleavedShard and (self.dim, self.groups) == (other.dim, other.groups)

    def __hash__(self) -> int:
        return hash(("InterleavedShard", self.dim, self.groups))

    def __repr__(self) -> str:
        return f"InterleavedShard(dim={self.dim}, groups={self.groups})"

    __str__ = __repr__


def describe(p: Placement) -> str:
    """Short, stable text for a placement: 'S(0)', 'R', 'P', 'IS(1,3)' (plan JSON uses it)."""
    if isinstance(p, InterleavedShard):
        return f"IS({p.dim},{p.groups})"
    if isinstance(p, Shard):
        return f"S({p.dim})"
    if isinstance(p, Partial):
        return "P"
    return "R"


def parse_placement(text: str) -> Placement:
    """Inverse of `describe`: 'R', 'P', 'S(d)' or 'IS(d,groups)'. Anything else is a SpecError."""
    t = text.strip()
    if t == "R":
        return Replicate()
    if t == "P":
        return Partial()
    try:
        if t.startswith("IS(") and t.endswith(")"):
            d, g = (int(x) for x in t[3:-1].split(","))
            return InterleavedShard(d, g)
        if t.startswith("S(") and t.endswith(")"):
            return Shard(int(t[2:-1]))
    except ValueError:  # S(x), IS(1): a number missing or not an integer
        pass
    raise SpecError(f"cannot parse placement {text!r}; expected R, P, S(d) or IS(d,groups), e.g. 'S(0)'")


def local_shape(shape: Sequence[int], placements: Sequence[Placement], mesh_sizes: Sequence[int]) -> list[int]:
    """The shape one rank holds. Sharded sizes must divide evenly (checked by the plan)."""
    out = list(shape)
    for p, n in zip(placements, mesh_sizes):
        if isinstance(p, Shard):
            out[p.dim] //= n
    return out


def local_shard(full: torch.Tensor, placements: Sequence[Placement], coords: Sequence[int],
                mesh_sizes: Sequence[int]) -> torch.Tensor:
    """The slice of `full` that the rank at mesh coordinates `coords` holds (a view when possible)."""
    out = full
    for p, c, n in zip(placements, coords, mesh_sizes):
        if isinstance(p, InterleavedShard):
            blocks = out.chunk(p.groups, dim=p.dim)
            out = torch.cat([b.chunk(n, dim=p.dim)[c] for b in blocks], dim=p.dim)
        elif isinstance(p, Shard):
            out = out.chunk(n, dim=p.dim)[c]
        elif isinstance(p, Partial):
            raise ValueError("a stored tensor cannot be Partial; use Replicate or Shard")
    return out
