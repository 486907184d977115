"""Cost model: predicted seconds for collectives, compute and FX nodes on a named device.

meshc's single cost model, shared by auto-sharding, pipeline partitioning and the ladder-residual
speedup prediction. Entry points:

- `DevicePreset`, `PRESETS`, `get_preset(name_or_preset)`: the hardware figures;
  `default_preset(program)`: the preset for where a Program's tensors live. Presets are
  `cpu-gloo` (below) and the files in `compiler/presets/` (`load_preset`: every figure with its
  published source); `get_preset` also takes the path of a `meshc calibrate` file. Measured
  presets add a matmul curve (`matmul_rate`), an attention curve and per-element op rates
  (`curve_rate`, `node_time`), per-node and per-op overheads, per-collective alpha/beta fits and
  the cost of issuing point-to-point messages (`p2p_issue_time`);
  whole-program time and memory are `meshc.predict`'s.
- `collective_time(kind, nbytes, n, preset, inter_node=False)` and one function per collective
  (`all_reduce_time`, `all_gather_time`, `reduce_scatter_time`, `all_to_all_time`): alpha-beta
  costs of ring algorithms; `kind` is a name from `meshc.collectives.COLLECTIVES`. `p2p_time`:
  one point-to-point send (pipeline stage boundaries); `p2p_issue_time`: what issuing sends or
  posting receives costs the issuing rank (measured presets).
- `compute_time(flops, bytes_moved, preset)`: roofline, max(flops/peak, bytes/bandwidth).
- `value_bytes(node)`, `tensor_bytes(value)`: bytes of the tensors a node produces, or a meta value holds.
- `node_flops_and_bytes(node)`, `node_time(node, preset)`: cost of one ATen FX node, read from the
  FakeTensors in `node.meta["val"]` (symbolic sizes are costed at their hint).
- Calibration (measuring this machine into a preset file) is `meshc.calibrate` / `meshc calibrate`.

Everything here is arithmetic on numbers and metadata. It must never create, use or query process
groups or run models.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from meshc.errors import SpecError

aten = torch.ops.aten


@dataclass(frozen=True)
class DevicePreset:
    """Per-device figures. peak_flops is for the dtype of interest (fp32 on CPU, bf16 on GPUs).

    alpha: latency of one message step (s); beta: seconds per byte (1 / link bandwidth).
    Groups that span nodes pay the inter-node link; groups inside a node the intra-node one.
    """

    name: str
    peak_flops: float  # FLOP/s per device
    mem_bandwidth: float  # bytes/s per device
    intra_alpha: float
    intra_beta: float
    inter_alpha: float
    inter_beta: float
    devices_per_node: int
    collective_backend: str = "nccl"  # process-group backend: how collectives are implemented (redistribute)
    dispatch_overhead: float = 0.0  # seconds per executed graph node: framework dispatch / kernel launch
    call_overhead: float = 0.0  # seconds per call of a compiled program, besides its nodes (binding inputs)
    op_overheads: tuple[tuple[str, float], ...] = ()  # measured (ATen op, seconds on tiny inputs); else dispatch
    matmul_curve: tuple[tuple[float, float], ...] = ()  # measured (FLOPs of one matmul, FLOP/s); () = peak_flops
    sdpa_curve: tuple[tuple[float, float], ...] = ()  # measured (FLOPs of one attention, FLOP/s); () = matmul's
    op_rates: tuple[tuple[str, float], ...] = ()  # measured (ATen op, seconds per element of its largest tensor)
    collective_fits: tuple[tuple[str, float, float], ...] = ()  # measured (collective, alpha, beta), in-node groups
    # seconds a collective waits per second of compute its rank ran since its previous collective: the
    # ranks drift apart over a phase (measured on a CPU mesh by meshc calibrate; 0 where not measured)
    collective_drift: float = 0.0
    p2p_fits: tuple[tuple[str, float, float], ...] = ()  # measured ("send" | "recv", s per message, s per byte)
    source: str = ""  # the preset file it came from, if any

    def overhead(self, target) -> float:
        """Fixed seconds one node of op `target` costs besides its roofline (measured, else dispatch_overhead)."""
        name = str(target)
        return next((s for k, s in self.op_overheads if k == name), self.dispatch_overhead)

    def fit(self, kind: str) -> tuple[float, float] | None:
        """(alpha, beta) measured for collective `kind` on this backend, if calibrated."""
        return next(((a, b) for k, a, b in self.collective_fits if k == kind), None)

    def link(self, inter_node: bool = False) -> tuple[float, float]:
        """(alpha, beta) of the link a collective uses."""
        return (self.inter_alpha, self.inter_beta) if inter_node else (self.intra_alpha, self.intra_beta)


PRESETS: dict[str, DevicePreset] = {
    p.name: p
    for p in (
        DevicePreset(
            name="cpu-gloo",
            peak_flops=50e9,  # ~2-core x86 with AVX2 FMA, fp32 sgemm as measured by torch.mm: tens of GFLOP/s
            mem_bandwidth=10e9,  # single-socket DDR4, one or two threads of streaming copy
            intra_alpha=30e-6,  # gloo over loopback TCP: tens of us per message step
            intra_beta=1 / 2e9,  # ~2 GB/s effective through the TCP stack
            inter_alpha=30e-6,  # every gloo rank of a test runs on this one host: same link
            inter_beta=1 / 2e9,
            devices_per_node=64,  # one host holds all local ranks
            collective_backend="gloo",
        ),
    )
}


def load_preset(path: str) -> DevicePreset:
    """A preset from a JSON file {"name", "figures": {field: value}, "sources": {field: citation}}
    (what `meshc calibrate` writes; `compiler/presets/` holds the published-figure presets)."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise SpecError(f"preset file {path!r} does not exist; write one with `meshc calibrate --out {path}`")
    try:
        data = json.loads(file.read_text())
        figures = dict(data["figures"])
        for k in ("matmul_curve", "sdpa_curve", "op_rates", "collective_fits", "op_overheads", "p2p_fits"):
            figures[k] = tuple(tuple(x) for x in figures.get(k, ()))
        return DevicePreset(name=data["name"], source=str(file), **figures)
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError(f"preset file {path!r} is not a meshc preset ({type(e).__name__}: {e}); it needs "
                        f"'name' and 'figures' with DevicePreset's fields") from None


def _preset_files() -> None:
    from pathlib import Path

    for f in sorted((Path(__file__).parent / "presets").glob("*.json")):
        p = load_preset(str(f))
        PRESETS[p.name] = p


_preset_files()


def default_preset(program) -> str:
    """The preset for where a Program's tensors live: cpu-gloo, or the CUDA device's by name."""
    device = next((t.device for t in program.state.values() if t.device.type == "cuda"), None)
    if device is None:
        return "cpu-gloo"
    return "h200-nvlink" if "H200" in torch.cuda.get_device_name(device) else "h100-nvlink"


def get_preset(name_or_preset: str | DevicePreset) -> DevicePreset:
    """A DevicePreset from its name in PRESETS, or the preset itself."""
    if isinstance(name_or_preset, DevicePreset):
        return name_or_preset
    if not isinstance(name_or_preset, str):
        raise TypeError(f"expected a preset name or a DevicePreset, got {type(name_or_preset).__name__}")
    if name_or_preset in PRESETS:
        return PRESETS[name_or_preset]
    if name_or_preset.endswith(".json"):
        return load_preset(name_or_preset)
    close = difflib.get_close_matches(name_or_preset, PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SpecError(
        f"unknown device preset {name_or_preset!r}{hint}; valid names: {', '.join(sorted(PRESETS))}, "
        f"a preset file (*.json, from `meshc calibrate`), or a DevicePreset"
    )


# ---- collectives: alpha-beta cost of ring algorithms; nbytes is the full (unsharded) tensor ----


def _ring(nbytes: float, n: int, preset: DevicePreset | str, inter_node: bool, rounds: int, kind: str = "") -> float:
    if n < 1 or nbytes < 0:
        raise ValueError(f"collective cost needs group size n >= 1 and nbytes >= 0, got n={n}, nbytes={nbytes}")
    if n == 1:
        return 0.0
    p = get_preset(preset)
    alpha, beta = (None if inter_node else p.fit(kind)) or p.link(inter_node)
    return rounds * ((n - 1) / n * nbytes * beta + (n - 1) * alpha)


def all_reduce_time(nbytes: float, n: int, preset: DevicePreset | str, inter_node: bool = False) -> float:
    """Ring all-reduce = reduce-scatter + all-gather: 2(n-1)/n * nbytes * beta + 2(n-1) * alpha."""
    return _ring(nbytes, n, preset, inter_node, rounds=2, kind="all_reduce")


def all_gather_time(nbytes: float, n: int, preset: DevicePreset | str, inter_node: bool = False) -> float:
    """Ring all-gather of a tensor of nbytes in total: (n-1)/n * nbytes * beta + (n-1) * alpha."""
    return _ring(nbytes, n, preset, inter_node, rounds=1, kind="all_gather_into_tensor")


def reduce_scatter_time(nbytes: float, n: int, preset: DevicePreset | str, inter_node: bool = False) -> float:
    """Ring reduce-scatter of an nbytes input: (n-1)/n * nbytes * beta + (n-1) * alpha."""
    return _ring(nbytes, n, preset, inter_node, rounds=1, kind="reduce_scatter_tensor")


def all_to_all_time(nbytes: float, n: int, preset: DevicePreset | str, inter_node: bool = False) -> float:
    """All-to-all of an nbytes tensor (each rank keeps 1/n): (n-1)/n * nbytes * beta + (n-1) * alpha."""
    return _ring(nbytes, n, preset, inter_node, rounds=1, kind="all_to_all_single")


def p2p_time(nbytes: float, preset: DevicePreset | str, inter_node: bool = False) -> float:
    """One point-to-point send of nbytes (pipeline stage boundary): alpha + nbytes * beta."""
    if nbytes < 0:
        raise ValueError(f"p2p cost needs nbytes >= 0, got {nbytes}")
    if nbytes == 0:
        return 0.0
    alpha, beta = get_preset(preset).link(inter_node)
    return alpha + nbytes * beta


def p2p_issue_time(kind: str, message_bytes: list[float], preset: DevicePreset | str) -> float:
    """Seconds the issuing rank spends on one batch of point-to-point messages (`kind` "send": issuing
    the sends; "recv": posting the receives) of the given sizes: Σ a + b * bytes of the preset's
    measured `p2p_fits` for `kind` (the transfer itself runs in the backend's threads; its latency
    is `p2p_time`). 0 for a preset that did not measure it (no published figure for GPU presets)."""
    if kind not in ("send", "recv"):
        raise ValueError(f"p2p issue kind must be 'send' or 'recv', got {kind!r}")
    fit = next(((a, b) for k, a, b in get_preset(preset).p2p_fits if k == kind), None)
    return 0.0 if fit is None else sum(fit[0] + fit[1] * b for b in message_bytes)


COLLECTIVE_TIME: dict[str, Callable[..., float]] = {
    "all_reduce": all_reduce_time,
    "all_gather_into_tensor": all_gather_time,
    "reduce_scatter_tensor": reduce_scatter_time,
    "all_to_all_single": all_to_all_time,
}  # keys == meshc.collectives.COLLECTIVES (tested)


def collective_time(kind: str, nbytes: float, n: int, preset: DevicePreset | str, inter_node: bool = False) -> float:
    """Seconds for collective `kind` (a name in meshc.collectives.COLLECTIVES) over n devices."""
    if kind not in COLLECTIVE_TIME:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(sorted(COLLECTIVE_TIME))}")
    return COLLECTIVE_TIME[kind](nbytes, n, preset, inter_node)


def compute_time(flops: float, bytes_moved: float, preset: DevicePreset | str) -> float:
    """Roofline: a kernel is bound by arithmetic or by memory traffic, whichever is slower."""
    p = get_preset(preset)
    return max(flops / p.peak_flops, bytes_moved / p.mem_bandwidth)


def size_hint(s: int | torch.SymInt) -> int:
    """A concrete int for a possibly symbolic size: its hint from torch.export's ShapeEnv."""
    if isinstance(s, int):
        return s
    hint = s.node.hint
    return int(hint) if hint is not None else int(s.node.shape_env.size_hint(s.node.expr))


def _numel(t: torch.Tensor) -> int:
    return math.prod(size_hint(s) for s in t.shape)


def _nbytes(t: torch.Tensor) -> int:
    return _numel(t) * t.dtype.itemsize


def value_bytes(node: fx.Node) -> int:
    """Bytes of the tensors an FX node produces (its meta value: a tensor, or a tuple of them)."""
    return tensor_bytes(node.meta.get("val"))


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a meta value (a tensor, or a tuple/list of them; symbolic sizes at their hints)."""
    return sum(_nbytes(t) for t in _tensors(value))


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a meta value (a tensor, or a tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _input_tensors(node: fx.Node) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.extend(_tensors(a.meta.get("val"))))
    return out


# matmul-like op -> index of the arg whose last dim is the contraction dim K; flops = 2 * numel(out) * K
_MATMUL_LHS = {
    aten.linear.default: 0,  # x[..., K] @ weight[N, K].T
    aten.mm.default: 0,  # a[M, K] @ b[K, N]
    aten.addmm.default: 1,  # bias + a[M, K] @ b[K, N]
    aten.bmm.default: 0,  # a[B, M, K] @ b[B, K, N]
    aten.baddbmm.default: 1,
    aten.matmul.default: 0,
}
# ops that move no data of their own (tuple indexing, size queries)
_FREE = {operator.getitem, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def node_flops_and_bytes(node: fx.Node) -> tuple[int, int]:
    """(FLOPs, bytes read + written) of one ATen FX node, from the FakeTensors in its meta["val"].

    matmuls: 2*M*N*K; SDPA: 4*B*H*Sq*Sk*D (flash-style bytes: q, k, v, mask, out); embedding: no
    FLOPs, the output's bytes; reductions: numel of the input; every other op (pointwise and
    unknown): numel of the output, reading all tensor inputs and writing the output. Views,
    getitem, size queries, placeholders, outputs, collectives (see collective_time) and nodes
    without a tensor value cost (0, 0).
    """
    if node.op != "call_function" or node.target in _FREE:
        return 0, 0
    target = node.target
    if getattr(target, "is_view", False) or getattr(target, "namespace", "") == "_c10d_functional":
        return 0, 0
    outs = _tensors(node.meta.get("val"))
    if not outs:
        return 0, 0
    ins = _input_tensors(node)
    out_bytes = sum(_nbytes(t) for t in outs)
    io_bytes = sum(_nbytes(t) for t in ins) + out_bytes
    if target in _MATMUL_LHS:
        lhs = node.args[_MATMUL_LHS[target]].meta["val"]
        return 2 * _numel(outs[0]) * size_hint(lhs.shape[-1]), io_bytes
    if target == aten.scaled_dot_product_attention.default:
        q, k, v = (a.meta["val"] for a in node.args[:3])
        batch_heads = math.prod(size_hint(s) for s in q.shape[:-2])
        sq, sk = size_hint(q.shape[-2]), size_hint(k.shape[-2])
        d, dv = size_hint(q.shape[-1]), size_hint(v.shape[-1])
        return 2 * batch_heads * sq * sk * (d + dv), io_bytes  # QK^T and PV; = 4*B*H*Sq*Sk*D when dv == d
    if target == aten.embedding.default:
        return 0, out_bytes
    if torch.Tag.reduction in getattr(target, "tags", ()):
        return max((_numel(t) for t in ins), default=0), io_bytes
    return sum(_numel(t) for t in outs), io_bytes


def curve_rate(x: float, curve: tuple[tuple[float, float], ...], default: float) -> float:
    """The rate a measured curve of (size, rate) gives at size x: log-log interpolation; above the
    curve its last rate; below it the smallest size's *time* (a call that small is its fixed cost);
    `default` without a curve."""
    curve = tuple(sorted(curve))
    if not curve or x <= 0:
        return default
    if x <= curve[0][0]:
        return curve[0][1] * x / curve[0][0]
    for (f0, r0), (f1, r1) in zip(curve, curve[1:]):
        if x <= f1:
            w = (math.log(x) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
    return curve[-1][1]


def matmul_rate(flops: float, preset: DevicePreset | str) -> float:
    """FLOP/s a matmul of `flops` reaches: the preset's measured curve, else peak_flops."""
    p = get_preset(preset)
    return curve_rate(flops, p.matmul_curve, p.peak_flops)


def node_time(node: fx.Node, preset: DevicePreset | str) -> float:
    """Predicted seconds for one FX node's compute on `preset`: roofline of node_flops_and_bytes with
    the rates the preset measured — matmuls at the matmul curve's rate for their size, attention at
    the SDPA curve's (else the matmul curve's), and an op with a measured per-element time
    (`op_rates`: transcendental, broadcast and strided ops run below the copy bandwidth) at least
    that times the elements of its largest tensor. Dispatch overhead is per executed node and is
    added by whole-program predictions (`meshc.predict`), not here."""
    p = get_preset(preset)
    flops, nbytes = node_flops_and_bytes(node)
    memory = nbytes / p.mem_bandwidth
    if node.target == aten.scaled_dot_product_attention.default and (p.sdpa_curve or p.matmul_curve):
        return max(flops / (curve_rate(flops, p.sdpa_curve, 0.0) or matmul_rate(flops, p)), memory)
    if p.matmul_curve and node.target in _MATMUL_LHS:
        return max(flops / matmul_rate(flops, p), memory)
    per_element = next((s for k, s in p.op_rates if k == str(node.target)), 0.0) if nbytes else 0.0
    if per_element:
        tensors = _tensors(node.meta.get("val")) + _input_tensors(node)
        return max(flops / p.peak_flops, memory, per_element * max(_numel(t) for t in tensors))
    return max(flops / p.peak_flops, memory)


