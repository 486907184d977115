"""The attention template: `aten.scaled_dot_product_attention` as a flash-attention Triton kernel
(online softmax over key blocks; the [seq, seq] score matrix is never written to memory).

Few query rows over many keys (decode, tree verification: M ≤ 16) run as flash-decoding: the keys
are split into chunks across a third grid dim, so batch · heads programs become batch · heads ·
splits and a batch-1 decode step fills the GPU; each program writes its chunk's normalised output
and log-sum-exp, and a second kernel in the same source (`<name>_combine`) merges the chunks.

Entry point: `generate(region, name, interpret) -> (source, launcher_factory, input nodes)`.
Handles a boolean or additive float `attn_mask` of any broadcastable shape (read through its
strides), `is_causal` (top-left aligned, as eager), `scale`, and grouped-query attention
(`enable_gqa`: query head h reads key/value head h // (H / H_kv)). q, k, v are read through their
strides, so the transposed views the model makes need no copy. A row whose keys are all masked
gives NaN, as eager does. Dropout is not supported (`ops.classify` leaves it to ATen).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx as fx

from . import ops
from .codegen import cdiv, header, next_pow2
from .regions import Region, repeat_kv_source, sym_shape

_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _sdpa_args(node: fx.Node) -> dict:
    args = dict(zip(_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def generate(region: Region, name: str, interpret: bool) -> tuple[str, Callable, list[fx.Node]]:
    node = region.anchor
    a = _sdpa_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    k, v = ((repeat_kv_source(x) or (x,))[0] for x in (k, v))  # GQA: read the un-repeated heads
    if sym_shape(k)[-1] != sym_shape(v)[-1]:
        raise ValueError("key and value head dims differ")
    causal = bool(a.get("is_causal", False))
    mask_kind = None if mask is None else ("bool" if mask.meta["val"].dtype == torch.bool else "float")
    dtype = node.meta["val"].dtype
    prec = ', input_precision="ieee"' if dtype == torch.float32 else ""
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    mask_params = ["mask", "sm_b", "sm_h", "sm_m", "sm_n"] if mask is not None else []
    params = ["q", "k", "v", "out", "sq_b", "sq_h", "sq_m", "sq_d", "sk_b", "sk_h", "sk_n", "sk_d",
              "sv_b", "sv_h", "sv_n", "sv_d", "so_b", "so_h", "so_m", "so_d", *mask_params,
              "lse", "H", "M", "NK", "D", "GROUP", "scale", "CHUNK", "BLOCK_M: tl.constexpr",
              "BLOCK_N: tl.constexpr", "BLOCK_D: tl.constexpr", "SPLIT: tl.constexpr"]
    what = f"flash attention ({'causal, ' if causal else ''}{mask_kind or 'no'} mask)"
    score_lines = []
    if mask_kind:
        score_lines.append("        m_val = tl.load(mask + bi * sm_b + hi * sm_h + rm[:, None] * sm_m "
                           "+ rn[None, :] * sm_n, mask=(rm[:, None] < M) & (rn[None, :] < end), other=0)")
        score_lines.append("        valid = valid & (m_val != 0)" if mask_kind == "bool"
                           else "        s = s + m_val.to(tl.float32)")
    if causal:
        score_lines.append("        valid = valid & (rn[None, :] <= rm[:, None])")
    cast = "" if dtype == torch.float32 else f".to({ops.KERNEL_DTYPES[dtype]})"
    up = ".to(tl.float32)" if interpret and dtype == torch.bfloat16 else ""  # see matmul.py: interpreter bf16 dot
    lines = header(name, what, region, inputs, [node]) + [
        "@triton.jit",
        f"def {name}({', '.join(params)}):",
        "    pid_m = tl.program_id(0)",
        "    bh = tl.program_id(1)",
        "    bi = bh // H",
        "    hi = bh % H",
        "    kh = hi // GROUP",
        "    split = tl.program_id(2)",
        "    start = split * CHUNK",
        "    end = tl.minimum(start + CHUNK, NK)",
        "    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    rd = tl.arange(0, BLOCK_D)",
        "    q_t = tl.load(q + bi * sq_b + hi * sq_h + rm[:, None] * sq_m + rd[None, :] * sq_d, "
        "mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)",
        "    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)",
        "    l_i = tl.full([BLOCK_M], 0.0, tl.float32)",
        "    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)",
        "    for n0 in range(start, end, BLOCK_N):",
        "        rn = n0 + tl.arange(0, BLOCK_N)",
        "        k_t = tl.load(k + bi * sk_b + kh * sk_h + rn[None, :] * sk_n + rd[:, None] * sk_d, "
        "mask=(rn[None, :] < end) & (rd[:, None] < D), other=0.0)",
        f"        s = tl.dot(q_t{up}, k_t{up}{prec}) * scale",
        "        valid = rn[None, :] < end",
        *score_lines,
        "        s = tl.where(valid, s, float('-inf'))",
        "        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))",
        "        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)",
        "        p = tl.exp(s - m_safe[:, None])",
        "        alpha = tl.exp(m_i - m_safe)",
        "        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)",
        "        v_t = tl.load(v + bi * sv_b + kh * sv_h + rn[:, None] * sv_n + rd[None, :] * sv_d, "
        "mask=(rn[:, None] < end) & (rd[None, :] < D), other=0.0)",
        f"        acc = acc * alpha[:, None] + tl.dot(p{cast}{up}, v_t{up}{prec})",
        "        m_i = m_new",
        "    if SPLIT:  # this chunk's normalised output and log-sum-exp (fp32), merged by _combine",
        "        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]",
        "        po = out + ((bh * tl.num_programs(2) + split) * M + rm[:, None]) * BLOCK_D + rd[None, :]",
        "        tl.store(po, o, mask=(rm[:, None] < M) & (rd[None, :] < D))",
        "        tl.store(lse + (bh * tl.num_programs(2) + split) * M + rm, m_i + tl.log(l_i), mask=rm < M)",
        "    else:",
        "        o = acc / tl.where(rm < M, l_i, 1.0)[:, None]  # rows past M: no 0/0",
        "        tl.store(out + bi * so_b + hi * so_h + rm[:, None] * so_m + rd[None, :] * so_d, "
        f"o.to({ops.KERNEL_DTYPES[dtype]}), mask=(rm[:, None] < M) & (rd[None, :] < D))",
        "",
        "",
        "@triton.jit",
        f"def {name}_combine(part, lse, out, so_b, so_h, so_m, so_d, H, M, D, SPLITS, "
        "BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):",
        "    pid_m = tl.program_id(0)",
        "    bh = tl.program_id(1)",
        "    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    rd = tl.arange(0, BLOCK_D)",
        "    top = tl.full([BLOCK_M], float('-inf'), tl.float32)",
        "    for sp in range(0, SPLITS):",
        "        top = tl.maximum(top, tl.load(lse + (bh * SPLITS + sp) * M + rm, mask=rm < M, other=float('-inf')))",
        "    top_safe = tl.where(top == float('-inf'), 0.0, top)",
        "    total = tl.full([BLOCK_M], 0.0, tl.float32)",
        "    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)",
        "    for sp in range(0, SPLITS):",
        "        w = tl.exp(tl.load(lse + (bh * SPLITS + sp) * M + rm, mask=rm < M, other=float('-inf')) - top_safe)",
        "        o = tl.load(part + ((bh * SPLITS + sp) * M + rm[:, None]) * BLOCK_D + rd[None, :], "
        "mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)",
        "        acc = acc + w[:, None] * o",
        "        total = total + w",
        "    o = acc / tl.where(rm < M, total, 1.0)[:, None]  # all keys masked: 0/0 = NaN, as eager",
        "    tl.store(out + (bh // H) * so_b + (bh % H) * so_h + rm[:, None] * so_m + rd[None, :] * so_d, "
        f"o.to({ops.KERNEL_DTYPES[dtype]}), mask=(rm[:, None] < M) & (rd[None, :] < D))",
    ]
    scale = a.get("scale")
    source = "\n".join(lines) + "\n"

    def factory(kernel, interpret):
        from .loader import load_kernel

        combine = load_kernel(f"{name}_combine", source, interpret)
        return _launcher(kernel, combine, mask is not None, scale, interpret)

    return source, factory, inputs


#: flash-decoding: split the keys when there are at most this many query rows ...
SPLIT_MAX_ROWS = 16
#: ... into chunks of at least this many keys, until batch · heads · splits reaches TARGET_PROGRAMS
MIN_CHUNK = 128
TARGET_PROGRAMS = 256


def splits_for(batch_heads: int, m: int, nk: int) -> int:
    """How many key chunks a (batch · heads, M queries, NK keys) attention runs as (1: no split)."""
    if m > SPLIT_MAX_ROWS:
        return 1
    return max(1, min(cdiv(nk, MIN_CHUNK), cdiv(TARGET_PROGRAMS, batch_heads)))


def _launcher(kernel, combine, has_mask: bool, scale: float | None, interpret: bool) -> Callable:
    def launch(q, k, v, mask=None):
        batch, heads, m, d = q.shape
        nk = k.shape[2]
        out = torch.empty(batch, m, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # eager's layout
        if out.numel() == 0:
            return out
        group = heads // k.shape[1]
        sm = 1.0 / math.sqrt(d) if scale is None else scale
        bm = 64 if interpret else (64 if m >= 64 else 16)
        bn = 64
        bd = max(16, next_pow2(d))
        mask_args = [mask, *mask.expand(batch, heads, m, nk).stride()] if has_mask else []
        splits = splits_for(batch * heads, m, nk)
        chunk = cdiv(cdiv(nk, splits), bn) * bn  # keys per split, in whole key blocks
        splits = cdiv(nk, chunk)
        grid = (cdiv(m, bm), batch * heads, splits)
        if splits == 1:
            kernel[grid](q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_args,
                         out, heads, m, nk, d, group, sm, nk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SPLIT=False,
                         num_warps=4)
            return out
        part = torch.empty(batch * heads, splits, m, bd, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch * heads, splits, m, dtype=torch.float32, device=q.device)
        kernel[grid](q, k, v, part, *q.stride(), *k.stride(), *v.stride(), 0, 0, 0, 0, *mask_args,
                     lse, heads, m, nk, d, group, sm, chunk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SPLIT=True,
                     num_warps=4)
        combine[grid[:2]](part, lse, out, *out.stride(), heads, m, d, splits, BLOCK_M=bm, BLOCK_D=bd,
                          num_warps=4)
        return out

    return launch
