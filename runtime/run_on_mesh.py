"""Run a model spec on a local mesh and compare with eager: what `meshc run` does.

Entry point: `run_on_mesh(model, mesh, plan="auto", batch=2, seqs=(16, 33), iters=5, timeout=120)
-> dict`. Every rank loads the model (same seed), compiles it for the mesh, runs it at each
sequence length from one compile, and compares with the eager model in the same process; rank 0's
report comes back with every rank's max error and the median forward time.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def run_on_mesh(model: str, mesh: str, plan: Any = "auto", batch: int = 2, seqs: tuple[int, ...] = (16, 33),
                iters: int = 5, timeout: float = 120.0, show_program: bool = False, pipeline: str = "default",
                microbatches: int = 0, preset: str | None = None) -> dict:
    """microbatches (meshes with a `pp` dim): 0 = `meshc.compile`'s default (the most, up to 2
    per stage, that divide the batch of each data-parallel replica). preset: also predict rank 0's
    forward with this cost-model preset (`meshc.predict`; a name or a `meshc calibrate` file)."""
    from meshc.runtime.launch import launch

    results = launch(_rank_main, mesh, model, plan, batch, tuple(seqs), iters, show_program, pipeline,
                     microbatches, preset, timeout=timeout)
    report = dict(results[0])
    report["max_abs_error"] = max(r["max_abs_error"] for r in results)
    report["per_rank_param_bytes"] = [r["param_bytes"] for r in results]
    return report


def _rank_main(device_mesh, model: str, plan: Any, batch: int, seqs: tuple[int, ...], iters: int,
               show_program: bool, pipeline: str, microbatches: int, preset: str | None = None) -> dict:
    import meshc
    from meshc.models import load_model
    from meshc.numerics import max_abs_error
    from meshc.runtime.sharded import local_state_bytes

    torch.set_num_threads(1)
    loaded = load_model(model, batch=batch, seq=seqs[0])
    t0 = time.perf_counter()
    try:
        compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                                 example_kwargs=loaded.example_kwargs, plan=plan, pipeline=pipeline,
                                 microbatches=microbatches)
    except meshc.PassError as e:
        raise e.replay_for(model) from e.__cause__  # the replay hint names the spec the user typed
    compile_s = time.perf_counter() - t0
    checks, times = [], []
    with torch.no_grad():
        for seq in seqs:
            inputs = loaded.inputs_at(batch, seq) if loaded.make_inputs else loaded.example_inputs
            ref = loaded.model(*inputs, **loaded.example_kwargs)
            out = compiled(*inputs, **loaded.example_kwargs)
            err, where, _ = max_abs_error(ref, out)
            checks.append({"batch": batch, "seq": seq, "max_abs_error": err, "where": where})
        for _ in range(iters):
            t = time.perf_counter()
            compiled(*loaded.example_inputs, **loaded.example_kwargs)
            times.append(time.perf_counter() - t)
    return {"model": model, "mesh": str(compiled.program.mesh), "rank": compiled.program.rank,
            "report": compiled.report, "checks": checks, "max_abs_error": max(c["max_abs_error"] for c in checks),
            "forward_ms_median": statistics.median(times) * 1e3, "forward_ms_least": min(times) * 1e3,
            "forward_calls": len(times), "compile_s": compile_s,
            "param_bytes": local_state_bytes(compiled),
            "full_param_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
            "program": compiled.program.code() if show_program else None,
            "predicted": _predicted(compiled.program, preset)}


def _predicted(program, preset: str | None) -> dict | None:
    """The cost model's forward time for this rank's program (one per stage on a pp mesh)."""
    if preset is None:
        return None
    from meshc.predict import stage_times

    return {"preset": preset, "stages_ms": [p.total_s * 1e3 for p in stage_times(program, preset)]}
