"""Does a forward's least call pay what calibration prices its collectives at? A/B on a local tp=2 mesh.

    .venv/bin/python benchmarks/collective_waits.py                      # 4 rounds; ~1 min on 2 cores
    .venv/bin/python benchmarks/collective_waits.py --rounds 2 --out /tmp/waits.json  # smoke run

In one launch (two gloo ranks, one torch thread each), alternating rounds of: calibration's in-situ
loop before blocks (`in_situ_times` after `meshc.calibrate.compute_phase`: phase then all-reduce, no barrier) for
an all-reduce of the forward's message, and llama-h128-l4 megatron forwards (barrier before each);
every round runs once with each rank's threads pinned to core rank % cores (`os.sched_setaffinity`)
and once free, in alternating order. Per rank and setting: the in-situ least and median (less the
phase's least and median), a collective's own thread CPU time (the in-situ loop's CPU per pair less
the phase's), the least forward, its compute (least thread CPU less its collectives' own CPU), what
its least call paid per collective ((least - compute) / collectives), and compute + collectives x
in-situ least: the least forward as the calibrated preset prices its collectives (its compute taken
as measured). Also the least over blocks of as many pairs as the forward has collectives, each block
after a barrier as a forward is (per pair, less the phase), and the means of both sides: a least
is not additive (a forward's least needs every wait short at once), a mean is.
Writes benchmarks/results_collective_waits_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

MODEL = "llama-h128-l4"


def _pin(pinned: bool, rank: int) -> None:
    """Every thread of this process (gloo's included) on core rank % cores, or on every core."""
    cores = {rank % os.cpu_count()} if pinned else set(range(os.cpu_count()))
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cores)


def in_situ_times(collective, phase, inputs: tuple, calls: int) -> list[float]:
    """Wall seconds of `calls` (phase, collective) pairs back to back on every rank, no barrier (the
    first pair is dropped: the ranks start it together)."""
    from meshc.calibrate import wall_times

    with torch.no_grad():
        return wall_times(lambda: (phase(*inputs), collective()), calls + 1)[1:]


def _rank(device_mesh, rounds: int, calls: int, forwards: int) -> dict:
    import meshc
    import torch.distributed as dist
    from cost_model import KW, SIZES, build
    from meshc.calibrate import compute_phase, in_situ_blocks, wall_times

    torch.set_num_threads(1)
    group = device_mesh.get_group("tp")
    rank, name = dist.get_rank(), group.group_name
    c10d = torch.ops._c10d_functional
    model, ids = build(MODEL)
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs=KW, plan="megatron")
    n_coll = sum("all_reduce" in str(n.target) for n in compiled.program.graph.nodes if n.op == "call_function")
    cfg = SIZES[MODEL]
    message = torch.randn(cfg["batch"] * cfg["seq"] * cfg["hidden_size"])  # what each all-reduce moves
    phase, inputs = compute_phase()
    out: dict = {}

    def ar():
        return c10d.wait_tensor.default(c10d.all_reduce.default(message, "sum", name))

    with torch.no_grad():
        for r in range(rounds):
            for pinned in (False, True) if r % 2 == 0 else (True, False):
                _pin(pinned, rank)
                d = out.setdefault("pinned" if pinned else "free", {"phase": [], "in_situ": [], "fwd": [], "cpu": [],
                                                                  "phase_cpu": [], "in_situ_cpu": [], "blocks": []})
                dist.barrier()
                c0 = time.thread_time()
                d["phase"] += wall_times(lambda: phase(*inputs), 100)
                d["phase_cpu"].append((time.thread_time() - c0) / 100)
                dist.barrier()
                c0 = time.thread_time()
                d["in_situ"] += in_situ_times(ar, phase, inputs, calls)
                d["in_situ_cpu"].append((time.thread_time() - c0) / (calls + 1))
                # runs of as many pairs as a forward has collectives, each after a barrier (calibration's)
                d["blocks"] += [statistics.mean(b) for b in in_situ_blocks(ar, phase, inputs, calls // n_coll,
                                                                           group, pairs=n_coll)]
                for _ in range(3):
                    compiled(ids, **KW)
                for _ in range(forwards):
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.thread_time()
                    compiled(ids, **KW)
                    d["fwd"].append(time.perf_counter() - t0)
                    d["cpu"].append(time.thread_time() - c0)
    return {"collectives": n_coll, "message_bytes": message.nbytes, **out}


def summarize(rank: int, r: dict) -> list[dict]:
    rows = []
    for setting in ("free", "pinned"):
        d, n = r[setting], r["collectives"]
        least = min(d["in_situ"]) - min(d["phase"])
        coll_cpu = max(min(d["in_situ_cpu"]) - min(d["phase_cpu"]), 0.0)  # a collective's own CPU (in least)
        fwd, compute = min(d["fwd"]), min(d["cpu"]) - n * coll_cpu
        rows.append({"rank": rank, "setting": setting, "in_situ_least_ms": least * 1e3,
                     "in_situ_median_ms": (statistics.median(d["in_situ"]) - statistics.median(d["phase"])) * 1e3,
                     "in_situ_mean_ms": (statistics.mean(d["in_situ"]) - statistics.mean(d["phase"])) * 1e3,
                     "forward_mean_ms": statistics.mean(d["fwd"]) * 1e3,
                     "collective_cpu_ms": coll_cpu * 1e3,
                     "forward_least_ms": fwd * 1e3, "forward_median_ms": statistics.median(d["fwd"]) * 1e3,
                     "forward_least_cpu_ms": min(d["cpu"]) * 1e3, "forward_compute_cpu_ms": compute * 1e3,
                     "forward_collective_ms": (fwd - compute) / n * 1e3,
                     "compute_plus_in_situ_least_ms": (compute + n * least) * 1e3,
                     "block_least_ms": (min(d["blocks"]) - min(d["phase"])) * 1e3,
                     "block_error": (compute + n * (min(d["blocks"]) - min(d["phase"])) - fwd) / fwd,
                     "error": (compute + n * least - fwd) / fwd,
                     "mean_error": (compute + n * (statistics.mean(d["in_situ"]) - statistics.mean(d["phase"]))
                                    - statistics.mean(d["fwd"])) / statistics.mean(d["fwd"])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from meshc.runtime.launch import launch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=40, help="in-situ pairs per round and setting")
    p.add_argument("--forwards", type=int, default=25, help="forwards per round and setting")
    p.add_argument("--out", default="results_collective_waits_cpu.json", help="results file (in benchmarks/)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    ranks = launch(_rank, "tp=2", a.rounds, a.calls, a.forwards, timeout=600)
    rows = [row for i, r in enumerate(ranks) for row in summarize(i, r)]
    for row in rows:
        print(f"rank {row['rank']} {row['setting']:6}: in-situ least {row['in_situ_least_ms']:.3f} ms "
              f"(median {row['in_situ_median_ms']:.3f}); forward least {row['forward_least_ms']:.2f} "
              f"(median {row['forward_median_ms']:.2f}, least CPU {row['forward_least_cpu_ms']:.2f} of which "
              f"compute {row['forward_compute_cpu_ms']:.2f}), {row['forward_collective_ms']:.3f} per collective; "
              f"compute + {ranks[0]['collectives']} x in-situ least {row['compute_plus_in_situ_least_ms']:.2f} "
              f"({100 * row['error']:+.0f}%); blocks of {ranks[0]['collectives']}: least "
              f"{row['block_least_ms']:.3f} per pair ({100 * row['block_error']:+.0f}%); "
              f"mean: in-situ {row['in_situ_mean_ms']:.3f}, forward "
              f"{row['forward_mean_ms']:.2f}, compute + {ranks[0]['collectives']} x in-situ mean "
              f"{100 * row['mean_error']:+.0f}%")
    result = {"benchmark": "collective_waits", "model": MODEL, "plan": "megatron", "mesh": "tp=2",
              "collectives": ranks[0]["collectives"], "message_bytes": ranks[0]["message_bytes"], "rows": rows,
              "load_average_at_end": os.getloadavg(), "torch": torch.__version__,
              "seconds": time.perf_counter() - t0,
              "command": "python benchmarks/collective_waits.py " + " ".join(argv or [])}
    (Path(__file__).parent / a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
