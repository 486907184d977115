"""meshc.backends.triton: lower a Program's ATen graph to generated, fused Triton kernels.

Entry point: `lower(program) -> LoweredProgram` (a callable on the flat user inputs, like every
backend), used by `meshc.backends.lower(program, "triton")`; `kernels(program)` returns the
kernels without running anything (what `meshc kernels MODEL` prints).

The flow, one module per step:

    regions.py    select_regions: pointwise chains, last-dim reductions, matmul + epilogue, attention
    ops.py        the op -> `tl` expression tables (one line per op) and which ops a kernel can take
    codegen.py    the body emitter shared by the templates, kernel names, provenance headers, blocks
    rowwise.py    template: pointwise / reduction kernels      matmul.py    template: matmul + epilogue
    attention.py  template: flash attention (SDPA)             loader.py    source file -> kernel
    lowering.py   regions -> kernels -> a new FX graph with one call per kernel

On a machine without CUDA the kernels run under the Triton interpreter (`TRITON_INTERPRET=1`):
that checks correctness, it is not fast; the notice goes into the Program's notes (the compile
report). The backend never changes the Program's graph: it lowers a clone.
"""

from __future__ import annotations

from meshc.program import Program

from .loader import import_triton
from .lowering import Kernel, LoweredProgram, lower_program

INTERPRETER_NOTICE = ("triton backend on CPU: kernels run under the Triton interpreter (TRITON_INTERPRET=1); "
                      "this checks correctness, it is not fast - use backend='aten' for speed on CPU")

__all__ = ["INTERPRETER_NOTICE", "Kernel", "LoweredProgram", "kernels", "lower", "uses_cuda"]


def uses_cuda(program: Program) -> bool:
    """Whether the Program's tensors (state, else example inputs) live on a CUDA device."""
    import torch

    tensors = list(program.state.values()) or [t for t in program.example_inputs[0] if isinstance(t, torch.Tensor)]
    return bool(tensors) and tensors[0].is_cuda


def lower(program: Program, interpret: bool | None = None) -> LoweredProgram:
    """Generate, load and wire the kernels; on CPU (or interpret=True) use the interpreter and say so
    in `program.notes`, with one line per ATen fallback reason kind."""
    import_triton()
    interpret = (not uses_cuda(program)) if interpret is None else interpret
    lowered = lower_program(program, interpret)
    notes = [lowered.summary()]
    if interpret:
        notes.append(INTERPRETER_NOTICE)
    reasons: dict[str, list[str]] = {}
    for node, reason in lowered.fallbacks:
        reasons.setdefault(reason, []).append(node)
    for reason, nodes in reasons.items():
        shown = ", ".join(f"%{n}" for n in nodes[:4]) + (f" (+{len(nodes) - 4} more)" if len(nodes) > 4 else "")
        notes.append(f"triton backend: left to ATen: {shown}: {reason}")
    program.notes[:] = [n for n in program.notes if not n.startswith("triton backend")] + notes
    return lowered


def kernels(program: Program, interpret: bool | None = None) -> list[Kernel]:
    """The kernels the backend generates for `program` (nothing is run)."""
    return lower(program, interpret).kernels
