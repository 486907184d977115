"""Calibration: measure this machine with microbenchmarks and write a preset file.

Entry points: `calibrate(mesh=None, seconds=1.0, threads=1) -> (DevicePreset, measurements)`,
`write_preset(preset, path, measurements)`, and the command `meshc calibrate [--mesh tp=2]
[--out FILE]`, whose file `preset=` (cost-model functions, passes) and `--preset` accept.

What is measured — microbenchmarks only; no model is run and nothing is fitted to one. Each
kernel is issued as a forward issues it (the shapes, layouts and extra arguments of a decoder's
graph), since a tight loop of a friendlier variant runs faster than the forward does:

* matmul throughput by size: aten.linear(x[M, K], weight[N, K]) float32 from 2e4 to 2e9 FLOPs, with
  cold operands (a pool larger than L2, as a forward's weights) → `matmul_curve` (FLOP/s per size,
  interpolated by the cost model), `peak_flops` = the best;
* attention: aten.scaled_dot_product_attention with a transposed q and an explicit boolean causal
  mask, by sequence length → `sdpa_curve` (CPU attention runs well below the matmul rate);
* the non-matmul ops of a forward (mul with a broadcast weight, add, silu, pow, mean, neg, cat, a
  transposed clone, a dtype cast) on ~1 MB operands, less their fixed cost → seconds per element,
  `op_rates` (silu and strided copies run far below the copy bandwidth);
* memory bandwidth: copying a 64 MB tensor (read + write) → `mem_bandwidth`;
* the ATen backend's dispatch overhead: `op_mix` GraphModules (1 and 16 blocks of the small ops a
  transformer forward issues: linear, norm, head split, rotate-half, gated activation, residual)
  run as the ATen backend runs a Program's graph (`LoweredProgram`): slope → seconds per node in a
  mixed graph; a call of the captured 1-block Program through `CompiledModel` less its nodes →
  seconds per call (`call_overhead`); each ATen op's cost on tiny inputs in a tight
  loop plus the graph's own cost per node (what the mix measures beyond its ops' tight loops:
  `op_costs`) → `dispatch_overhead` (a generic node) and `op_overheads`;
* collectives on the mesh's process group (`meshc.launch`, one process per rank) exactly as the
  graphs issue them (`torch.ops._c10d_functional.*` + `wait_tensor`), 1 KB .. 16 MB, both alone
  after a barrier and in situ — in runs of BLOCK_PAIRS (compute phase, collective) pairs, each run
  after a barrier, as a forward issues them (the ranks start together, then drift apart, and gloo's
  threads compete with the ranks' compute for the cores). Per collective a fit t = a + b·bytes
  (relative least squares) of the in-situ times, stored as ring alpha/beta for the group size
  (`collective_fits`); and how much longer an all-reduce waits per second of compute before it
  (`collective_drift`: after the short phase and a ~7 ms one, phase and collective timed apart; the
  ranks drift apart over a phase, and the first to arrive waits). A collective the backend lacks
  (gloo has no reduce-scatter) is skipped: `meshc.redistribute` prices it as the backend implements it;
* point-to-point on the mesh's processes, as the pipeline runtime issues them (batch_isend_irecv):
  the time the sender spends issuing a send and the receiver posting a receive, by message size
  → `p2p_fits` (what each pipeline stage pays for the messages it emits).

One statistic throughout: every figure of the preset is a least time. Kernel times are the least
of repeated runs (the thread's CPU time with one torch thread); an in-situ collective is the least
over runs of BLOCK_PAIRS pairs of a run's mean pair time, less the compute phase's least time alone.
On a shared machine other jobs and the scheduler only add time, so the fastest run is the machine's
own speed; the preset predicts a forward at that speed, compared with a forward's least call
(`benchmarks/cost_model.py`). Why runs: a least is not additive — a forward's least call needs all
its collectives' waits short at once, a single pair's least only one. Priced by the least single
pair, a forward of 8 all-reduces came out 33-35% below its least call; by the least run of 8, -0% /
+1% (`benchmarks/collective_waits.py`); by the median pair, +43% / +97%. A forward issuing many more
collectives than BLOCK_PAIRS is priced somewhat low (its least call approaches the mean as the
count grows), one issuing a few somewhat high. The single-pair least, the medians and the means
stay in the raw measurements (`seconds_by_bytes_in_situ_single`, `_median`, `_mean`); the mean is
additive, and `benchmarks/cost_model.py` also prices each forward's mean with it. Every rank uses
rank 0's figures, so all ranks plan alike.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import torch
import torch.fx as fx
from meshc.cost_model import PRESETS, DevicePreset

#: (M, K, N) of the matmul sizes measured (2*M*K*N FLOPs: 2e4 .. 2e9).
MATMUL_SIZES = ((8, 32, 32), (16, 64, 64), (32, 128, 128), (64, 128, 256), (128, 256, 256), (256, 256, 512),
                (256, 512, 512), (512, 512, 1024), (1024, 1024, 1024))
#: bytes of the operand pool the matmuls rotate through: more than a core's L2 (MBs), so that each
#: call's operands come from memory or the shared last-level cache, as a forward's weights do
COLD_BYTES = 32 << 20
#: sequence lengths of the attention measured ([2, 8, S, 64], boolean causal mask)
SDPA_SEQS = (16, 64, 128, 256, 512)
#: elements of the largest tensor each op of _large_ops touches
LARGE_NUMEL = 2 * 128 * 1024
#: blocks of the larger op_mix graph measure_dispatch times: about a small decoder forward's nodes (350)
MIX_BLOCKS = 16
#: message sizes (bytes as cost_model.collective_time counts them) for the collectives
MESSAGE_BYTES = tuple(1 << k for k in range(10, 25, 2))  # 1 KB .. 16 MB
#: (phase, collective) pairs per in-situ block: about as many collectives as a small decoder's forward
#: issues (two per layer on a tp mesh: 8 for a 4-layer Llama); a forward's least call is the least over
#: runs of its collectives, so the in-situ price is the least over runs of this many
BLOCK_PAIRS = 8
#: op_mix blocks of the long compute phase the drift is measured after (~7 ms on a 2-core CPU, a
#: compute-bound forward's compute between two collectives), and the all-reduce sizes it is measured at
LONG_PHASE_BLOCKS = 128
DRIFT_BYTES = (1 << 14, 1 << 18)
#: collective -> ring rounds (all_reduce = reduce-scatter + all-gather)
ROUNDS = {"all_reduce": 2, "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1, "all_to_all_single": 1}


def _least_time(fn: Callable[[], object], seconds: float, min_calls: int = 5) -> float:
    """Least seconds of repeated calls of fn within about `seconds` (after one warm-up): on a shared
    machine other jobs only add time, so the fastest call is this machine's own speed. With one
    torch thread the calling thread's CPU time is timed: a call longer than the scheduler's time
    slice is never run undisturbed beside other jobs, but its CPU time is what it costs (equal to
    the wall time on an idle machine), less the clock's own least empty interval (~0.6 us)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    bias = min(-clock() + clock() for _ in range(200))
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < seconds and len(times) < 2000):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return max(min(times) - bias, 1e-9)


def _backend_call(op):
    """What the ATen backend calls for a graph node of ATen overload `op`: its torch binding where
    `meshc.backends.aten.FAST_CALLS` has one (same kernel, a cheaper Python entry), else `op`."""
    from meshc.backends.aten import FAST_CALLS

    return FAST_CALLS.get(op, op)


def measure_matmuls(seconds: float) -> list[tuple[float, float]]:
    """(FLOPs, FLOP/s) per size in MATMUL_SIZES, issued as a Linear's forward issues them:
    aten.linear(x[M, K], weight[N, K]) (the weight transposed), a fresh output each call, with
    cold operands: each call takes the next (x, weight) pair of a pool of COLD_BYTES, so its
    operands were last touched a pool ago and are in no core's L1/L2 — as in a forward, where a
    layer's weights were last read a whole forward ago (a small matmul runs 1.5-2x slower than hot)."""
    out, linear = [], _backend_call(torch.ops.aten.linear.default)
    with torch.no_grad():
        for m, k, n in MATMUL_SIZES:
            pool = [(torch.randn(m, k), torch.randn(n, k)) for _ in range(max(2, COLD_BYTES // (4 * k * (m + n))))]
            turn = itertools.cycle(pool)
            flops = 2.0 * m * k * n
            t = _least_time(lambda turn=turn: linear(*next(turn)), seconds / len(MATMUL_SIZES))
            out.append((flops, flops / t))
            del pool, turn
    return out


def measure_sdpa(seconds: float) -> list[tuple[float, float]]:
    """(FLOPs as cost_model counts them, FLOP/s) of aten.scaled_dot_product_attention as a decoder's
    forward issues it: q [2, 8, S, 64] a transposed view of [2, S, 8, 64], k and v contiguous, an
    explicit boolean causal mask [2, 1, S, S], for S in SDPA_SEQS (the CPU kernel is no plain matmul)."""
    out, sdpa = [], _backend_call(torch.ops.aten.scaled_dot_product_attention.default)
    with torch.no_grad():
        for s in SDPA_SEQS:
            q, kv = torch.randn(2, s, 8, 64).transpose(1, 2), torch.randn(2, 8, s, 64)
            mask = torch.ones(s, s, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
            flops = 2.0 * 2 * 8 * s * s * (64 + 64)
            t = _least_time(lambda q=q, kv=kv, mask=mask: sdpa(q, kv, kv, mask, scale=0.125), seconds / len(SDPA_SEQS))
            out.append((flops, flops / t))
    return out


def _large_ops() -> dict[str, Callable[[], object]]:
    """The non-matmul ATen ops of a transformer forward, each on ~1 MB operands shaped as a forward
    has them ([2, 128, 8, 128] activations, a [1024] norm weight broadcast, a rotary half), each
    called as the ATen backend calls it (`_backend_call`)."""
    aten, b = torch.ops.aten, _backend_call
    x, y = torch.randn(2, 128, 1024), torch.randn(2, 128, 1024)
    w, heads = torch.randn(1024), torch.randn(2, 128, 8, 128)
    return {
        "aten.mul.Tensor": partial(b(aten.mul.Tensor), x, w),
        "aten.add.Tensor": partial(b(aten.add.Tensor), x, y),
        "aten.silu.default": partial(b(aten.silu.default), x),
        "aten.pow.Tensor_Scalar": partial(b(aten.pow.Tensor_Scalar), x, 2),
        "aten.mean.dim": partial(b(aten.mean.dim), x, [-1], True),
        "aten.neg.default": partial(b(aten.neg.default), x),
        "aten.cat.default": partial(b(aten.cat.default), [x[..., :512], x[..., 512:]], -1),
        "aten.clone.default": partial(b(aten.clone.default), heads.transpose(1, 2),
                                      memory_format=torch.contiguous_format),
        "aten._to_copy.default": partial(b(aten._to_copy.default), x, dtype=torch.float64),
    }


def measure_op_rates(seconds: float, fixed: dict[str, float]) -> dict[str, float]:
    """Seconds per element (of the op's largest tensor: LARGE_NUMEL) of each op in `_large_ops`,
    less its fixed cost per call (`fixed`, from measure_ops; aten.mul's for an op not there): the
    cost model adds dispatch per node and takes the larger of this and the op's roofline."""
    with torch.no_grad():
        return {name: max(_least_time(fn, seconds / len(_large_ops())) - fixed.get(name, fixed["aten.mul.Tensor"]),
                          0.0) / LARGE_NUMEL
                for name, fn in _large_ops().items()}


def measure_bandwidth(seconds: float) -> float:
    """Bytes/s of a 64 MB copy (read + write)."""
    src = torch.randn(16 << 20)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _least_time(lambda: dst.copy_(src), seconds)


def op_mix(blocks: int) -> fx.GraphModule:
    """`blocks` repeats of a mix of small ATen ops as a transformer forward issues them — a linear,
    a broadcast scale, an RMS norm, a head split with transposes and copies, a rotate-half (slices,
    neg, cat), a gated activation, unsqueeze/squeeze and a residual add: 22 nodes per block,
    on x [2, 8, 32], a weight [32, 32] per block (as a forward has one per layer: its generated code
    binds as many arguments), scale [32] (the kernels' own time is small next to dispatch)."""
    aten = torch.ops.aten
    g = fx.Graph()
    x, ws, b = g.placeholder("x"), [g.placeholder(f"w{i}") for i in range(blocks)], g.placeholder("b")

    def op(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    v = x
    for w in ws:
        v = op(aten.mul.Tensor, op(aten.linear.default, v, w), b)
        r = op(aten.rsqrt.default, op(aten.add.Tensor, op(aten.mean.dim, op(aten.pow.Tensor_Scalar, v, 2), [-1], True),
                                      1e-6))
        v = op(aten.mul.Tensor, v, r)
        h = op(aten.clone.default, op(aten.transpose.int, op(aten.view.default, v, [2, 8, 4, 8]), 1, 2),
               memory_format=torch.contiguous_format)
        v = op(aten.view.default, op(aten.clone.default, op(aten.transpose.int, h, 1, 2),
                                     memory_format=torch.contiguous_format), [2, 8, 32])
        half = op(aten.cat.default, [op(aten.neg.default, op(aten.slice.Tensor, v, 2, 16, 32)),
                                     op(aten.slice.Tensor, v, 2, 0, 16)], -1)
        v = op(aten.add.Tensor, op(aten.mul.Tensor, op(aten.silu.default, half), v),
               op(aten.squeeze.dim, op(aten.unsqueeze.default, v, 0), 0))
    g.output((v,))
    return fx.GraphModule(torch.nn.Module(), g)


def _mix_inputs(blocks: int) -> tuple[torch.Tensor, ...]:
    """op_mix(blocks)'s inputs: x, one weight per block, scale."""
    return torch.randn(2, 8, 32), *(torch.randn(32, 32) for _ in range(blocks)), torch.randn(32)


def measure_dispatch(seconds: float) -> tuple[float, float, dict[str, int]]:
    """(seconds per node, seconds per call, {op: nodes in one block}): the slope between op_mix
    graphs of 1 and MIX_BLOCKS blocks run as the ATen backend runs a Program's graph
    (`backends.aten.LoweredProgram`: its generated code, each op's binding, fresh outputs) — the
    cost of a node in a mixed graph of a forward's size — and the rest of a call of the captured
    1-block Program through `CompiledModel` (binding inputs, pytree, outputs)."""
    from meshc.backends.aten import LoweredProgram
    from meshc.capture import capture
    from meshc.runtime.compiled_model import CompiledModel

    times, nodes = {}, {}
    with torch.no_grad():
        for blocks in (1, MIX_BLOCKS):
            gm, inputs = op_mix(blocks), list(_mix_inputs(blocks))
            nodes[blocks] = sum(n.op == "call_function" for n in gm.graph.nodes)
            times[blocks] = _least_time(partial(LoweredProgram(gm, []), inputs), seconds / 3)
        per_node = max((times[MIX_BLOCKS] - times[1]) / (nodes[MIX_BLOCKS] - nodes[1]), 0.0)
        inputs = _mix_inputs(1)
        program = capture(op_mix(1), inputs, dynamic_shapes=None)
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        compiled = CompiledModel(program, "aten")
        call = _least_time(lambda: compiled(*inputs), seconds / 3)
    return per_node, max(call - len(targets) * per_node, 0.0), {t: targets.count(t) for t in set(targets)}


def _tiny_ops() -> dict[str, Callable[[], object]]:
    """The ATen ops a transformer forward issues most, each on tiny inputs, called as the ATen
    backend calls it (`_backend_call`: some through a cheaper torch binding, some not)."""
    aten, b = torch.ops.aten, _backend_call
    x, w, i = torch.randn(4, 8), torch.randn(8, 8), torch.tensor([0, 2, 1, 3])
    q = torch.randn(1, 2, 4, 8)
    return {
        "aten.linear.default": partial(b(aten.linear.default), x, w),
        "aten.scaled_dot_product_attention.default":
            partial(b(aten.scaled_dot_product_attention.default), q, q, q, None, 0.0, True),
        "aten.mean.dim": partial(b(aten.mean.dim), x, [-1], True),
        "aten.cat.default": partial(b(aten.cat.default), [x, x], -1),
        "aten.embedding.default": partial(b(aten.embedding.default), w, i),
        "aten.index.Tensor": partial(b(aten.index.Tensor), x, [i]),
        "aten.arange.default": partial(b(aten.arange.default), 8, dtype=torch.int64),
        "aten.clone.default": partial(b(aten.clone.default), x),
        "aten.silu.default": partial(b(aten.silu.default), x),
        "aten._to_copy.default": partial(b(aten._to_copy.default), x, dtype=torch.float64),
        "aten.mul.Tensor": partial(b(aten.mul.Tensor), x, x),
        "aten.view.default": partial(b(aten.view.default), x, [8, 4]),
        "aten._unsafe_view.default": partial(b(aten._unsafe_view.default), x, [8, 4]),
        "aten.slice.Tensor": partial(b(aten.slice.Tensor), x, 1, 0, 4),
        "aten.expand.default": partial(b(aten.expand.default), x[None], [2, 4, 8]),
        "aten.unsqueeze.default": partial(b(aten.unsqueeze.default), x, 0),
        "aten.transpose.int": partial(b(aten.transpose.int), x, 0, 1),
        "aten.add.Tensor": partial(b(aten.add.Tensor), x, x),
        "aten.neg.default": partial(b(aten.neg.default), x),
        "aten.pow.Tensor_Scalar": partial(b(aten.pow.Tensor_Scalar), x, 2),
        "aten.rsqrt.default": partial(b(aten.rsqrt.default), x),
        "aten.where.self": partial(b(aten.where.self), x > 0, x, x),
    }


def measure_ops(seconds: float) -> dict[str, float]:
    """Seconds per call of each op in `_tiny_ops` (least of 50-call loops: Python call + dispatch + kernel).
    A graph adds its own cost per node to these (`op_costs`)."""
    out = {}
    with torch.no_grad():
        for name, fn in _tiny_ops().items():
            def loop(fn=fn):
                for _ in range(50):
                    fn()
            out[name] = _least_time(loop, seconds / len(_tiny_ops())) / 50
    return out


def op_costs(per_node: float, mix_counts: dict[str, int], ops: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(generic seconds per node, {op: seconds per node}) in a mixed graph: each op's tight-loop
    time `ops` (its own entry and kernel) plus one graph cost per node, the same for every op (the
    generated forward's line, its argument passing), chosen so that op_mix's nodes (`mix_counts`;
    an op not in `ops` costs as aten.mul) average `per_node`, as measured on it."""
    generic = ops["aten.mul.Tensor"]
    loop_mean = sum(c * ops.get(op, generic) for op, c in mix_counts.items()) / sum(mix_counts.values())
    graph = max(per_node - loop_mean, 0.0)
    return generic + graph, {op: t + graph for op, t in ops.items()}


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


def compute_phase() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """(graph, inputs) of the compute phase before each in-situ collective: a 2-block op_mix, 44
    nodes, ~0.2-0.3 ms on a 2-core CPU — about a small tp forward's compute between collectives."""
    return op_mix(2), _mix_inputs(2)


def long_phase() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """(graph, inputs) of the long compute phase `_drift` compares with `compute_phase`: an op_mix of
    LONG_PHASE_BLOCKS blocks, ~7 ms on a 2-core CPU."""
    return op_mix(LONG_PHASE_BLOCKS), _mix_inputs(LONG_PHASE_BLOCKS)


def wall_times(fn: Callable[[], object], calls: int) -> list[float]:
    """Wall seconds of each of `calls` back-to-back calls of fn."""
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def in_situ_blocks(collective: Callable[[], object], phase: fx.GraphModule, inputs: tuple, blocks: int,
                   group, pairs: int = BLOCK_PAIRS) -> list[list[float]]:
    """Wall seconds of each (phase, collective) pair in `blocks` runs of `pairs` pairs, each run
    after a barrier on `group` — as a forward issues its collectives: the ranks start it together,
    then drift apart over its phases."""
    import torch.distributed as dist

    out = []
    with torch.no_grad():
        for _ in range(blocks):
            dist.barrier(group)
            out.append(wall_times(lambda: (phase(*inputs), collective()), pairs))
    return out


def _drift(allreduce: Callable[[torch.Tensor], object], group, blocks: int,
           phases: tuple[tuple[Callable, tuple], tuple[Callable, tuple]]) -> list[tuple[float, float]]:
    """[(bytes, drift)] per size in DRIFT_BYTES: the seconds an in-situ all-reduce's wait grows by
    per second of the compute phase before it — the ranks drift apart over a phase (the OS's and
    the other rank's jitter), so the first to arrive waits longer the longer it computed. Runs of
    BLOCK_PAIRS (phase, all-reduce) pairs after a barrier, the short and the long phase of `phases`
    ((graph, inputs) each: `compute_phase`, `long_phase`) alternated so both see the same machine,
    the phase and the collective timed apart (a slower phase is compute's, not the wait's): per
    phase, the least run's mean collective time C and the median run's mean phase time P;
    drift = (C_long − C_short) / (P_long − P_short)."""
    rows = []
    for nbytes in DRIFT_BYTES:
        t, waits = torch.randn(nbytes // 4), []

        def timed(t=t, waits=waits) -> None:  # the collective, its own time recorded apart from its pair's
            t0 = time.perf_counter()
            allreduce(t)
            waits.append(time.perf_counter() - t0)

        runs: list[list[tuple[float, float]]] = [[], []]  # per phase: (mean phase, mean collective) per run
        for _ in range(blocks):
            for (g, x), into in zip(phases, runs):
                (pairs,) = in_situ_blocks(timed, g, x, 1, group)
                wait = statistics.mean(waits[-BLOCK_PAIRS:])
                into.append((statistics.mean(pairs) - wait, wait))
        (p_short, c_short), (p_long, c_long) = ((statistics.median(p for p, _ in r), min(c for _, c in r))
                                                for r in runs)
        rows.append((float(nbytes), (c_long - c_short) / (p_long - p_short)))
    return rows


def _collectives_rank(device_mesh, dim: str, iters: int) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """On every rank, per collective issued as the compiled graphs issue them (`_c10d_functional` +
    `wait_tensor`), [(bytes, seconds)] per message size: "alone" — the least time after a barrier
    (both ranks arrive together); "in_situ" — between compute phases (`in_situ_blocks` after
    `compute_phase`), the least over blocks of a block's mean pair time, less the phase's least time
    alone: what a forward's least call pays per collective at the machine's own speed, the waits for
    the other rank's arrival and gloo's thread hand-offs included; "in_situ_single" — the least single
    pair less the phase's least (the figure before blocks: a least is not additive, a forward's least
    call needs all its waits short at once); "in_situ_median", "in_situ_mean" — the medians and means
    of all pairs (kept in the raw measurements: `benchmarks/cost_model.py` prices a forward's mean
    with the means); "drift" — {"all_reduce": `_drift`}, whose share of the short phase is taken
    off the in-situ prices (the cost model adds drift × the compute before each collective)."""
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
    phase, inputs = compute_phase()
    with torch.no_grad():
        wall_times(lambda: phase(*inputs), 20)
        dist.barrier(group)
        phase_s = wall_times(lambda: phase(*inputs), 200)  # both ranks computing, as in a forward
    phase_least, phase_median, phase_mean = min(phase_s), statistics.median(phase_s), statistics.mean(phase_s)
    drift = _drift(lambda t: c10d.wait_tensor.default(ops["all_reduce"](t)), group, max(2 * iters, 24),
                   ((phase, inputs), long_phase()))
    drift_s = statistics.mean(d for _, d in drift) * phase_least  # the short phase's share, priced by drift
    hows = ("alone", "in_situ", "in_situ_single", "in_situ_median", "in_situ_mean")
    out: dict[str, dict[str, list[tuple[float, float]]]] = {how: {} for how in hows}
    out["drift"] = {"all_reduce": drift}
    for kind, op in ops.items():
        try:
            c10d.wait_tensor.default(op(torch.zeros(64 * n)))
        except (RuntimeError, NotImplementedError):
            dist.barrier(group)
            continue  # not implemented by this backend: priced as the backend implements it
        rows: dict[str, list[tuple[float, float]]] = {how: [] for how in hows}
        for nbytes in MESSAGE_BYTES:
            numel = max(nbytes // 4 // n * n, n)  # the tensor collective_time's nbytes describes
            local = numel // n if kind == "all_gather_into_tensor" else numel
            t = torch.randn(local)
            calls = iters * 3 if nbytes <= 1 << 16 else iters  # small messages: noisier, cheap
            samples = []
            for _ in range(calls):
                dist.barrier(group)
                samples.extend(wall_times(lambda op=op, t=t: c10d.wait_tensor.default(op(t)), 1))
            blocks = in_situ_blocks(lambda op=op, t=t: c10d.wait_tensor.default(op(t)), phase, inputs,
                                    max(calls, 12), group)
            pairs = [p for b in blocks for p in b]
            counted = float(local * 4 if kind in ("all_to_all_single",) else numel * 4)
            for how, seconds in (("alone", min(samples[1:])),
                                 ("in_situ", min(statistics.mean(b) for b in blocks) - phase_least - drift_s),
                                 ("in_situ_single", min(pairs) - phase_least),
                                 ("in_situ_median", statistics.median(pairs) - phase_median),
                                 ("in_situ_mean", statistics.mean(pairs) - phase_mean)):
                rows[how].append((counted, max(seconds, 1e-9)))
        for how in hows:
            out[how][kind] = rows[how]
    return out


def measure_collectives(mesh: Any, iters: int = 12, timeout: float = 300.0) -> tuple[int, dict]:
    """(group size, {how: {collective: [(bytes, s), ...]}}) with how as `_collectives_rank` measures
    ("alone", "in_situ", "in_situ_single", "in_situ_median", "in_situ_mean") on the mesh's
    tensor-parallel (else first) dim, the slowest rank's time per size (a collective ends when its
    last rank does)."""
    from meshc.mesh import MeshSpec
    from meshc.runtime.launch import launch

    spec = MeshSpec.parse(mesh)
    i = spec.tp_index if spec.tp_index is not None else 0
    dim, n = spec.names[i], spec.sizes[i]
    ranks = launch(_collectives_rank, str(spec), dim, iters, timeout=timeout)
    merged = {how: {kind: [(b, max(r[how][kind][j][1] for r in ranks)) for j, (b, _) in enumerate(rows)]
                    for kind, rows in by_kind.items()}
              for how, by_kind in ranks[0].items()}
    return n, merged


def ring_fits(n: int, rows_by_kind: dict[str, list[tuple[float, float]]]) -> tuple[tuple[str, float, float], ...]:
    """`collective_fits` of measured [(bytes, seconds)] per collective on a group of n: a fit
    t = a + b·bytes (`fit_line`) stored as the ring alpha/beta that `cost_model.collective_time`
    turns back into t for that group size."""
    fits = []
    for kind, rows in rows_by_kind.items():
        a, b = fit_line(rows)
        r = ROUNDS[kind]
        fits.append((kind, a / (r * (n - 1)), b * n / (r * (n - 1))))
    return tuple(fits)


def _p2p_rank(device_mesh, iters: int) -> dict[str, list[tuple[float, float]]]:
    """Ranks 0 and 1: per size in MESSAGE_BYTES, the least time rank 1 spends posting a receive
    and then (after a barrier: the receive is posted early, as the pipeline runtime's Exchange
    prefetches it) rank 0 issuing the matching send — each `dist.batch_isend_irecv` of one
    `P2POp`, as Exchange issues them; the transfer is waited outside the time."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = dist.get_rank()
    kind, op = {0: ("send", dist.isend), 1: ("recv", dist.irecv)}.get(rank, (None, None))
    rows = []
    for j, nbytes in enumerate(MESSAGE_BYTES):
        t, samples = torch.randn(nbytes // 4), []
        for i in range(iters):
            for turn in ("recv", "send"):
                dist.barrier()
                if kind == turn:
                    t0 = time.perf_counter()
                    works = dist.batch_isend_irecv([dist.P2POp(op, t, 1 - rank, tag=j * iters + i)])
                    samples.append(time.perf_counter() - t0)
            for w in works if op is not None else ():
                w.wait()
        if op is not None:
            rows.append((float(nbytes), min(samples[1:])))
    return {kind: rows} if kind else {}


def measure_p2p(mesh: Any, iters: int = 20, timeout: float = 120.0) -> dict[str, list[tuple[float, float]]]:
    """{"send" | "recv": [(bytes, seconds), ...]}: what issuing a point-to-point send (rank 0) and
    posting its receive (rank 1) cost the issuing rank on the mesh's processes, by message size."""
    from meshc.runtime.launch import launch

    return {k: v for r in launch(_p2p_rank, str(mesh), iters, timeout=timeout) for k, v in r.items()}


def calibrate(mesh: Any = None, seconds: float = 1.0, threads: int = 1, name: str = "cpu-calibrated"
              ) -> tuple[DevicePreset, dict]:
    """Measure this machine (see the module docstring) and return (preset, raw measurements)."""
    from meshc.mesh import MeshSpec

    torch.set_num_threads(threads)
    base = PRESETS["cpu-gloo"]
    curve = measure_matmuls(seconds)
    sdpa = measure_sdpa(seconds / 2)
    bandwidth = measure_bandwidth(seconds / 4)
    per_node, per_call, mix_counts = measure_dispatch(seconds)
    ops = measure_ops(seconds)
    rates = measure_op_rates(seconds / 2, ops)
    generic, per_op = op_costs(per_node, mix_counts, ops)
    figures: dict[str, Any] = dict(peak_flops=max(r for _, r in curve), mem_bandwidth=bandwidth,
                                   dispatch_overhead=generic, call_overhead=per_call,
                                   matmul_curve=tuple(curve), sdpa_curve=tuple(sdpa),
                                   op_rates=tuple(sorted(rates.items())),
                                   op_overheads=tuple(sorted(per_op.items())))
    raw: dict[str, Any] = {"matmul": [{"mkn": list(s), "flops": f, "flop_per_s": r}
                                      for s, (f, r) in zip(MATMUL_SIZES, curve)],
                           "sdpa": [{"seq": s, "flops": f, "flop_per_s": r} for s, (f, r) in zip(SDPA_SEQS, sdpa)],
                           "op_s_per_element": rates,
                           "op_seconds": ops, "copy_bytes_per_s": bandwidth, "op_mix_s_per_node": per_node,
                           "op_mix_nodes_per_block": mix_counts, "call_s": per_call}
    spec = MeshSpec.parse(mesh)
    if spec.size > 1:
        n, colls = measure_collectives(spec)
        fits = ring_fits(n, colls["in_situ"])
        figures["collective_fits"] = fits
        figures["collective_drift"] = max(statistics.mean(d for _, d in colls["drift"]["all_reduce"]), 0.0)
        alpha, beta = next((a, b) for k, a, b in fits if k == "all_reduce")
        figures.update(intra_alpha=alpha, intra_beta=beta, inter_alpha=alpha, inter_beta=beta)
        p2p = measure_p2p(spec)
        figures["p2p_fits"] = tuple((kind, *fit_line(rows)) for kind, rows in sorted(p2p.items()))
        raw["p2p_seconds_by_bytes"] = {k: [list(r) for r in rows] for k, rows in p2p.items()}
        raw["collectives"] = {"group_size": n, "mesh": str(spec),
                              **{f"seconds_by_bytes_{how}": {k: [list(p) for p in rows] for k, rows in by_kind.items()}
                                 for how, by_kind in colls.items()}}
    raw["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    raw["threads"] = threads
    return replace(base, name=name, **figures), raw


SOURCES = {
    "peak_flops": "the fastest size of the matmul_curve (meshc calibrate: aten.linear float32)",
    "mem_bandwidth": "meshc calibrate: least time of a copy of a 64 MB float32 tensor, read + write bytes",
    "dispatch_overhead": "meshc calibrate: aten.mul's tight-loop time plus the graph's own cost per node (op_mix "
                         "graphs' per-node slope through CompiledModel less their ops' mean tight-loop time; op_costs)",
    "call_overhead": "meshc calibrate: intercept of the same fit (binding inputs, pytree, output)",
    "matmul_curve": "meshc calibrate: least aten.linear(x[M, K], weight[N, K]) time per size",
    "sdpa_curve": "meshc calibrate: least aten.scaled_dot_product_attention time per sequence length "
                  "(transposed q, boolean causal mask)",
    "op_rates": "meshc calibrate: least time of each op on ~1 MB operands less its tight-loop fixed cost, per element",
    "op_overheads": "meshc calibrate: each op's tight-loop time on tiny inputs plus the graph's own cost per "
                    "node (op_costs)",
    "collective_fits": "meshc calibrate: _c10d_functional collectives + wait_tensor on the mesh's group, each "
                       f"after a compute phase, in runs of {BLOCK_PAIRS} after a barrier (least run's mean pair "
                       "time, the phase's least taken off), relative least-squares t = a + b*bytes, as ring alpha/beta",
    "collective_drift": "meshc calibrate: an in-situ all_reduce's time after a long compute phase (op_mix, "
                        f"{LONG_PHASE_BLOCKS} blocks) less its time after the short one, per second of phase "
                        f"(runs of {BLOCK_PAIRS} after a barrier, alternated, phase and collective timed apart; "
                        f"the least run's mean collective time; the mean over {len(DRIFT_BYTES)} sizes)",
    "p2p_fits": "meshc calibrate: least time rank 0 spends issuing a send (batch_isend_irecv of one isend) and rank "
                "1 posting its receive, by message size, relative least-squares t = a + b*bytes",
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
    if preset.sdpa_curve:
        lines.append(f"  attention: {', '.join(f'{f:.0e}:{r / 1e9:.1f}' for f, r in preset.sdpa_curve)} FLOPs:GFLOP/s")
    if preset.op_rates:
        rates = ", ".join(f"{k.split('.')[1]} {s * 1e9:.2f}" for k, s in preset.op_rates)
        lines.append(f"  ns per element: {rates}")
    for kind, a, b in preset.p2p_fits:
        lines.append(f"  p2p {kind} issue: {a * 1e6:.1f} us per message + {b * 1e12:.2f} us per MB")
    for kind, a, b in preset.collective_fits:
        lines.append(f"  {kind}: alpha {a * 1e6:.1f} us per ring step, {1 / b / 1e9 if b else math.inf:.2f} GB/s")
    if preset.collective_fits:
        lines.append(f"  a collective also waits {preset.collective_drift * 1e3:.0f} us per ms its rank computed since "
                     "the previous one (drift)")
    return "\n".join(lines)


__all__ = ["calibrate", "compute_phase", "fit_line", "in_situ_blocks", "long_phase", "measure_collectives",
           "measure_dispatch", "measure_matmuls", "measure_op_rates", "measure_p2p", "measure_sdpa", "op_costs",
           "op_mix", "ring_fits", "summary", "wall_times", "write_preset"]
