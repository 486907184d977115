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
from meshc.errors import MeshError
from meshc.instruments import Instrument, Timings
from meshc.mesh import MeshSpec
from meshc.pass_manager import PassManager
from meshc.pipeline import DEFAULT_PIPELINES


def default_pipeline(mesh: MeshSpec) -> str:
    return DEFAULT_PIPELINES["single"]


def compile(  # noqa: A001 - the public name is meshc.compile
    model: torch.nn.Module,
    mesh: Any = None,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    pipeline: str = "default",
    backend: str = "auto",
    dynamic_shapes: Any = "auto",
    instruments: Sequence[Instrument] = (),
):
    """Compile `model` for `mesh` and return a CompiledModel with the model's call signature.

    mesh: None (this device), 'tp=2' / 'dp=2,tp=2' shorthand, or a torch DeviceMesh.
    pipeline: 'default' or a pipeline string such as 'dce,propagate_shapes,lint'.
    dynamic_shapes: 'auto' (every input dim may vary), None (static), or torch.export's format.
    """
    from meshc.backends import lower
    from meshc.runtime.compiled_model import CompiledModel

    spec = MeshSpec.parse(mesh)
    check_runnable(spec)
    manager = PassManager(default_pipeline(spec) if pipeline == "default" else pipeline,
                          instruments=[*instruments, timings := Timings()])
    t0 = time.perf_counter()
    program = capture(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes, mesh=spec)
    t1 = time.perf_counter()
    captured_nodes = program.num_nodes()
    program = manager.run(program)
    t2 = time.perf_counter()
    run_flat, backend_name = lower(program, backend)
    t3 = time.perf_counter()
    report = (f"{timings.table()}\n\ncapture {(t1 - t0) * 1e3:.0f} ms ({captured_nodes} nodes) -> passes "
              f"{(t2 - t1) * 1e3:.0f} ms -> lowering to {backend_name} {(t3 - t2) * 1e3:.0f} ms")
    return CompiledModel(program, run_flat, backend_name, report=report)


def check_runnable(spec: MeshSpec) -> None:
    """This build executes single-device programs; a larger mesh is an error, not a wrong answer."""
    if spec.size > 1:
        raise MeshError(
            f"mesh '{spec}' has {spec.size} devices, but this build of meshc runs single-device "
            f"programs only (the distributed runtime is not built yet). Compile with mesh=None "
            f"or a 1-device mesh such as 'tp=1'."
        )
