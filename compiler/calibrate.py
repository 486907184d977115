"""Calibration: measure this machine with microbenchmarks and write a preset file.

Entry points: `calibrate(mesh=None, seconds=1.0, threads=1) -> (DevicePreset, measurements)`,
`write_preset(preset, path, measurements)`, and the command `meshc calibrate [--mesh tp=2]
[--out FILE]`, whose file `preset=` (cost-model functions, passes) and `--preset` accept.

What is measured — microbenchmarks only; no model is run and nothing is fitted to one:

* matmul throughput by size: [M, K] @ [K, N] float32 from 2e4 to 2e9 FLOPs → `matmul_curve`
  (FLOP/s per size, interpolated by the cost model), `peak_flops` = the best;
* memory bandwidth: copying a 64 MB tensor (read + write) → `mem_bandwidth`;
* fixed cost per call of the ATen ops whose overhead differs from a pointwise op's (linear,
  attention, reductions, cat, embedding, index, copies) on tiny inputs, relative to `aten.mul`
  timed alike, times the per-node cost below → `op_overheads`;
* the ATen backend's dispatch overhead: FX GraphModules of 1 and 401 tiny ATen ops (pointwise,
  views, reductions), run through `CompiledModel` as compiled programs are: slope → seconds per
  node (`dispatch_overhead`), intercept → seconds per call (`call_overhead`);
* collectives on the mesh's process group (`meshc.launch`, one process per rank) exactly as the
  graphs issue them (`torch.ops._c10d_functional.*` + `wait_tensor`), 1 KB .. 16 MB: per
  collective a fit t = a + b·bytes (relative least squares), stored as ring alpha/beta for the
  group size (`collective_fits`). A collective the backend lacks (gloo has no reduce-scatter) is
  skipped: `meshc.redistribute` prices it as the backend implements it (an all-reduce + chunk).

Times are the least of repeated runs: on a shared machine other jobs only add time, so the
fastest run is the machine's own speed (compare them with least measured times). Every rank
uses rank 0's figures, so all ranks plan alike.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.fx as fx
from meshc.cost_model import PRESETS, DevicePreset

#: (M, K, N) of the matmul sizes measured (2*M*K*N FLOPs: 2e4 .. 2e9).
MATMUL_SIZES = ((8, 32, 32), (16, 64, 64), (32, 128, 128), (64, 128, 256), (128, 256, 256), (256, 256, 512),
                (256, 512, 512), (512, 512, 1024), (1024, 1024, 1024))
#: message sizes (bytes as cost_model.collective_time counts them) for the collectives
MESSAGE_BYTES = tuple(1 << k for k in range(10, 25, 2))  # 1 KB .. 16 MB
#: collective -> ring rounds (all_reduce = reduce-scatter + all-gather)
ROUNDS = {"all_reduce": 2, "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1, "all_to_all_single": 1}


def _least_time(fn: Callable[[], object], seconds: float, min_calls: int = 5) -> float:
    """Least seconds of repeated calls of fn within about `seconds` (after one warm-up): on a shared
    machine other jobs only add time, so the fastest call is this machine's own speed."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < seconds and len(times) < 2000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(min(times), 1e-9)


def measure_matmuls(seconds: float) -> list[tuple[float, float]]:
    """(FLOPs, FLOP/s) per size in MATMUL_SIZES."""
    out = []
    with torch.no_grad():
        for m, k, n in MATMUL_SIZES:
            a, b = torch.randn(m, k), torch.randn(k, n)
            flops = 2.0 * m * k * n
            out.append((flops, flops / _least_time(lambda a=a, b=b: torch.mm(a, b), seconds / len(MATMUL_SIZES))))
    return out


def measure_bandwidth(seconds: float) -> float:
    """Bytes/s of a 64 MB copy (read + write)."""
    src = torch.randn(16 << 20)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _least_time(lambda: dst.copy_(src), seconds)


def _chain(nodes: int) -> fx.GraphModule:
    """A graph of `nodes` tiny ATen ops (add, view, mul, sum-keepdim, ... in turn) on a [4, 8] input."""
    aten = torch.ops.aten
    g = fx.Graph()
    x = g.placeholder("x")
    steps = [lambda v: g.call_function(aten.add.Tensor, (v, 1.0)),
             lambda v: g.call_function(aten.view.default, (v, [8, 4])),
             lambda v: g.call_function(aten.mul.Tensor, (v, v)),
             lambda v: g.call_function(aten.view.default, (v, [4, 8])),
             lambda v: g.call_function(aten.sub.Tensor, (v, 0.5))]
    v = x
    for i in range(nodes):
        v = steps[i % len(steps)](v)
    g.output((v,))
    return fx.GraphModule(torch.nn.Module(), g)


def measure_dispatch(seconds: float) -> tuple[float, float]:
    """(seconds per node, seconds per call) of compiled programs run by the ATen backend."""
    from meshc.capture import capture
    from meshc.runtime.compiled_model import CompiledModel

    x = torch.randn(4, 8)
    times = {}
    for nodes in (1, 401):
        program = capture(_chain(nodes), (x,), dynamic_shapes=None)
        compiled = CompiledModel(program, "aten")
        with torch.no_grad():
            times[nodes] = _least_time(lambda c=compiled: c(x), seconds / 2)
    per_node = max((times[401] - times[1]) / 400, 0.0)
    return per_node, max(times[1] - per_node, 0.0)


def _tiny_ops() -> dict[str, Callable[[], object]]:
    """ATen ops whose fixed cost differs from a plain pointwise op's, each on tiny inputs."""
    aten = torch.ops.aten
    x, w, i = torch.randn(4, 8), torch.randn(8, 8), torch.tensor([0, 2, 1, 3])
    q = torch.randn(1, 2, 4, 8)
    return {
        "aten.linear.default": lambda: aten.linear.default(x, w),
        "aten.scaled_dot_product_attention.default":
            lambda: aten.scaled_dot_product_attention.default(q, q, q, None, 0.0, True),
        "aten.mean.dim": lambda: aten.mean.dim(x, [-1], True),
        "aten.cat.default": lambda: aten.cat.default([x, x], -1),
        "aten.embedding.default": lambda: aten.embedding.default(w, i),
        "aten.index.Tensor": lambda: aten.index.Tensor(x, [i]),
        "aten.arange.default": lambda: aten.arange.default(8, dtype=torch.int64),
        "aten.clone.default": lambda: aten.clone.default(x),
        "aten.silu.default": lambda: aten.silu.default(x),
        "aten._to_copy.default": lambda: aten._to_copy.default(x, dtype=torch.float64),
        "aten.mul.Tensor": lambda: aten.mul.Tensor(x, x),
        "aten.view.default": lambda: aten.view.default(x, [8, 4]),
    }


def measure_ops(seconds: float) -> dict[str, float]:
    """Seconds per call of each op in `_tiny_ops` (least of 50-call loops: Python call + dispatch + kernel).
    A loop of one op runs hotter than a graph's mix of ops, so `calibrate` uses these as ratios to
    `aten.mul.Tensor` measured alike, applied to the per-node cost measured on graphs."""
    out = {}
    with torch.no_grad():
        for name, fn in _tiny_ops().items():
            def loop(fn=fn):
                for _ in range(50):
                    fn()
            out[name] = _least_time(loop, seconds / len(_tiny_ops())) / 50
    return out


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of t = a + b*x minimising the squared *relative* error over (x, t) points (both >= 0)."""
    w = [1 / t**2 for _, t in points]
    sw, sx, sy = sum(w), sum(wi * x for wi, (x, _) in zip(w, points)), sum(wi * t for wi, (_, t) in zip(w, points))
    sxx = sum(wi * x * x for wi, (x, _) in zip(w, points))
    sxy = sum(wi * x * t for wi, (x, t) in zip(w, points))
    det = sw * sxx - sx * sx
    b = (sw * sxy - sx * sy) / det if det else 0.0
    a = (sy - b * sx) / sw
    return max(a, 0.0), max(b, 0.0)


def _collectives_rank(device_mesh, dim: str, iters: int) -> dict[str, list[tuple[float, float]]]:
    """On every rank: least seconds per (collective, bytes), issued as the compiled graphs issue them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    group = device_mesh.get_group(dim)
    n, name = dist.get_world_size(group), group.group_name
    c10d = torch.ops._c10d_functional
    ops = {
        "all_reduce": lambda t: c10d.all_reduce.default(t, "sum", name),
        "all_gather_into_tensor": lambda t: c10d.all_gather_into_tensor.default(t, n, name),
        "reduce_scatter_tensor": lambda t: c10d.reduce_scatter_tensor.default(t, "sum", n, name),
        "all_to_all_single": lambda t: c10d.all_to_all_single.default(t, [t.shape[0] // n] * n,
                                                                       [t.shape[0] // n] * n, name),
    }
    out: dict[str, list[tuple[float, float]]] = {}
    for kind, op in ops.items():
        try:
            c10d.wait_tensor.default(op(torch.zeros(64 * n)))
        except (RuntimeError, NotImplementedError):
            dist.barrier(group)
            continue  # not implemented by this backend: priced as the backend implements it
        rows = []
        for nbytes in MESSAGE_BYTES:
            numel = max(nbytes // 4 // n * n, n)  # the tensor collective_time's nbytes describes
            local = numel // n if kind == "all_gather_into_tensor" else numel
            t = torch.randn(local)
            samples = []
            for _ in range(iters * 3 if nbytes <= 1 << 16 else iters):  # small messages: noisier, cheap
                dist.barrier(group)
                t0 = time.perf_counter()
                c10d.wait_tensor.default(op(t))
                samples.append(time.perf_counter() - t0)
            counted = local * 4 if kind in ("all_to_all_single",) else numel * 4
            rows.append((float(counted), min(samples[1:])))
        out[kind] = rows
    return out


def measure_collectives(mesh: Any, iters: int = 12, timeout: float = 300.0) -> tuple[int, dict]:
    """(group size, {collective: [(bytes, seconds), ...]}) on the mesh's tensor-parallel (else first)
    dim, the slowest rank's least time per size (a collective ends when its last rank does)."""
    from meshc.mesh import MeshSpec
    from meshc.runtime.launch import launch

    spec = MeshSpec.parse(mesh)
    i = spec.tp_index if spec.tp_index is not None else 0
    dim, n = spec.names[i], spec.sizes[i]
    ranks = launch(_collectives_rank, str(spec), dim, iters, timeout=timeout)
    merged = {kind: [(b, max(r[kind][j][1] for r in ranks)) for j, (b, _) in enumerate(rows)]
              for kind, rows in ranks[0].items()}
    return n, merged


def calibrate(mesh: Any = None, seconds: float = 1.0, threads: int = 1, name: str = "cpu-calibrated"
              ) -> tuple[DevicePreset, dict]:
    """Measure this machine (see the module docstring) and return (preset, raw measurements)."""
    from meshc.mesh import MeshSpec

    torch.set_num_threads(threads)
    base = PRESETS["cpu-gloo"]
    curve = measure_matmuls(seconds)
    bandwidth = measure_bandwidth(seconds / 4)
    per_node, per_call = measure_dispatch(seconds)
    ops = measure_ops(seconds)
    figures: dict[str, Any] = dict(peak_flops=max(r for _, r in curve), mem_bandwidth=bandwidth,
                                   dispatch_overhead=per_node, call_overhead=per_call,
                                   matmul_curve=tuple((f, r) for f, r in curve),
                                   op_overheads=tuple(sorted((k, per_node * t / ops["aten.mul.Tensor"])
                                                             for k, t in ops.items())))
    raw: dict[str, Any] = {"matmul": [{"mkn": list(s), "flops": f, "flop_per_s": r}
                                      for s, (f, r) in zip(MATMUL_SIZES, curve)],
                           "op_seconds": ops, "copy_bytes_per_s": bandwidth, "dispatch_s_per_node": per_node,
                           "call_s": per_call}
    spec = MeshSpec.parse(mesh)
    if spec.size > 1:
        n, colls = measure_collectives(spec)
        fits = []
        for kind, rows in colls.items():
            a, b = fit_line(rows)
            r = ROUNDS[kind]
            fits.append((kind, a / (r * (n - 1)), b * n / (r * (n - 1))))
        figures["collective_fits"] = tuple(fits)
        alpha, beta = next((a, b) for k, a, b in fits if k == "all_reduce")
        figures.update(intra_alpha=alpha, intra_beta=beta, inter_alpha=alpha, inter_beta=beta)
        raw["collectives"] = {"group_size": n, "mesh": str(spec),
                              "seconds_by_bytes": {k: [list(p) for p in rows] for k, rows in colls.items()}}
    raw["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    raw["threads"] = threads
    return replace(base, name=name, **figures), raw


SOURCES = {
    "peak_flops": "the fastest size of the matmul_curve (meshc calibrate: torch.mm float32)",
    "mem_bandwidth": "meshc calibrate: least time of a copy of a 64 MB float32 tensor, read + write bytes",
    "dispatch_overhead": "meshc calibrate: slope of CompiledModel calls over FX graphs of 1 and 401 tiny ATen ops",
    "call_overhead": "meshc calibrate: intercept of the same fit (binding inputs, pytree, output)",
    "matmul_curve": "meshc calibrate: least torch.mm time per size",
    "op_overheads": "meshc calibrate: dispatch_overhead x (op's / aten.mul's least seconds per call on tiny "
                    "inputs, 50-call loops)",
    "collective_fits": "meshc calibrate: _c10d_functional collectives + wait_tensor on the mesh's group, "
                       "relative least-squares t = a + b*bytes, as ring alpha/beta",
    "intra_alpha": "the all_reduce fit", "intra_beta": "the all_reduce fit",
    "inter_alpha": "the all_reduce fit (every local rank is on this host)", "inter_beta": "the all_reduce fit",
}


def write_preset(preset: DevicePreset, path: str, measurements: dict) -> None:
    """The preset file `load_preset` / `--preset FILE` read: figures, their sources, raw data."""
    figures = {k: v for k, v in asdict(preset).items() if k not in ("name", "source")}
    doc = {"name": preset.name, "figures": figures,
           "sources": {k: SOURCES.get(k, "as preset cpu-gloo (not measured)") for k in figures},
           "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "measurements": measurements}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def summary(preset: DevicePreset) -> str:
    """A few lines: what was measured, in the units people use."""
    lines = [f"preset {preset.name}: matmul {preset.peak_flops / 1e9:.1f} GFLOP/s at best "
             f"({', '.join(f'{f:.0e}:{r / 1e9:.1f}' for f, r in preset.matmul_curve)} FLOPs:GFLOP/s); "
             f"copy {preset.mem_bandwidth / 1e9:.1f} GB/s; dispatch {preset.dispatch_overhead * 1e6:.2f} us per node, "
             f"{preset.call_overhead * 1e6:.1f} us per call"]
    for kind, a, b in preset.collective_fits:
        lines.append(f"  {kind}: alpha {a * 1e6:.1f} us per ring step, {1 / b / 1e9 if b else math.inf:.2f} GB/s")
    return "\n".join(lines)


__all__ = ["calibrate", "fit_line", "measure_collectives", "measure_dispatch", "measure_matmuls", "summary",
           "write_preset"]
