"""The cost model against measurement: predicted vs measured forward time and peak memory per rank.

    .venv/bin/python benchmarks/cost_model.py                # calibrate, then every config; ~10 min on 2 cores
    .venv/bin/python benchmarks/cost_model.py --preset FILE  # use an existing `meshc calibrate` file
    .venv/bin/python benchmarks/cost_model.py --sizes llama-h128-l4 --iters 5 --out /tmp/smoke.json  # smoke run

One run: (1) `meshc.calibrate` measures this machine with microbenchmarks only (matmuls,
copy, ATen dispatch, gloo collectives and point-to-point on tp=2) — nothing is fitted to the configurations below;
(2) for each configuration (two Llama sizes x tp=1, tp=2 x plans auto / megatron / replicated,
and a pp=2 forward pipeline), rank 0's local Program is built without processes (the passes
`meshc.compile` runs) and `meshc.predict` prices it with the calibrated preset; (3) the same
configuration runs on a local gloo mesh (`meshc.launch`, one torch thread per rank) in `--rounds`
alternating rounds over the forward configurations (default 3; the pp=2 run below: one; the first measured after
calibration ran up to 1.5x slower, every part alike), each round at least `--iters` calls and about
`--seconds` of them (a 2 ms forward: ~500 calls, as many as calibration's least of a kernel sees),
each row from its round with the least time:
forward time per rank: least and median with quartiles, the least thread CPU time of a call (what
calibration's kernel timings count; a collective's wait is not in it), and the peak of the bytes the
forward allocates (torch profiler memory events) plus the rank's state bytes; and the forward split
by part (`meshc.predict.part`: matmul, attention, other ops, views, collectives), each part's
measured wall and thread-CPU time per node, least and median over the calls (an FX Interpreter
timing every node: it adds a few us per node) next to its predicted time — a collective's wall
less its CPU time is the wait for the other rank.

What is compared with what: one statistic on both sides, the least. Every figure of the calibrated
preset is a least time — kernels, dispatch, and each collective's least in-situ time (after a
compute phase, `meshc.calibrate`) — so the prediction is a forward at the machine's own speed, and
it is compared with the least forward call (`time_error`): other jobs and the scheduler only add
time. The errors against the median and mean call (`time_error_vs_median`, `_vs_mean`) are kept
for the record; the median of a sum of heavy-tailed waits is not the sum of its parts' medians, so
a median-priced preset does not predict it either (it read -30% / -20% on the collective-bound
rows at stop 22). A least is not additive either: a forward's least call needs every collective's
wait short at once, so least-priced collectives predict collective-bound forwards low
(`benchmarks/collective_waits.py`). The mean is additive: `mean_waits_error_vs_mean` prices the
collectives by their mean in-situ time (the preset file's raw `seconds_by_bytes_in_situ_mean`,
`mean_waits_preset`), the rest as the preset does, against the mean call.

A pp=2 stage's measured time is the least over every call's micro-batches of its
action's time less its receive wait (its compute, its sends, any receive it posts), against
`meshc.predict.stage_times` (which prices those messages). After each config the
dispatch microbenchmark runs again (`dispatch_us_per_node_now`, not used to predict): how far the
shared machine drifted from the calibration. Writes
benchmarks/results_cost_model_cpu.json: per config predicted, measured, error; goals ±25% time,
±10% memory; plan order agreement where the predicted gap exceeds the measured spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SIZES = {  # name -> Llama config (random weights, fp32)
    "llama-h128-l4": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, batch=2, seq=16),
    "llama-h512-l4": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, batch=2, seq=128),
}
PLANS = ("auto", "megatron", "replicate")
KW = {"use_cache": False}


def build(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SIZES[name])
    batch, seq = cfg.pop("batch"), cfg.pop("seq")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, max_position_embeddings=1024, **cfg)).eval()
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, ids


def predict(name: str, mesh: str | None, plan: str | None, preset: str, schedule: str | None = None,
            microbatches: int = 0) -> dict:
    """Rank 0's local Program, built by the passes meshc.compile runs (no processes), priced."""
    import meshc
    from meshc.mesh import MeshSpec
    from meshc.pipeline import resolve
    from meshc.predict import forward_time, peak_memory, stage_times

    model, ids = build(name)
    spec = MeshSpec.parse(mesh)
    resolved = resolve(spec, "default", plan, schedule or "1f1b", microbatches, batch=ids.shape[0])
    program = meshc.capture(model, (ids,), KW, dynamic_shapes="auto", mesh=spec)
    if spec.size > 1:
        program.plan = plan or "replicate"
    program = meshc.PassManager(resolved.pipeline).run(program)
    if program.split is not None:
        return {"stages": [s.as_dict() for s in stage_times(program, preset)]}
    state, act = peak_memory(program)
    means = mean_waits_preset(preset)
    return {**forward_time(program, preset).as_dict(), "state_bytes": state, "activation_peak_bytes": act,
            "memory_bytes": state + act,
            **({"mean_waits_total_ms": forward_time(program, means).total_s * 1e3} if means else {})}


def mean_waits_preset(path: str):
    """The preset file's preset with its collectives priced by their mean in-situ time (its raw
    `seconds_by_bytes_in_situ_mean`, fitted as calibration fits the least: `ring_fits`), or None
    for a file without them: the cost model's terms add up as means, not as leasts."""
    from dataclasses import replace

    from meshc.calibrate import ring_fits
    from meshc.cost_model import load_preset

    raw = json.loads(Path(path).read_text()).get("measurements", {}).get("collectives", {})
    if not raw.get("seconds_by_bytes_in_situ_mean"):
        return None
    fits = ring_fits(raw["group_size"], {k: [tuple(r) for r in rows]
                                         for k, rows in raw["seconds_by_bytes_in_situ_mean"].items()})
    a, b = next((a, b) for k, a, b in fits if k == "all_reduce")
    base = load_preset(path)
    return replace(base, name=f"{base.name}-mean-waits", collective_fits=fits, intra_alpha=a, intra_beta=b,
                   inter_alpha=a, inter_beta=b)


def _allocated_peak(fn) -> int:
    """Peak of the bytes allocated while fn runs (torch profiler memory events, running sum)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    return peak


def _measure_parts(program, args: tuple, kwargs: dict, iters: int) -> dict:
    """The forward split by `meshc.predict.part`: per part, the sum over its nodes of each node's
    least ("wall_ms") and median ("wall_median_ms") wall time (ms) over `iters` runs of the graph
    the ATen backend executes (`backends.aten.fast_calls`) under an FX Interpreter that times every
    node (the Interpreter adds a few us per node, so parts of many small nodes read high), and the
    same of thread CPU time: a collective's wall time less its CPU time is time spent waiting for
    the other rank (or for the core)."""
    import torch.fx as fx
    from meshc.backends.aten import fast_calls
    from meshc.predict import part

    executed = fast_calls(program.gm)
    original = dict(zip(executed.graph.nodes, program.gm.graph.nodes))  # graph_copy keeps the order
    wall: dict = {}
    cpu: dict = {}

    class Timed(fx.Interpreter):
        def run_node(self, n):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = super().run_node(n)
            wall.setdefault(n, []).append(time.perf_counter() - t0)
            cpu.setdefault(n, []).append(time.thread_time() - c0)
            return out

    flat = [*program.state_args(), *program.bind_inputs(args, kwargs)]
    with torch.no_grad():
        for _ in range(iters):
            Timed(executed).run(*flat)
    parts: dict = {}
    for n in wall:
        if n.op == "call_function":
            sums = parts.setdefault(part(original[n]), dict.fromkeys(("wall_ms", "cpu_ms", "wall_median_ms",
                                                                        "cpu_median_ms"), 0.0))
            for key, times, stat in (("wall_ms", wall, min), ("cpu_ms", cpu, min),
                                     ("wall_median_ms", wall, statistics.median),
                                     ("cpu_median_ms", cpu, statistics.median)):
                sums[key] += stat(times[n]) * 1e3
    return parts


def _calls(device_mesh, fn, iters: int, seconds: float) -> int:
    """Calls to time: at least `iters`, and enough for about `seconds` (from three warm-up calls),
    the same on every rank (the forward's collectives pair up): a ~2 ms forward gets ~500 calls,
    as many as calibration's least of a kernel sees in the same time, not 30 in 60 ms, which one
    slow stretch of this VM covers whole."""
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    n = torch.tensor([max(iters, int(seconds / min(warm)))])
    if device_mesh is not None:
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return int(n)


def _measure_rank(device_mesh, name: str, plan: str | None, iters: int, schedule: str | None,
                  microbatches: int, seconds: float) -> dict:
    import meshc
    from meshc.predict import peak_memory

    torch.set_num_threads(1)
    model, ids = build(name)
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs=KW, plan=plan,
                             **({"schedule": schedule, "microbatches": microbatches} if schedule else {}))
    call_ids = torch.cat([ids] * microbatches) if schedule else ids
    times, cpu, per_stage = [], [], {}
    with torch.no_grad():
        # back to back, as a user's loop calls it: no barrier between calls (after one, a forward
        # without collectives ran 5-25% slower than back to back, a rank woken from a blocking wait;
        # with collectives the ranks keep in step through them: no change)
        for _ in range(_calls(device_mesh, lambda: compiled(call_ids, **KW), iters, seconds)):
            t0, c0 = time.perf_counter(), time.thread_time()
            compiled(call_ids, **KW)
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
            for e in compiled.last_trace if schedule else ():  # every call's actions, less the receive waits
                per_stage.setdefault(e["stage"], []).append(e["end"] - e["start"] - e["wait"])
        if schedule:
            return {"stage_ms": {s: min(v) * 1e3 for s, v in per_stage.items()},
                    "stage_median_ms": {s: statistics.median(v) * 1e3 for s, v in per_stage.items()}}
        act = _allocated_peak(lambda: compiled(call_ids, **KW))
    parts = _measure_parts(compiled.program, (call_ids,), KW, 10)
    q = statistics.quantiles(times, n=4)
    state, _ = peak_memory(compiled.program)
    return {"median_ms": statistics.median(times) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "mean_ms": statistics.mean(times) * 1e3,
            "min_ms": min(times) * 1e3, "min_cpu_ms": min(cpu) * 1e3, "parts": parts,
            "activation_peak_bytes": act, "state_bytes": state, "memory_bytes": state + act}


def measure(name: str, mesh: str, plan: str | None, iters: int, schedule: str | None = None,
            microbatches: int = 0, seconds: float = 0.0) -> list[dict]:
    from meshc.runtime.launch import launch

    return launch(_measure_rank, mesh, name, plan, iters, schedule, microbatches, seconds, timeout=600)


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def main(argv: list[str] | None = None) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="a `meshc calibrate` preset file (default: calibrate now)")
    p.add_argument("--iters", type=int, default=30, help="least calls per forward configuration and round")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="and at least this long: more calls of a fast forward (calibration's least sees as many)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds over the configurations; a row takes its round with the least time")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--out", default="results_cost_model_cpu.json", help="results file (in benchmarks/)")
    a = p.parse_args(argv)
    out_dir = Path(__file__).parent
    t0 = time.perf_counter()
    if a.preset is None:
        from meshc.calibrate import calibrate, write_preset

        preset, raw = calibrate("tp=2", seconds=1.0)
        a.preset = str(out_dir / "results_cost_model_preset_cpu.json")
        write_preset(preset, a.preset, raw)
    from meshc.calibrate import measure_dispatch

    configs = [(name, mesh, plan) for name in a.sizes.split(",")
               for mesh, plans in (("tp=1", (None,)), ("tp=2", PLANS)) for plan in plans]
    rounds: dict = {c: [] for c in configs}  # config -> [(per-rank results, dispatch probe)] per round
    for r in range(a.rounds):  # alternating rounds: the machine's drift falls on every config alike
        for name, mesh, plan in configs:
            ranks = measure(name, mesh, None if plan == "replicate" else plan, a.iters, seconds=a.seconds)
            probe = measure_dispatch(0.5)[0]  # the machine now (not used to predict): contention drift
            rounds[(name, mesh, plan)].append((ranks, probe))
            print(f"round {r + 1}: {name} {mesh} {plan or 'one device'} least {ranks[0]['min_ms']:.2f} ms", flush=True)
    rows = []
    for name, mesh, plan in configs:
        label = f"{name} {mesh} {plan or 'one device'}"
        pr = predict(name, None if mesh == "tp=1" else mesh, None if plan == "replicate" else plan, a.preset)
        ranks, probe = min(rounds[(name, mesh, plan)], key=lambda rp: rp[0][0]["min_ms"])
        m = ranks[0]
        row = {"config": label, "model": name, "mesh": mesh, "plan": plan or "-", "predicted": pr,
               "dispatch_us_per_node_now": probe * 1e6,
               "measured_rank0": m, "measured_median_ms_per_rank": [r["median_ms"] for r in ranks],
               "rounds_least_ms": [rp[0][0]["min_ms"] for rp in rounds[(name, mesh, plan)]],
               "rounds_median_ms": [rp[0][0]["median_ms"] for rp in rounds[(name, mesh, plan)]],
               "time_error": _err(pr["total_ms"], m["min_ms"]),
               "time_error_vs_median": _err(pr["total_ms"], m["median_ms"]),
               "time_error_vs_mean": _err(pr["total_ms"], m["mean_ms"]),
               "mean_waits_error_vs_mean": (_err(pr["mean_waits_total_ms"], m["mean_ms"])
                                            if "mean_waits_total_ms" in pr else None),  # a preset file without means
               "memory_error": _err(pr["memory_bytes"], m["memory_bytes"]),
               "activation_error": _err(pr["activation_peak_bytes"], m["activation_peak_bytes"])}
        print(f"{label}: predicted {pr['total_ms']:.2f} ms, measured least {m['min_ms']:.2f} ms "
              f"({100 * row['time_error']:+.0f}%; least thread CPU {m['min_cpu_ms']:.2f}), "
              f"median {m['median_ms']:.2f} [{m['q1_ms']:.2f}, "
              f"{m['q3_ms']:.2f}], mean {m['mean_ms']:.2f}"
              + (f" (predicted with mean waits {pr['mean_waits_total_ms']:.2f}, "
                 f"{100 * row['mean_waits_error_vs_mean']:+.0f}%)" if "mean_waits_total_ms" in pr else "")
              + "; memory "
              f"{pr['memory_bytes'] / 2**20:.2f} vs {m['memory_bytes'] / 2**20:.2f} MiB "
              f"({100 * row['memory_error']:+.0f}%)", flush=True)
        print("  by part, predicted / measured least wall (cpu) ms: " + "; ".join(
            f"{k} {pr['parts_ms'].get(k, 0):.2f} / {v['wall_ms']:.2f} ({v['cpu_ms']:.2f})"
            for k, v in sorted(m["parts"].items())), flush=True)
        rows.append(row)
    pipe_name = a.sizes.split(",")[-1]
    pr = predict(pipe_name, "pp=2", None, a.preset, schedule="forward", microbatches=2)
    ranks = measure(pipe_name, "pp=2", None, max(a.iters // 3, 3), schedule="forward", microbatches=2)
    measured_stages = {int(s): v for r in ranks for s, v in r["stage_ms"].items()}
    median_stages = {int(s): v for r in ranks for s, v in r["stage_median_ms"].items()}
    pipeline = {"config": f"{pipe_name} pp=2 forward schedule, 2 micro-batches",
                "stages": [{"stage": s, "predicted_ms": pr["stages"][s]["total_ms"],
                            "predicted_parts_ms": pr["stages"][s]["parts_ms"], "measured_ms": measured_stages[s],
                            "measured_median_ms": median_stages[s],
                            "error": _err(pr["stages"][s]["total_ms"], measured_stages[s])}
                           for s in range(len(pr["stages"]))]}
    print(json.dumps(pipeline, indent=1), flush=True)
    order = []
    for name in a.sizes.split(","):  # plans on tp=2: same order by prediction and by measurement?
        plan_rows = [r for r in rows if r["model"] == name and r["mesh"] == "tp=2"]
        for x in plan_rows:
            for y in plan_rows:
                if x is y or x["predicted"]["total_ms"] >= y["predicted"]["total_ms"]:
                    continue
                gap = y["predicted"]["total_ms"] - x["predicted"]["total_ms"]
                spread = max(x["measured_rank0"]["q3_ms"] - x["measured_rank0"]["q1_ms"],
                             y["measured_rank0"]["q3_ms"] - y["measured_rank0"]["q1_ms"])
                order.append({"faster_predicted": x["config"], "slower_predicted": y["config"], "predicted_gap_ms": gap,
                              "measured_spread_ms": spread, "counts": gap > spread,
                              "agrees": x["measured_rank0"]["min_ms"] < y["measured_rank0"]["min_ms"]})
    times = [abs(r["time_error"]) for r in rows] + [abs(s["error"]) for s in pipeline["stages"]]
    result = {
        "benchmark": "cost_model", "preset_file": a.preset,
        "compared": "time_error: prediction (every preset figure a least time) vs the least forward call; "
                    "time_error_vs_median / _vs_mean: the same prediction vs the median / mean call (for the "
                    "record); mean_waits_error_vs_mean: the prediction with collectives priced by their mean "
                    "in-situ time vs the mean call",
        "rows": rows, "pipeline": pipeline, "plan_order": order,
        "summary": {"time_within_25pct": sum(e <= 0.25 for e in times), "time_configs": len(times),
                    "max_abs_time_error": max(times),
                    "time_within_25pct_of_median": sum(abs(r["time_error_vs_median"]) <= 0.25 for r in rows),
                    "mean_waits_within_25pct_of_mean": sum(abs(r["mean_waits_error_vs_mean"]) <= 0.25 for r in rows
                                                           if r["mean_waits_error_vs_mean"] is not None),
                    "memory_within_10pct": sum(abs(r["memory_error"]) <= 0.10 for r in rows),
                    "memory_configs": len(rows),
                    "order_pairs_counted": sum(o["counts"] for o in order),
                    "order_pairs_agreeing": sum(o["counts"] and o["agrees"] for o in order)},
        "machine": f"{platform.machine()}, 1 torch thread per rank, gloo",
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__, "seconds": time.perf_counter() - t0,
        "command": "python benchmarks/cost_model.py " + " ".join(argv or []),
    }
    print(json.dumps(result["summary"], indent=1))
    (out_dir / a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
