"""Mesh specifications: the named device grid a Program is compiled for.

Entry point: `MeshSpec.parse(mesh)`, accepting None (one device), a shorthand string such as
`"tp=2"` or `"dp=2,tp=2"` (dims outermost first), a `MeshSpec`, or a torch `DeviceMesh`.

A MeshSpec owns the mesh's meaning, as pure data: the dims' roles (`DP`, `TP`, `PP`: data,
tensor and pipeline parallel; `spec.tp` is the tp size, 1 without such a dim), rank <-> mesh
coordinates (`coords`, `coord`, `rank_of`) and the name under which a program's collectives refer
to a dim's process group (`group_name`; `meshc.runtime.mesh` binds it). No other module spells a
dim name or re-derives coordinates. Creating process groups is the runtime's job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from meshc.errors import MeshError

DP, TP, PP = "dp", "tp", "pp"
#: Dim names with a meaning meshc knows: data, tensor, pipeline, sequence and expert parallel.
KNOWN_DIMS = (DP, TP, PP, "sp", "ep")
_DIM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class MeshSpec:
    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    def dim_size(self, name: str) -> int:
        """Size of dim `name`; 1 if the mesh has no such dim."""
        return self.sizes[self.names.index(name)] if name in self.names else 1

    @property
    def dp(self) -> int:
        return self.dim_size(DP)

    @property
    def tp(self) -> int:
        return self.dim_size(TP)

    @property
    def pp(self) -> int:
        return self.dim_size(PP)

    @property
    def tp_index(self) -> int | None:
        """The mesh dim used for tensor parallelism: 'tp', else the only dim that is neither 'dp' nor 'pp'."""
        if TP in self.names:
            return self.names.index(TP)
        others = [i for i, n in enumerate(self.names) if n not in (DP, PP)]
        return others[0] if len(others) == 1 else None

    def index(self, name: str) -> int | None:
        """Position of dim `name` in the mesh (outermost first), or None."""
        return self.names.index(name) if name in self.names else None

    def coord(self, rank: int, name: str) -> int:
        """The coordinate of `rank` along dim `name` (0 if the mesh has no such dim)."""
        i = self.index(name)
        return 0 if i is None else self.coords(rank)[i]

    def rank_of(self, coords: tuple[int, ...] | list[int]) -> int:
        """Inverse of `coords`."""
        rank = 0
        for c, n in zip(coords, self.sizes):
            rank = rank * n + c
        return rank

    def with_coord(self, rank: int, name: str, value: int) -> int:
        """The rank that has `rank`'s coordinates except `value` along dim `name`."""
        coords = list(self.coords(rank))
        coords[self.names.index(name)] = value
        return self.rank_of(coords)

    def group_name(self, dim: int | str) -> str:
        """How a program's collectives name the process group of mesh dim `dim` (index or name):
        'tp@dp=2,tp=2' — the dim, qualified by the mesh, so two meshes never share a name."""
        name = self.names[dim] if isinstance(dim, int) else dim
        return f"{name}@{self}"

    @staticmethod
    def dim_of_group(group_name: str) -> str:
        """The mesh dim a collective's group name refers to ('tp@dp=2,tp=2' -> 'tp')."""
        return group_name.split("@", 1)[0]

    def coords(self, rank: int) -> tuple[int, ...]:
        """Mesh coordinates of a global rank (row-major, outermost dim first), as DeviceMesh lays them out."""
        out = []
        for s in reversed(self.sizes):
            out.append(rank % s)
            rank //= s
        return tuple(reversed(out))

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in zip(self.names, self.sizes)) or "single device"

    @classmethod
    def parse(cls, mesh: Any) -> MeshSpec:
        if mesh is None:
            return cls((), ())
        if isinstance(mesh, MeshSpec):
            return mesh
        if isinstance(mesh, str):
            return cls._parse_string(mesh)
        if type(mesh).__name__ == "DeviceMesh":
            names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
            return cls(tuple(names), tuple(int(s) for s in mesh.mesh.shape))
        raise MeshError(
            f"mesh must be None, a string like 'tp=2' or 'dp=2,tp=2', or a torch DeviceMesh; "
            f"got {type(mesh).__name__}"
        )

    @classmethod
    def _parse_string(cls, text: str) -> MeshSpec:
        names, sizes = [], []
        for part in text.split(","):
            m = _DIM.match(part)
            if not m:
                raise MeshError(
                    f"cannot parse mesh dim {part.strip()!r} in {text!r}: write NAME=SIZE, "
                    f"e.g. 'tp=2' or 'dp=2,tp=2' (known dims: {', '.join(KNOWN_DIMS)})"
                )
            name, size = m.group(1), int(m.group(2))
            if name in names:
                raise MeshError(f"mesh {text!r} names dim {name!r} twice")
            if size < 1:
                raise MeshError(f"mesh {text!r}: dim {name!r} has size {size}; sizes must be >= 1")
            names.append(name)
            sizes.append(size)
        return cls(tuple(names), tuple(sizes))
