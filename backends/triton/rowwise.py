"""The row-wise kernel template: pointwise chains and last-dim reductions (RMSNorm, LayerNorm,
softmax, mean/sum/amax) with their prologue and epilogue, as one generated Triton kernel.

Entry point: `generate(region, name, interpret) -> (source, launcher_factory, input nodes)`. The iteration shape F is
`[*lead, N]`; a program handles `BLOCK_M` rows x `BLOCK_N` columns. A region with a reduction keeps
the whole row in one block (a persistent reduction, N <= ops.MAX_ROW); a pointwise region also tiles
the columns. The launcher reads sizes and strides from the tensors it is given at each call, so
dynamic batch and sequence sizes need no recompilation of the Python side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from .codegen import Body, cdiv, header, index_lines, row_blocks
from .ops import MAX_ROW
from .regions import Region


def generate(region: Region, name: str, interpret: bool) -> tuple[str, Callable, list[fx.Node]]:
    body = Body(region)
    if region.shape[-1] != 1 and "full" not in body.input_kinds:
        raise ValueError("no input spans the last dim, so its size is unknown at run time")
    nd = len(region.shape)
    sizes = [f"size{d}" for d in range(1, nd - 1)]
    what = "reduction over the last dim" if region.kind == "reduction" else "pointwise"
    params = ", ".join([*body.args(), "n_rows", "N", *sizes, "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"])
    lines = header(name, what, region, body.inputs, body.outputs) + [
        "@triton.jit",
        f"def {name}({params}):",
        "    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]",
        "    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]",
        "    rmask = rows < n_rows",
        "    mask = rmask & (cols < N)",
        *[f"    {line}" for line in index_lines(nd)],
        *[f"    {line}" for line in body.lines()],
    ]
    return "\n".join(lines) + "\n", lambda kernel, interpret: _launcher(kernel, body, region, interpret), body.inputs


def _out_shape(kind: str, f: torch.Size) -> tuple:
    return tuple(f) if kind == "full" else (*f[:-1], 1) if kind == "row" else tuple(f[:-1])


def _launcher(kernel, body: Body, region: Region, interpret: bool) -> Callable:
    whole_row = region.kind == "reduction"
    out_dtypes = [o.meta["val"].dtype for o in body.outputs]
    ndim = len(region.shape)

    def launch(*inputs: torch.Tensor):
        f = torch.broadcast_shapes(*(t.shape for t in inputs))
        if len(f) < ndim:
            f = torch.Size((1,) * (ndim - len(f)) + tuple(f))
        device = inputs[0].device
        outs = [torch.empty(_out_shape(kind, f), dtype=dt, device=device)
                for kind, dt in zip(body.output_kinds, out_dtypes)]
        n = f[-1]
        n_rows = f.numel() // n if n else 0
        if n_rows and n:
            if whole_row and n > MAX_ROW:
                raise RuntimeError(f"{kernel_name_of(kernel)}: last dim {n} > {MAX_ROW}, too long for one block")
            bm, bn, warps = row_blocks(n_rows, n, whole_row, interpret)
            strides = [s for t in inputs for s in t.expand(f).stride()]
            strides += [s for o in outs for s in o.reshape(_out_shape("row", f) if o.dim() < ndim else o.shape)
                        .expand(f).stride()]
            grid = (cdiv(n_rows, bm), cdiv(n, bn))
            kernel[grid](*inputs, *outs, *strides, n_rows, n, *f[1:-1], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return launch


def kernel_name_of(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", "kernel")
