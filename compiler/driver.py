"""compile(): capture → PassManager → backend → runtime. The whole compiler in one function.

Entry point: `compile(model, mesh=None, example_inputs=..., ...)` → `CompiledModel`. The CLI
calls the same function with instruments switched on; it has no logic of its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from meshc.capture import capture
from meshc.instruments import Instrument, Timings
from meshc.mesh import MeshSpec
from meshc.pass_manager import PassManager
from meshc.pipeline import resolve


def compile(  # noqa: A001 - the public name is meshc.compile
    model: torch.nn.Module,
    mesh: Any = None,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    pipeline: str = "default",
    backend: str = "auto",
    dynamic_shapes: Any = "auto",
    instruments: Sequence[Instrument] = (),
    plan: Any = "auto",
    schedule: str = "1f1b",
    microbatches: int = 0,
    virtual: int = 1,
):
    """Compile `model` for `mesh` and return a CompiledModel with the model's call signature.

    mesh: None (this device), 'tp=2' / 'dp=2,tp=2' shorthand, or a torch DeviceMesh.
    pipeline: 'default' or a pipeline string such as 'dce,propagate_shapes,lint'.
    dynamic_shapes: 'auto' (every input dim may vary), None (static), or torch.export's format.
    plan: how a mesh larger than one device shards the model: 'auto' (default: the auto_shard pass
      chooses with the cost model, within Megatron's per-rank parameter memory), 'megatron', None/'replicate',
      a glob dict {'*.q_proj.weight': 'S(0)'}, or a parallelize_module-style dict (see meshc.plan).
      Such a mesh needs one process per device: call compile inside meshc.launch or torchrun.
    schedule, microbatches (0 = the most, up to 2 per stage, that divide the example batch),
      virtual: for a mesh with a 'pp' dim, the pipeline schedule (meshc.schedules) the returned
      PipelineModel runs; validated before capture. Every stage is lowered by `backend`.
    The pipeline that runs comes from `meshc.pipeline.resolve` (what every CLI command uses too).
    """
    from meshc.runtime.compiled_model import CompiledModel

    spec = MeshSpec.parse(mesh)
    batch = _example_batch(example_inputs)
    # the one resolver; a schedule that cannot work fails here, before capture and before any rank waits
    resolved = resolve(spec, pipeline, plan, schedule, microbatches, virtual, batch)
    device_mesh = None
    if spec.size > 1:
        from meshc.runtime.mesh import device_mesh_for

        device_mesh = device_mesh_for(spec, mesh)
    manager = PassManager(resolved.pipeline, instruments=[*instruments, timings := Timings()])
    t0 = time.perf_counter()
    program = capture(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes, mesh=spec)
    t1 = time.perf_counter()
    captured_nodes = program.num_nodes()
    if device_mesh is not None:
        program.rank, program.plan = device_mesh.get_rank(), plan or "replicate"
    program = manager.run(program)
    t2 = time.perf_counter()
    if resolved.schedule is not None:
        from meshc.runtime.pipeline import pipeline_model

        compiled = pipeline_model(program, device_mesh, resolved.schedule, backend)
    else:
        if device_mesh is not None:
            from meshc.runtime.mesh import bind

            bind(program, device_mesh)
        compiled = CompiledModel(program, backend)
    t3 = time.perf_counter()
    report = "\n".join([timings.table(), "", *program.notes,
                        f"capture {(t1 - t0) * 1e3:.0f} ms ({captured_nodes} nodes) -> passes "
                        f"{(t2 - t1) * 1e3:.0f} ms -> lowering to {compiled.backend} {(t3 - t2) * 1e3:.0f} ms"])
    compiled.report = report
    return compiled


def _example_batch(example_inputs: tuple | None) -> int | None:
    """Dim 0 of the first batched tensor input (what micro-batches and dp replicas split)."""
    for t in example_inputs or ():
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None
