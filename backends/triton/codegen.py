"""Shared code generation: the kernel body emitter, kernel names, provenance headers, block sizes.

Entry points: `Body` (emits the loads, one `tl` line per FX node from the `ops` tables, and the
stores of a region over a `rows x cols` tile), `kernel_name(region, index)`, `header(...)`, and
`row_blocks(...)`. The templates (`rowwise.py`, `matmul.py`, `attention.py`) put a Body inside
their loops; nothing here knows about a particular template, and nothing here runs a kernel.

Index math: a tile holds `rows` (flattened leading dims of the iteration shape F, `[BM, 1]`) and
`cols` (F's last dim, `[1, BN]`). Leading indices come from `rows` by div/mod over the runtime
sizes; every tensor is addressed through its own runtime strides, so broadcasting (stride 0),
transposed views and non-power-of-two tails (masks) need no special cases.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.fx as fx
from meshc.program import source_line

from . import ops
from .regions import Region, sym_shape, value_kind


def literal(v) -> str:
    """A Python number as Triton source."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and not math.isfinite(v):
        return "float('nan')" if math.isnan(v) else ("float('inf')" if v > 0 else "float('-inf')")
    return repr(v)


class _Num(float):
    """A float that formats as a Triton literal, so table lambdas can both compare and print it."""

    def __format__(self, spec: str) -> str:
        return literal(float(self))

    __str__ = __repr__ = lambda self: literal(float(self))


def _arg(v, expr_of):
    if isinstance(v, fx.Node):
        return expr_of(v)
    if isinstance(v, float):
        return _Num(v)
    return v


def index_lines(ndim: int) -> list[str]:
    """Leading indices i0..i{ndim-2} from `rows` (sizes size1..size{ndim-2} are kernel arguments)."""
    if ndim <= 1:
        return []
    lines, var = [], "rows"
    for d in range(ndim - 2, 0, -1):
        lines += [f"i{d} = {var} % size{d}", f"r{d} = {var} // size{d}"]
        var = f"r{d}"
    return [*lines, f"i0 = {var}"]


def offset(prefix: str, ndim: int, full: bool) -> str:
    """Element offset of tensor `prefix` at (i0.., cols) through its strides `{prefix}_s{d}`."""
    terms = [f"i{d} * {prefix}_s{d}" for d in range(ndim - 1)]
    if full:
        terms.append(f"cols * {prefix}_s{ndim - 1}")
    return " + ".join(terms) or "0"


class Body:
    """Loads, node expressions and stores of one region over a tile; collects kernel arguments."""

    def __init__(self, region: Region, provided: dict[fx.Node, str] | None = None):
        self.region = region
        self.ndim = len(region.shape)
        self.provided = dict(provided or {})  # nodes whose value the template computes (matmul: acc)
        members = set(region.nodes)
        skip = set(self.provided)
        self.inputs = [a for n in region.nodes if n not in skip for a in n.all_input_nodes if a not in members]
        self.inputs = list(dict.fromkeys(self.inputs))
        self.input_kinds = [value_kind(region, a) for a in self.inputs]
        self.outputs = region.outputs()
        self.output_kinds = [self._out_kind(o) for o in self.outputs]

    def _out_kind(self, node: fx.Node) -> str:
        shape = sym_shape(node)
        if value_kind(self.region, node) == "full":
            return "full"
        return "row" if len(shape) == self.ndim else "row_nokeep"

    def args(self) -> list[str]:
        """Pointer and stride arguments, inputs then outputs."""
        names = [f"in{k}" for k in range(len(self.inputs))] + [f"out{j}" for j in range(len(self.outputs))]
        strides = [f"{p}_s{d}" for p in names for d in range(self.ndim)]
        return names + strides

    def lines(self) -> list[str]:
        out = []
        var = {}
        for k, (node, kind) in enumerate(zip(self.inputs, self.input_kinds)):
            m = "mask" if kind == "full" else "rmask"
            out.append(f"x{k} = tl.load(in{k} + {offset(f'in{k}', self.ndim, kind == 'full')}, mask={m}, "
                       f"other=0.0).to(tl.float32)  # %{node.name}")
            var[node] = f"x{k}"
        var.update(self.provided)

        def expr_of(n: fx.Node) -> str:
            return var[n]

        for node in self.region.nodes:
            if node in self.provided:
                continue
            name = f"v_{node.name}"
            out += [f"{line}" for line in self._node_lines(node, name, expr_of)]
            dtype = node.meta["val"].dtype
            if dtype != torch.float32:
                out.append(f"{name} = {name}.to({ops.KERNEL_DTYPES[dtype]}).to(tl.float32)  # round as eager")
            var[node] = name
        for j, (node, kind) in enumerate(zip(self.outputs, self.output_kinds)):
            m = "mask" if kind == "full" else "rmask"
            tl_dtype = ops.KERNEL_DTYPES[node.meta["val"].dtype]
            out.append(f"tl.store(out{j} + {offset(f'out{j}', self.ndim, kind == 'full')}, "
                       f"{var[node]}.to({tl_dtype}), mask={m})  # %{node.name}")
        return out

    def _node_lines(self, node: fx.Node, name: str, expr_of) -> list[str]:
        t = node.target
        args = [_arg(a, expr_of) for a in node.args]
        kwargs = {k: _arg(v, expr_of) for k, v in node.kwargs.items()}
        if t in ops.POINTWISE:
            return [f"{name} = {ops.POINTWISE[t](*args, **kwargs)}  # {ops.short_name(node)}"]
        if t in ops.REDUCTIONS:
            fn, neutral = ops.REDUCTIONS[t]
            red = f"tl.reduce(tl.where(mask, {args[0]}, {neutral}), 1, {fn})[:, None]"
            return [f"{name} = {red}{' / N' if t is ops.aten.mean.dim else ''}  # {ops.short_name(node)}"]
        kind = ops.COMPOSITE[t]
        x = args[0]
        if kind in ("softmax", "log_softmax"):
            lines = [f"{name}_max = tl.reduce(tl.where(mask, {x}, float('-inf')), 1, _max_combine)[:, None]",
                     f"{name}_max = tl.where(rmask, {name}_max, 0.0)",
                     f"{name}_exp = tl.where(mask, tl.exp({x} - {name}_max), 0.0)",
                     f"{name}_sum = tl.reduce({name}_exp, 1, _sum_combine)[:, None]"]
            last = (f"{name} = {name}_exp / {name}_sum" if kind == "softmax"
                    else f"{name} = {x} - {name}_max - tl.log({name}_sum)")
            return [*lines, f"{last}  # {kind}"]
        # layer_norm(x, [N], weight, bias, eps)
        weight, bias = (args + [None, None, None])[2:4]
        eps = _Num(float(args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)))
        y = f"{name}_xc * (1.0 / tl.sqrt({name}_var + {eps}))"
        y = f"{y} * {weight}" if weight is not None else y
        y = f"{y} + {bias}" if bias is not None else y
        return [f"{name}_mean = tl.reduce(tl.where(mask, {x}, 0.0), 1, _sum_combine)[:, None] / N",
                f"{name}_xc = tl.where(mask, {x} - {name}_mean, 0.0)",
                f"{name}_var = tl.reduce({name}_xc * {name}_xc, 1, _sum_combine)[:, None] / N",
                f"{name} = {y}  # layernorm"]


# ---- names and provenance ----------------------------------------------------------------------
_PATTERNS = [  # (label, ops it consumes): the first pattern whose ops are all present names the kernel
    ("rmsnorm", Counter({"pow": 1, "mean": 1, "add": 1, "rsqrt": 1, "mul": 1})),
    ("gelu", Counter({"mul": 4, "pow": 1, "add": 2, "tanh": 1})),  # GPT-2's tanh GELU, spelled out
]


def kernel_name(region: Region, index: int) -> str:
    names = [ops.short_name(n) for n in region.nodes]
    counts = Counter(names)
    label = []
    for pattern_label, needed in _PATTERNS:
        if all(counts[k] >= v for k, v in needed.items()):
            counts -= needed
            label.append(pattern_label)
    rest = []
    for n in names:  # keep first-use order of what the patterns did not consume
        if counts[n] > 0:
            counts[n] -= 1
            if n not in rest:
                rest.append(n)
    parts = (label + rest)[:4]
    return f"triton_{'_'.join(parts)}_{index}"


def _fmt_shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "?"
    return f"{str(val.dtype).removeprefix('torch.')}[{', '.join(str(d) for d in val.shape)}]"


def header(name: str, what: str, region: Region, inputs: list[fx.Node], outputs: list[fx.Node]) -> list[str]:
    """The comment block each kernel starts with: what it fuses, from which source lines, its I/O."""
    lines = [f"# {name}: {what}, iteration shape [{', '.join(str(d) for d in region.shape)}]",
             f"# fuses {len(region.nodes)} FX node(s):"]
    lines += [f"#   %{n.name} = {n.target}" for n in region.nodes]
    srcs = list(dict.fromkeys(s for s in map(source_line, region.nodes) if s))
    lines += ["# source lines:"] + [f"#   {s}" for s in srcs] if srcs else ["# source lines: none recorded"]
    lines += [f"# reads:  {', '.join(f'%{n.name} {_fmt_shape(n)}' for n in inputs)}",
              f"# writes: {', '.join(f'%{n.name} {_fmt_shape(n)}' for n in outputs)}"]
    return lines


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids."""
    return -(a // -b)


def row_blocks(n_rows: int, n: int, whole_row: bool, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a rows x N tile. A reduction keeps the whole row in one
    block; the interpreter gets large tiles (few programs run faster there)."""
    budget = 1 << 15 if interpret else 1 << 12
    block_n = next_pow2(n) if whole_row else min(next_pow2(n), budget // 4 if interpret else 1024)
    block_m = max(1, min(next_pow2(n_rows), budget // block_n))
    warps = 4 if block_m * block_n <= 2048 else 8
    return block_m, block_n, warps
