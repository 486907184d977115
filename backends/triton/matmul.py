"""The matmul template: `aten.linear / addmm / mm / bmm / matmul` as one tiled Triton kernel whose epilogue
slot is filled by the same body emitter as every other kernel (bias, activation, SwiGLU gating
`silu(a) * b`, residual add, casts), so the matmul's output is written once, already finished.

Entry point: `generate(region, name, interpret) -> (source, launcher_factory, input nodes)`. Operands are
addressed by strides (`linear`'s weight [N, K] is read transposed in place); K tails are masked.
On CUDA the kernel is autotuned over a few tile configs (`AUTOTUNE_CONFIGS`); under the
interpreter it uses one large tile. fp32 operands use `input_precision="ieee"` (no TF32), so
results match eager fp32 within 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from . import ops
from .codegen import Body, cdiv, header, index_lines, next_pow2, offset
from .regions import Region

aten = torch.ops.aten

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried by triton.autotune on a GPU
AUTOTUNE_CONFIGS = [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                    (128, 256, 64, 8, 3), (32, 64, 64, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 8, 3),
                    (16, 32, 256, 2, 4)]  # the last ones for decode (M = 1): more column tiles in flight


def _operands(node: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """([a, b], bias) of a matmul node, in the op's own argument order."""
    t, args = node.target, node.args
    if t is aten.linear.default:
        return [args[0], args[1]], (args[2] if len(args) > 2 else None)
    if t is aten.addmm.default:
        return [args[1], args[2]], args[0]
    return [args[0], args[1]], None


def generate(region: Region, name: str, interpret: bool) -> tuple[str, Callable, list[fx.Node]]:
    autotune = not interpret
    mm = region.anchor
    (a, b), bias = _operands(mm)
    body = Body(region, provided={mm: "v_mm"})
    nd = len(region.shape)
    operands = [a, b] + ([bias] if bias is not None else [])
    dtype = mm.meta["val"].dtype
    precision = ', input_precision="ieee"' if dtype == torch.float32 else ""
    # Triton 3.9's interpreter multiplies bf16 tiles wrongly (tl.dot on raw bits); products of bf16
    # values are exact in fp32, so reading them as fp32 there computes what the GPU computes
    up = ".to(tl.float32)" if interpret and dtype == torch.bfloat16 else ""
    bias_args = [f"bias_s{d}" for d in range(nd)] if bias is not None else []
    params = ["a", "b", *(["bias"] if bias is not None else []), *body.args(), *bias_args,
              "M", "N", "K", "sa_b", "sa_m", "sa_k", "sb_b", "sb_k", "sb_n", *[f"size{d}" for d in range(1, nd - 1)],
              "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr", "GROUP_M: tl.constexpr"]
    epilogue = [n.name for n in region.nodes[1:]]
    what = f"matmul ({mm.target}) with epilogue [{', '.join(epilogue)}]" if epilogue else f"matmul ({mm.target})"
    deco = ["@triton.autotune(configs=[" + ", ".join(
        f"triton.Config({{'BLOCK_M': {m}, 'BLOCK_N': {n}, 'BLOCK_K': {k}}}, num_warps={w}, num_stages={s})"
        for m, n, k, w, s in AUTOTUNE_CONFIGS) + "], key=['M', 'N', 'K'])"] if autotune else []
    lines = header(name, what, region, operands + body.inputs, body.outputs) + deco + [
        "@triton.jit",
        f"def {name}({', '.join(params)}):",
        "    # grouped tile order: GROUP_M row-tiles share each column of B while it is in L2",
        "    n_tiles_m = (M + BLOCK_M - 1) // BLOCK_M",
        "    n_tiles_n = (N + BLOCK_N - 1) // BLOCK_N",
        "    pid = tl.program_id(0)",
        "    first_m = (pid // (GROUP_M * n_tiles_n)) * GROUP_M",
        "    group_m = tl.minimum(n_tiles_m - first_m, GROUP_M)",
        "    pid_m = first_m + (pid % (GROUP_M * n_tiles_n)) % group_m",
        "    pid_n = (pid % (GROUP_M * n_tiles_n)) // group_m",
        "    pid_b = tl.program_id(2)",
        "    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "    rk = tl.arange(0, BLOCK_K)",
        "    a_ptrs = a + pid_b * sa_b + rm[:, None] * sa_m + rk[None, :] * sa_k",
        "    b_ptrs = b + pid_b * sb_b + rk[:, None] * sb_k + rn[None, :] * sb_n",
        "    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)",
        "    for k0 in range(0, K, BLOCK_K):",
        "        a_t = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)",
        "        b_t = tl.load(b_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)",
        f"        acc += tl.dot(a_t{up}, b_t{up}{precision})",
        "        a_ptrs += BLOCK_K * sa_k",
        "        b_ptrs += BLOCK_K * sb_k",
        "    # epilogue: rows index the flattened leading dims of the output",
        "    rows = pid_b * M + rm[:, None]",
        "    cols = rn[None, :]",
        "    rmask = rm[:, None] < M",
        "    mask = rmask & (cols < N)",
        *[f"    {line}" for line in index_lines(nd)],
        "    v_mm = acc",
    ]
    if bias is not None:
        bias_at = offset("bias", nd, True)
        lines.append(f"    v_mm = v_mm + tl.load(bias + {bias_at}, mask=mask, other=0.0).to(tl.float32)")
    if dtype != torch.float32:
        lines.append(f"    v_mm = v_mm.to({ops.KERNEL_DTYPES[dtype]}).to(tl.float32)  # round as eager")
    lines += [f"    {line}" for line in body.lines()]
    factory = lambda kernel, interpret: _launcher(kernel, mm, body, bias is not None, autotune)  # noqa: E731
    return "\n".join(lines) + "\n", factory, operands + body.inputs


def _launcher(kernel, mm: fx.Node, body: Body, has_bias: bool, autotune: bool) -> Callable:
    op = mm.target
    out_dtypes = [o.meta["val"].dtype for o in body.outputs]
    n_ops = 3 if has_bias else 2

    def launch(*inputs: torch.Tensor):
        a, b = inputs[0], inputs[1]
        bias, epi = (inputs[2] if has_bias else None), inputs[n_ops:]
        if op is aten.bmm.default or (op is aten.matmul.default and b.dim() == 3):
            batch, m, k = a.shape
            n = b.shape[2]
            f = (batch, m, n)
            sa, sb = a.stride(), b.stride()
        else:
            if op is aten.linear.default or op is aten.matmul.default:
                f = (*a.shape[:-1], b.shape[0] if op is aten.linear.default else b.shape[1])
                a = a.reshape(-1, a.shape[-1])
                b = b.t() if op is aten.linear.default else b  # linear: [K, N] view of the weight, never copied
            else:
                f = (a.shape[0], b.shape[1])
            batch, (m, k), n = 1, a.shape, b.shape[1]
            sa, sb = (0, *a.stride()), (0, *b.stride())
        outs = [torch.empty(f, dtype=dt, device=a.device) for dt in out_dtypes]
        if m == 0 or n == 0:
            return outs[0] if len(outs) == 1 else tuple(outs)
        strides = [s for t in epi for s in t.expand(f).stride()]
        strides += [s for o in outs for s in o.stride()]
        strides += list(bias.expand(f).stride()) if has_bias else []
        extra = {}
        if not autotune:
            bm, bn, bk = (max(16, min(next_pow2(x), cap)) for x, cap in ((m, 64), (n, 128), (k, 128)))
            extra = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4}
        extra["GROUP_M"] = 8

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), 1, batch)

        kernel[grid](a, b, *([bias] if has_bias else []), *epi, *outs, *strides, m, n, k, *sa, *sb, *f[1:-1], **extra)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return launch
