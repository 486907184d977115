"""meshc.backends: lower a Program's graph to something that runs.

Entry point: `lower(program, backend) -> (callable, backend_name)`. Backends see only the
Program. `"auto"` picks Triton on CUDA once the Triton backend exists, else ATen.
"""

from __future__ import annotations

from collections.abc import Callable

from meshc.errors import MeshcError
from meshc.program import Program

BACKENDS = ("auto", "aten")


def lower(program: Program, backend: str = "auto") -> tuple[Callable[[list], tuple], str]:
    if backend not in BACKENDS:
        raise MeshcError(f"unknown backend {backend!r}; this build has: {', '.join(BACKENDS)}"
                         + (" (the Triton backend is not built yet)" if backend == "triton" else ""))
    from meshc.backends import aten

    return aten.lower(program), "aten"
