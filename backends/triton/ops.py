"""What each ATen op becomes inside a generated Triton kernel: the op -> `tl` expression tables.

Entry points: `POINTWISE` (one line per op: argument expressions -> a `tl` expression),
`REDUCTIONS` (reductions over the last dim, with their masked-lane neutral value), `COMPOSITE`
(ops that expand into a few lines: softmax, layer norm), `MATMUL_OPS`, `ATTENTION_OPS`,
`VIEW_OPS`, and `classify(node) -> (kind, reason)`, which says which kind of kernel a node can join
and, for an op the backend knows but cannot take here (a dtype, an exponent), why not.

Every value inside a kernel is computed in fp32; loads convert to fp32, stores convert to the
output's dtype, and a node whose dtype is fp16/bf16 is rounded to it (as eager would).
This module only describes ops; it never builds source files or touches the graph.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

aten = torch.ops.aten

#: dtypes a kernel may read or write; anything else stays an ATen node with the reason recorded.
KERNEL_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}
#: longest last dim a generated reduction keeps in one block (a persistent reduction)
MAX_ROW = 1 << 14


def _pow(x: str, e: float) -> str:
    if e == 2:
        return f"({x} * {x})"
    if e == 3:
        return f"({x} * {x} * {x})"
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == 1:
        return x
    if e == -1:
        return f"(1.0 / {x})"
    if e == -0.5:
        return f"(1.0 / tl.sqrt({x}))"
    raise ValueError(f"pow exponent {e!r} (supported: 2, 3, 0.5, 1, -1, -0.5)")


def _sigmoid(x: str) -> str:  # not tl.sigmoid: it is a @jit library function (see loader.py)
    return f"(1.0 / (1.0 + tl.exp(-{x})))"


def _tanh(x: str) -> str:  # tl has no tanh on every version: tanh(x) = 2*sigmoid(2x) - 1
    return f"(2.0 * {_sigmoid(f'2.0 * {x}')} - 1.0)"


def _gelu(x: str, approximate: str = "none") -> str:
    if approximate == "tanh":
        inner = f"{math.sqrt(2.0 / math.pi)!r} * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"(0.5 * {x} * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * {1.0 / math.sqrt(2.0)!r})))"


def _add(a: str, b: str, alpha: float = 1) -> str:
    return f"({a} + {b})" if alpha == 1 else f"({a} + {alpha!r} * {b})"


def _sub(a: str, b: str, alpha: float = 1) -> str:
    return f"({a} - {b})" if alpha == 1 else f"({a} - {alpha!r} * {b})"


def _clamp(x: str, lo: float | None = None, hi: float | None = None) -> str:
    if lo is not None:
        x = f"tl.maximum({x}, {float(lo)!r})"
    if hi is not None:
        x = f"tl.minimum({x}, {float(hi)!r})"
    return x


#: op -> expression builder. Arguments arrive as expression strings (tensors) or Python numbers.
POINTWISE = {
    aten.add.Tensor: _add,                                         # a + alpha*b
    aten.add.Scalar: _add,
    aten.sub.Tensor: _sub,                                         # a - alpha*b
    aten.sub.Scalar: _sub,
    aten.rsub.Scalar: lambda a, b, alpha=1: _sub(b, a, alpha),     # b - alpha*a
    aten.mul.Tensor: lambda a, b: f"({a} * {b})",
    aten.mul.Scalar: lambda a, b: f"({a} * {b})",
    aten.div.Tensor: lambda a, b: f"({a} / {b})",
    aten.div.Scalar: lambda a, b: f"({a} / {b})",
    aten.neg.default: lambda x: f"(-{x})",
    aten.reciprocal.default: lambda x: f"(1.0 / {x})",
    aten.exp.default: lambda x: f"tl.exp({x})",
    aten.log.default: lambda x: f"tl.log({x})",
    aten.sqrt.default: lambda x: f"tl.sqrt({x})",
    aten.rsqrt.default: lambda x: f"(1.0 / tl.sqrt({x}))",       # tl.rsqrt is approximate on GPUs
    aten.abs.default: lambda x: f"tl.abs({x})",
    aten.cos.default: lambda x: f"tl.cos({x})",
    aten.sin.default: lambda x: f"tl.sin({x})",
    aten.erf.default: lambda x: f"tl.erf({x})",
    aten.sigmoid.default: _sigmoid,
    aten.tanh.default: _tanh,
    aten.silu.default: lambda x: f"({x} * {_sigmoid(x)})",        # x * sigmoid(x)
    aten.relu.default: lambda x: f"tl.maximum({x}, 0.0)",
    aten.gelu.default: _gelu,                                      # erf or tanh form
    aten.pow.Tensor_Scalar: _pow,                                  # small fixed exponents only
    aten.maximum.default: lambda a, b: f"tl.maximum({a}, {b})",
    aten.minimum.default: lambda a, b: f"tl.minimum({a}, {b})",
    aten.clamp.default: _clamp,
    aten.clone.default: lambda x, memory_format=None: x,           # a copy: the value itself
    aten.alias.default: lambda x: x,
    aten._to_copy.default: lambda x, dtype=None, **_: x,           # float -> float: rounding added by codegen
}

#: reductions over the last dim (keepdim or not): op -> (combine function for tl.reduce, neutral value
#: for masked lanes). The combine functions are defined in every kernel file (loader.PRELUDE).
REDUCTIONS = {
    aten.sum.dim_IntList: ("_sum_combine", "0.0"),
    aten.mean.dim: ("_sum_combine", "0.0"),        # divided by N after the sum
    aten.amax.default: ("_max_combine", "float('-inf')"),
}

#: ops that expand to several lines, all over the last dim; codegen has one emitter per entry.
COMPOSITE = {aten._softmax.default: "softmax", aten.softmax.int: "softmax",
             aten._log_softmax.default: "log_softmax", aten.log_softmax.int: "log_softmax",
             aten.layer_norm.default: "layernorm"}

MATMUL_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default}
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
#: ops that only relabel memory: never a kernel, and lowered with reshape (see lowering.py)
VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
            aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.slice.Tensor}

#: short names used to name kernels after what they fuse
SHORT_NAMES = {aten.scaled_dot_product_attention.default: "flash_attention", aten._softmax.default: "softmax",
               aten._log_softmax.default: "log_softmax", aten.softmax.int: "softmax",
               aten.log_softmax.int: "log_softmax", aten.layer_norm.default: "layernorm",
               aten.linear.default: "mm", aten.addmm.default: "mm_bias", aten.mm.default: "mm",
               aten.bmm.default: "bmm", aten.clone.default: "copy", aten._to_copy.default: "cast",
               aten.pow.Tensor_Scalar: "pow", aten.amax.default: "max", aten.sum.dim_IntList: "sum"}


def short_name(node: fx.Node) -> str:
    return SHORT_NAMES.get(node.target) or getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _dtype_reason(node: fx.Node, skip_mask: bool = False) -> str | None:
    tensors = [node] + [a for a in node.all_input_nodes if _val(a) is not None]
    if skip_mask:  # attention: q, k, v and the output; a boolean or float mask is read as is
        tensors = [node, *node.args[:3]]
    for t in tensors:
        val = _val(t)
        if val is None:
            return f"%{t.name} has no tensor metadata"
        if val.dtype not in KERNEL_DTYPES:
            return (f"reads or writes dtype {str(val.dtype).removeprefix('torch.')}, which the Triton backend "
                    f"does not generate (float32/float16/bfloat16 only)")
    return None


def _last_dim(dims, ndim: int) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _scalar_args_ok(node: fx.Node) -> str | None:
    for a in [*node.args, *node.kwargs.values()]:
        if isinstance(a, fx.Node) and _val(a) is None:
            return f"argument %{a.name} is not a tensor (symbolic scalars are not passed to kernels)"
    return None


def classify(node: fx.Node) -> tuple[str | None, str | None]:
    """(kind, reason): kind is 'pointwise' | 'reduction' | 'matmul' | 'attention' | None (ATen).
    reason explains a None for an op the backend knows (it is recorded as a fallback)."""
    if node.op != "call_function":
        return None, None
    t = node.target
    known = t in POINTWISE or t in REDUCTIONS or t in COMPOSITE or t in MATMUL_OPS or t in ATTENTION_OPS
    if not known:
        return None, None
    reason = _dtype_reason(node, skip_mask=t in ATTENTION_OPS) or _scalar_args_ok(node)
    if reason:
        return None, reason
    if t in POINTWISE:
        if t is aten.pow.Tensor_Scalar:
            try:
                _pow("x", node.args[1])
            except ValueError as e:
                return None, str(e)
        if t is aten._to_copy.default and (set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}
                                           or _val(node.args[0]).device != _val(node).device):
            return None, "_to_copy to another device or with options beyond dtype"
        return "pointwise", None
    if t in REDUCTIONS:
        ndim = _val(node.args[0]).dim()
        if not _last_dim(node.args[1], ndim):
            return None, f"reduction over dims {node.args[1]} (only the last dim is generated)"
        if len(node.args) > 3 or node.kwargs.get("dtype") is not None:
            return None, "reduction with a dtype argument"
        return "reduction", None
    last = _val(node.args[0]).shape[-1] if _val(node.args[0]) is not None and _val(node.args[0]).dim() else 1
    if (t in REDUCTIONS or t in COMPOSITE) and isinstance(last, int) and last > MAX_ROW:
        return None, f"reduction over a last dim of {last} > {MAX_ROW} (a generated reduction keeps a row in one block)"
    if t in COMPOSITE:
        ndim = _val(node.args[0]).dim()
        if t is aten.layer_norm.default:
            if len(node.args[1]) != 1:
                return None, f"layer_norm over {len(node.args[1])} dims (only the last dim is generated)"
        elif not _last_dim(node.args[1], ndim) or (node.args[2:] or [None])[0] not in (None, False):
            return None, "softmax over another dim than the last, or with a dtype / half_to_float"
        return "reduction", None
    if t in MATMUL_OPS:
        if t is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            return None, "addmm with beta/alpha != 1"
        if t is aten.linear.default and _val(node.args[0]).dim() < 2:
            return None, "linear on a 1-d input"
        if t is aten.matmul.default:
            ranks = (_val(node.args[0]).dim(), _val(node.args[1]).dim())
            if not (ranks[0] >= 2 and ranks[1] == 2) and ranks != (3, 3):
                return None, f"matmul of ranks {ranks} (generated: [..., K] @ [K, N] and 3-d @ 3-d)"
        return "matmul", None
    if t in ATTENTION_OPS:
        if (node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)) != 0.0:
            return None, "attention with dropout"
        q, k = _val(node.args[0]), _val(node.args[1])
        if q.dim() != 4 or k.dim() != 4:
            return None, "attention on tensors that are not [batch, heads, seq, head_dim]"
        return "attention", None
    return None, None
