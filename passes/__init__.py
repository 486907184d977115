"""meshc.passes: one module per pass, each registering itself with `meshc.pipeline.register_pass`.

A pass is `fn(program, **options) -> Program`; it may rewrite the clone it is given, never
imports the runtime, and when it cannot apply it raises an error naming the node and pattern.
Importing this package registers every pass (see `meshc passes` for the table). Everything that
rewrites a graph is a pass — sharding (`auto_shard`, `spmd_partition`), pipeline stages
(`pipeline_partition`, `split_stages`), training plumbing (`differentiable_collectives`,
`weight_grad_outputs`, `zero`, and on the training-step graph `bucket_gradients`) — so `meshc
show --after NAME` prints every program that runs.
"""

from meshc.passes import (  # noqa: F401
    attention_removal,
    auto_shard,
    bucket_gradients,
    dce,
    differentiable_collectives,
    ffn_fusion,
    ladder_residual,
    lint,
    parallel_blocks,
    pipeline_partition,
    propagate_shapes,
    speculative_heads,
    split_stages,
    spmd_partition,
    weight_grad_outputs,
    zero,
)
