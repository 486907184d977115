"""What `meshc.compile(..., training=True, zero=N)` adds to the pipeline that runs.

Entry point: `training_pipeline(pipeline, mesh, zero) -> str`. On a dp/tp mesh (or one device)
the forward's passes run as for inference, then `differentiable_collectives` (every collective
carries its adjoint from the one redistribution table) and `zero(stage=N)` (the trainable
parameters' placements on dp and their gradients' reductions; with `mixed_precision='bf16'` its
`compute_dtype` option, which the traced step's autocast reads), before `lint`. From the resulting
Program `meshc.training_step` traces the per-rank training-step Program that
`CompiledModel.train_step` runs (`meshc.runtime.training`). A pp mesh
already trains through the pipeline runtime (its resolver adds the differentiable collectives);
zero=1/2 there shard the optimizer state (and gradients) over its dp dim at run time
(`meshc.runtime.pipeline_zero`); zero=3 there is not implemented yet, an error here, before capture.
"""

from __future__ import annotations

from meshc.errors import MeshcError
from meshc.mesh import MeshSpec
from meshc.pipeline import parse_pipeline

#: mixed_precision= -> the dtype train_step computes in (autocast); master weights stay fp32
MIXED_PRECISION = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def training_pipeline(pipeline: str, mesh: MeshSpec, zero: int = 0, mixed_precision: str | None = None) -> str:
    if zero not in (0, 1, 2, 3):
        raise MeshcError(f"zero={zero!r} is not a ZeRO stage; use 0 (data parallel), 1 (optimizer state sharded), "
                         f"2 (and gradients) or 3 (and parameters)")
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise MeshcError(f"mixed_precision={mixed_precision!r} is not known; use one of {', '.join(MIXED_PRECISION)} "
                         f"or None (fp32)")
    if zero and mesh.dp <= 1:
        raise MeshcError(f"zero={zero} shards over the 'dp' dim, but mesh '{mesh}' has none; use zero=0 or a mesh "
                         f"with dp>1 such as 'dp=2'")
    if mesh.pp > 1:
        if mixed_precision:
            raise MeshcError(f"mixed_precision on a pp mesh ('{mesh}') is not implemented yet")
        if zero == 3:
            raise MeshcError(f"zero=3 on a pp mesh ('{mesh}') is not implemented yet; the pipeline runtime "
                             f"trains with zero=0, 1 or 2 (PipelineModel.train_step)")
        return pipeline
    names = [c.name for c in parse_pipeline(pipeline)]
    added = [] if "differentiable_collectives" in names else ["differentiable_collectives"]
    dtype = f",compute_dtype={MIXED_PRECISION[mixed_precision]}" if mixed_precision else ""
    added += [] if "zero" in names else [f"zero(stage={zero}{dtype})"]
    head, lint = (pipeline.strip()[:-len("lint")].rstrip(", "), ",lint") if names[-1:] == ["lint"] else (pipeline, "")
    return ",".join([head, *added]) + lint
