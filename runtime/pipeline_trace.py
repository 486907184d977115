"""Measured pipeline timelines: Chrome/Perfetto traces, idle fractions, measured vs predicted.

Entry points: `chrome_trace(traces) -> dict` (write it with `json.dump`; open in ui.perfetto.dev
or chrome://tracing), `idle_fractions(traces) -> list[float]`, `report(schedule, traces,
predicted_stage_s=None) -> str`, and `run_schedule(model, mesh, schedule, microbatches, ...)`
(compile on a local mesh, run steps, return every rank's trace and the report) and `cli_run(args,
schedule)` (what `meshc schedule --run MODEL` calls: run, write the trace file, print the report).

A trace is one rank's `PipelineModel.last_trace`: per action its op, stage, micro-batch, start and
end (`time.perf_counter()`, one monotonic clock for every process of a machine) and `wait`, the
part spent blocked on a receive. Compute time is end - start - wait; a rank is idle whenever it
is not computing between the first start and the last end over all ranks.

Never changes a schedule or a model; measurement only.
"""

from __future__ import annotations

import statistics
from typing import Any

from meshc.schedules import Schedule, simulate


def _window(traces: list[list[dict]]) -> tuple[float, float]:
    events = [e for t in traces for e in t]
    return min(e["start"] for e in events), max(e["end"] for e in events)


def chrome_trace(traces: list[list[dict]]) -> dict:
    """Chrome trace-event JSON: one track per pp rank, one slice per action, a nested 'recv wait'
    slice where the action was blocked on a receive."""
    t0, _ = _window(traces)
    events: list[dict[str, Any]] = []
    for trace in traces:
        for e in trace:
            name = f"{e['op']}{e['stage']}.{e['mb']}"
            ts, dur = (e["start"] - t0) * 1e6, (e["end"] - e["start"]) * 1e6
            tid = e["pp_rank"]
            events.append({"name": name, "cat": e["op"], "ph": "X", "ts": ts, "dur": dur, "pid": e["rank"],
                           "tid": tid, "args": {"stage": e["stage"], "microbatch": e["mb"],
                                                "recv_wait_ms": e["wait"] * 1e3}})
            if e["wait"] > 0:
                events.append({"name": "recv wait", "cat": "wait", "ph": "X", "ts": ts, "dur": e["wait"] * 1e6,
                               "pid": e["rank"], "tid": tid})
        if trace:
            events.append({"name": "process_name", "ph": "M", "pid": trace[0]["rank"],
                           "args": {"name": f"rank {trace[0]['rank']} (pp {trace[0]['pp_rank']})"}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def idle_fractions(traces: list[list[dict]]) -> list[float]:
    """Per rank: 1 - compute time / the step's wall time (first start to last end, all ranks)."""
    t0, t1 = _window(traces)
    return [1.0 - sum(e["end"] - e["start"] - e["wait"] for e in t) / (t1 - t0) for t in traces]


def measured_costs(traces: list[list[dict]]) -> dict[tuple[str, int], float]:
    """(op, stage) -> median compute seconds over its micro-batches."""
    by: dict[tuple[str, int], list[float]] = {}
    for t in traces:
        for e in t:
            by.setdefault((e["op"], e["stage"]), []).append(e["end"] - e["start"] - e["wait"])
    return {k: statistics.median(v) for k, v in by.items()}


def report(schedule: Schedule, traces: list[list[dict]], predicted_stage_s: dict[int, float] | None = None) -> str:
    """Per stage: predicted forward time (from the cost model, if given) vs measured per op; per
    rank: measured idle fraction vs the schedule simulated with the measured costs."""
    costs = measured_costs(traces)
    ops = [op for op in ("F", "B", "I", "W") if any(k[0] == op for k in costs)]
    lines = ["stage  predicted F ms  " + "  ".join(f"measured {op} ms" for op in ops)]
    for s in range(schedule.num_stages):
        pred = predicted_stage_s.get(s) if predicted_stage_s else None
        cells = [f"{costs[op, s] * 1e3:13.2f}" if (op, s) in costs else f"{'-':>13}" for op in ops]
        lines.append(f"{s:<5}  {(f'{pred * 1e3:.2f}' if pred is not None else '-'):>14}  " + "  ".join(cells))
    sim = simulate(schedule, stage_cost=lambda a: costs.get((a.op, a.stage), 0.0))
    t0, t1 = _window(traces)
    idle = idle_fractions(traces)
    lines.append("")
    lines.append(f"step: measured {(t1 - t0) * 1e3:.1f} ms, simulated with the measured costs "
                 f"{sim.makespan * 1e3:.1f} ms (the difference is transfer and scheduling overhead)")
    lines.append("idle fraction per rank: measured " + "  ".join(f"r{r} {x:.1%}" for r, x in enumerate(idle))
                 + " | simulated " + "  ".join(f"r{r} {x:.1%}" for r, x in enumerate(sim.bubble)))
    return "\n".join(lines)


def predicted_stage_seconds(program) -> dict[int, float] | None:
    """Forward seconds per stage from the cost model's `meshc_cost` on each node (None if absent)."""
    out: dict[int, float] = {}
    for n in program.graph.nodes:
        if isinstance(n.meta.get("meshc_stage"), int) and isinstance(n.meta.get("meshc_cost"), (int, float)):
            out[n.meta["meshc_stage"]] = out.get(n.meta["meshc_stage"], 0.0) + float(n.meta["meshc_cost"])
    return out or None


def run_schedule(model: str, mesh: str, schedule: str, microbatches: int, virtual: int = 1, steps: int = 3,
                 batch: int | None = None, seq: int = 16, timeout: float = 300.0) -> dict:
    """Compile `model` for `mesh` with `schedule`, run `steps` training steps on a local mesh (the
    last one is traced) and return {'traces', 'chrome', 'report', 'schedule'}."""
    from meshc.mesh import MeshSpec
    from meshc.runtime.launch import launch
    from meshc.schedules import build_schedule

    sched = build_schedule(schedule, MeshSpec.parse(mesh).pp, microbatches, virtual)  # fails first
    results = launch(_run_rank, mesh, model, schedule, microbatches, virtual, steps, batch or 2 * microbatches, seq,
                     timeout=timeout)
    traces = [r[0] for r in results]
    predicted = results[0][1]
    return {"traces": traces, "chrome": chrome_trace(traces), "report": report(sched, traces, predicted),
            "schedule": sched}


def _run_rank(device_mesh, model: str, schedule: str, microbatches: int, virtual: int, steps: int, batch: int,
              seq: int):
    import meshc
    import torch
    from meshc.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(model, batch=batch // microbatches, seq=seq)  # captured (and costed) as one micro-batch
    pipe = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                         example_kwargs=loaded.example_kwargs, schedule=schedule, microbatches=microbatches,
                         virtual=virtual)
    inputs = tuple(torch.cat([t] * microbatches) if isinstance(t, torch.Tensor) and t.dim() else t
                   for t in loaded.example_inputs)
    with torch.no_grad():
        out = loaded.model(*inputs, **loaded.example_kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    target = torch.randint(0, max(2, logits.shape[-1]), logits.shape[:-1], generator=torch.Generator().manual_seed(0))

    def loss_fn(o, t):
        x = o.logits if hasattr(o, "logits") else o
        return torch.nn.functional.cross_entropy(x.flatten(0, -2), t.flatten())

    for _ in range(steps):
        torch.distributed.barrier()
        if pipe.schedule.training:
            pipe.train_step(inputs, target, loss_fn, loaded.example_kwargs)
        else:
            pipe(*inputs, **loaded.example_kwargs)
    return pipe.last_trace, predicted_stage_seconds(pipe.program)


def cli_run(args: Any, schedule: Schedule) -> int:
    """`meshc schedule --pp P ... --run MODEL [--trace FILE --batch B --seq S --timeout T]`."""
    import json

    from meshc.errors import InputError

    if args.batch % schedule.microbatches:
        raise InputError(f"--batch {args.batch} does not divide into {schedule.microbatches} micro-batches; "
                         f"use a multiple of {schedule.microbatches}")
    print(f"\nrunning {args.run} on a local mesh 'pp={schedule.pp}' ({schedule.pp} processes), batch {args.batch} "
          f"x seq {args.seq}, {schedule.microbatches} micro-batches ...", flush=True)
    result = run_schedule(args.run, f"pp={schedule.pp}", schedule.name, schedule.microbatches, schedule.virtual,
                          steps=3, batch=args.batch, seq=args.seq, timeout=args.timeout)
    with open(args.trace, "w") as f:
        json.dump(result["chrome"], f)
    print(f"\nmeasured (last of 3 steps) vs predicted, per stage:\n{result['report']}")
    print(f"\ntrace of every action on every rank: {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0
