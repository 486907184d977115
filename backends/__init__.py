"""meshc.backends: lower a Program's graph to something that runs.

Entry point: `lower(program, backend) -> (callable, backend_name)`. Backends see only the
Program. `"auto"` picks Triton when the Program's tensors are on CUDA (and Triton imports), else
ATen; `"triton"` on a CPU runs the generated kernels under the Triton interpreter (correctness,
not speed; the Program's notes say so).
"""

from __future__ import annotations

from collections.abc import Callable

from meshc.errors import MeshcError
from meshc.program import Program

BACKENDS = ("auto", "aten", "triton")


def lower(program: Program, backend: str = "auto") -> tuple[Callable[[list], tuple], str]:
    if backend not in BACKENDS:
        raise MeshcError(f"unknown backend {backend!r}; this build has: {', '.join(BACKENDS)}")
    if backend == "auto":
        from meshc.backends.triton import uses_cuda

        backend = "triton" if uses_cuda(program) and _triton_importable() else "aten"
    if backend == "triton":
        from meshc.backends import triton

        return triton.lower(program), "triton"
    from meshc.backends import aten

    return aten.lower(program), "aten"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any broken install means: not usable
        return False
    return True
