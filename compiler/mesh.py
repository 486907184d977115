"""Mesh specifications: the named device grid a Program is compiled for.

Entry point: `MeshSpec.parse(mesh)`, accepting None (one device), a shorthand string such as
`"tp=2"` or `"dp=2,tp=2"` (dims outermost first), a `MeshSpec`, or a torch `DeviceMesh`. A
MeshSpec is pure data (names and sizes); creating process groups is the runtime's job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from meshc.errors import MeshError

#: Dim names with a meaning meshc knows: data, tensor, pipeline, sequence and expert parallel.
KNOWN_DIMS = ("dp", "tp", "pp", "sp", "ep")
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
