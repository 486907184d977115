"""compile(): capture → PassManager → backend → runtime. The whole compiler in one function.

Entry point: `compile(model, mesh=None, example_inputs=..., ...)` → `CompiledModel`. The CLI
calls the same function with instruments switched on; it has no logic of its own.
"""

from __future__ import annotations

import dataclasses
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
    max_cache_len: int | None = None,
    max_batch_size: int | None = None,
    generate: bool | None = None,
    training: bool = False,
    zero: int = 0,
    mixed_precision: str | None = None,
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
    max_cache_len (default: max_position_embeddings, at most 2048), max_batch_size (default: the
      example batch), generate (default: True when either is given): also capture a prefill and a
      decode Program with the KV cache as inputs (`meshc.capture_decode`), through the same pipeline,
      for `compiled.generate(...)`. A Hugging Face model is captured with use_cache=False for the forward.
    training, zero: also make the Program trainable (`meshc.training`): `compiled.train_step`,
      `make_optimizer`, `clip_grad_norm_` (`meshc.runtime.training`); zero=1/2/3 shards optimizer
      state / gradients / parameters over the dp dim (ZeRO). zero>0 implies training.
      mixed_precision='bf16': train_step computes in bfloat16 (autocast) on fp32 master weights.
    """
    from meshc.runtime.compiled_model import CompiledModel

    spec = MeshSpec.parse(mesh)
    batch = _example_batch(example_inputs)
    # the one resolver; a schedule that cannot work fails here, before capture and before any rank waits
    resolved = resolve(spec, pipeline, plan, schedule, microbatches, virtual, batch)
    if training or zero or mixed_precision:
        from meshc.training import training_pipeline

        resolved = dataclasses.replace(resolved, pipeline=training_pipeline(resolved.pipeline, spec, zero,
                                                                            mixed_precision))
    device_mesh = None
    if spec.size > 1:
        from meshc.runtime.mesh import device_mesh_for

        device_mesh = device_mesh_for(spec, mesh)
    manager = PassManager(resolved.pipeline, instruments=[*instruments, timings := Timings()])
    t0 = time.perf_counter()
    example_kwargs = _forward_without_cache(model, example_kwargs)
    program = capture(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes, mesh=spec)
    t1 = time.perf_counter()
    captured_nodes = program.num_nodes()
    if device_mesh is not None:
        program.rank, program.plan = device_mesh.get_rank(), plan or "replicate"
    program = manager.run(program)
    t2 = time.perf_counter()
    if resolved.schedule is not None:
        from meshc.runtime.pipeline import pipeline_model

        compiled = pipeline_model(program, device_mesh, resolved.schedule, backend, zero=zero)
    else:
        if device_mesh is not None:
            from meshc.runtime.mesh import bind

            bind(program, device_mesh)
        compiled = CompiledModel(program, backend)
    if generate or (generate is None and (max_cache_len or max_batch_size)):
        compiled.decoder = _decoder(model, program, device_mesh, manager, backend, batch, max_cache_len,
                                    max_batch_size, plan or "replicate")
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


def _forward_without_cache(model: torch.nn.Module, example_kwargs: dict | None) -> dict | None:
    """A Hugging Face model whose use_cache defaults to True is captured with use_cache=False: the
    forward Program is stateless; generation has its own Programs with the cache as inputs."""
    kwargs = dict(example_kwargs or {})
    if getattr(getattr(model, "config", None), "use_cache", False) and not {"use_cache", "cache",
                                                                           "past_key_values"} & set(kwargs):
        kwargs["use_cache"] = False
    return kwargs or example_kwargs


def _decoder(model, forward, device_mesh, manager, backend, batch, max_cache_len, max_batch_size,
             plan: Any = "auto"):
    """Capture the prefill and decode Programs, run the pipeline on both (as rank `forward.rank`
    with the plan spec the forward was compiled with), bind them to the mesh, lower them (runtime). The cache is placed
    by `meshc.plan.held_placements`: heads over tp, batch over dp. On a pp mesh both Programs are
    partitioned for the forward-only schedule with one micro-batch and run by the pipeline
    runtime; each stage's rank holds its layers' cache."""
    from meshc.capture_decode import capture_decode
    from meshc.errors import MeshcError
    from meshc.runtime.generate import Decoder

    spec = forward.mesh
    if spec.pp > 1 and spec.dp > 1:
        raise MeshcError(f"generation on mesh '{spec}' is not implemented yet (one device, dp, tp, dp x tp, pp and "
                         f"pp x tp meshes are); compile without max_cache_len for the distributed forward")
    config = getattr(model, "config", None)
    if max_cache_len is None:
        max_cache_len = min(getattr(config, "max_position_embeddings", None) or 2048, 2048)
    programs = capture_decode(model, max_batch_size or batch or 1, max_cache_len)
    runners = {}
    if spec.pp > 1:
        resolved = resolve(spec, "default", plan, "forward", 1)
        manager = PassManager(resolved.pipeline, instruments=manager.instruments)
    for name in ("prefill", "decode"):
        p = getattr(programs, name)
        p.mesh, p.rank, p.plan = spec, forward.rank, plan
        p = manager.run(p)
        if spec.pp > 1:
            from meshc.runtime.pipeline import pipeline_model

            runners[name] = pipeline_model(p, device_mesh, resolved.schedule, backend)
        elif device_mesh is not None:
            from meshc.runtime.mesh import bind

            bind(p, device_mesh)
        setattr(programs, name, p)
    gen = getattr(model, "generation_config", None) or config
    defaults = {k: getattr(gen, k, None) for k in ("eos_token_id", "pad_token_id")}
    return Decoder(programs, backend, defaults, runners)
