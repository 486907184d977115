"""Measured pipeline bubbles on uniform synthetic stages vs the textbook formula, on a gloo mesh.

    .venv/bin/python benchmarks/pipeline_bubble.py                 # p=4, m in {4, 8, 16}, T=50 ms
    .venv/bin/python benchmarks/pipeline_bubble.py --pp 4 --unit-ms 10

Each of the p stages is one block `x = slow(x; F=T, dx=T) + slow(w; dw=T)` made of a custom op
that sleeps (sleeping, not spinning, so p processes on fewer cores do not distort the timing):
forward T, input-gradient T, weight-gradient T, so F = I = W = T and B = I + W = 2T, the costs the
schedules assume. The model is captured by meshc and run by meshc's pipeline runtime (real gloo
point-to-point transfers); block i is stage i. Per rank, the idle fraction is 1 - compute time /
the step's wall time (`meshc.runtime.pipeline_trace.idle_fractions`). GPipe and 1F1B should
match (p-1)/(m+p-1); ZB-H1 should be below 1F1B and near its simulation. (Stage 0 adds a
parameter b before its block, so its activation path has a backward like every other stage's.)
Writes benchmarks/results_pipeline_bubble_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _register_ops() -> None:
    if hasattr(torch.ops, "meshc_bench") and hasattr(torch.ops.meshc_bench, "slow"):
        return

    @torch.library.custom_op("meshc_bench::slow", mutates_args=())
    def slow(x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        return x.clone()

    @slow.register_fake
    def _(x, forward_s, backward_s):
        return torch.empty_like(x)

    def setup(ctx, inputs, output):
        ctx.backward_s = inputs[2]

    def backward(ctx, grad):
        return torch.ops.meshc_bench.slow(grad, ctx.backward_s, 0.0), None, None

    slow.register_autograd(backward, setup_context=setup)


class Uniform(torch.nn.Module):
    def __init__(self, blocks: int, unit_s: float, dim: int = 16):
        super().__init__()
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(dim)) for _ in range(blocks)])
        self.b = torch.nn.Parameter(torch.zeros(dim))  # so stage 0's activation path has a backward too
        self.unit_s = unit_s

    def forward(self, x):
        slow = torch.ops.meshc_bench.slow
        x = x + self.b
        for w in self.w:  # F = T on the activation path; its backward (I) T; the weight's backward (W) T
            x = slow(x, self.unit_s, self.unit_s) + slow(w, 0.0, self.unit_s)
        return x


def _rank(device_mesh, unit_s: float, micro: list[int], schedules: list[str], steps: int) -> list[dict]:
    import meshc
    from meshc.runtime.pipeline import PipelineModel
    from meshc.runtime.pipeline_trace import idle_fractions
    from meshc.schedules import build_schedule, simulate

    _register_ops()
    torch.set_num_threads(1)
    pp = device_mesh.size()
    torch.manual_seed(0)
    model = Uniform(pp, unit_s)
    out = []
    for m in micro:
        x = torch.randn(m, 16)
        program = meshc.capture(model, (x,), dynamic_shapes="auto", mesh=f"pp={pp}")
        program.rank = device_mesh.get_rank()
        block, adds = 0, 0
        for n in program.graph.nodes:  # stage i = block i (each block ends at its add; the first add is x + b)
            if n.op == "call_function":
                n.meta["meshc_stage"] = block
                if n.target is torch.ops.aten.add.Tensor:
                    adds += 1
                    block += adds > 1
        for name in schedules:
            sched = build_schedule(name, pp, m)
            pipe = PipelineModel(program, sched, device_mesh)
            idle = []
            for step in range(steps + 1):
                torch.distributed.barrier()
                pipe.train_step((x,), None, lambda y, t: y.pow(2).mean())
                if step:  # the first step warms up
                    idle.append(idle_fractions(_gather(pipe.last_trace)))
            per_rank = [statistics.median(r[k] for r in idle) for k in range(pp)]
            out.append({"schedule": name, "pp": pp, "microbatches": m, "measured_idle_per_rank": per_rank,
                        "measured_idle_mean": statistics.fmean(per_rank), "formula": (pp - 1) / (m + pp - 1),
                        "simulated_idle_mean": statistics.fmean(simulate(sched).bubble)})
    return out


def _gather(trace: list[dict]) -> list[list[dict]]:
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, trace)
    return everyone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--unit-ms", type=float, default=50.0, help="T: forward = input-grad = weight-grad time")
    ap.add_argument("--microbatches", default="4,8,16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_pipeline_bubble_cpu.json")))
    args = ap.parse_args(argv)
    from meshc.runtime.launch import launch

    micro = [int(m) for m in args.microbatches.split(",")]
    schedules = ["gpipe", "1f1b", "zb-h1"]
    rows = launch(_rank, f"pp={args.pp}", args.unit_ms / 1e3, micro, schedules, args.steps, timeout=600)[0]
    print(f"{'schedule':<8} {'m':>3}  {'measured idle (mean)':>20}  {'(p-1)/(m+p-1)':>13}  {'rel. diff':>9}  "
          f"{'simulated':>9}  per rank")
    for r in rows:
        rel = (r["measured_idle_mean"] - r["formula"]) / r["formula"]
        r["relative_to_formula"] = rel
        print(f"{r['schedule']:<8} {r['microbatches']:>3}  {r['measured_idle_mean']:>20.3f}  {r['formula']:>13.3f}  "
              f"{rel:>+9.1%}  {r['simulated_idle_mean']:>9.3f}  "
              + " ".join(f"{x:.3f}" for x in r["measured_idle_per_rank"]))
    zb = {r["microbatches"]: r["measured_idle_mean"] for r in rows if r["schedule"] == "zb-h1"}
    one = {r["microbatches"]: r["measured_idle_mean"] for r in rows if r["schedule"] == "1f1b"}
    result = {"benchmark": "pipeline_bubble", "pp": args.pp, "unit_ms": args.unit_ms, "rows": rows,
              "zb_h1_minus_1f1b_idle": {m: zb[m] - one[m] for m in zb},
              "machine": f"{platform.machine()}, gloo, {args.pp} processes, sleeping stages",
              "torch": torch.__version__, "command": "python benchmarks/pipeline_bubble.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("ZB-H1 idle minus 1F1B idle: " + ", ".join(f"m={m}: {d:+.3f}" for m, d in
                                                        result["zb_h1_minus_1f1b_idle"].items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
