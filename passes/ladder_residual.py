"""ladder_residual: sub-layer k reads the residual stream from `delay` steps earlier.

Entry point: the pass `ladder_residual(layers="all", delay=1)`. With sub-layers numbered
k = 1..n (attention, MLP, attention, ...; a parallel block - attention and MLP off the same
stream, one residual add - is one sub-layer) and h_k(x) = F_k(Norm_k(x)):

    standard:  x_k = x_{k-1} + h_k(x_{k-1})
    ladder:    x_k = x_{k-1} + h_k(x_{k-1-delay})        (x_j = x_0 for j < 0)

so under tensor parallelism the all-reduce of h_k no longer blocks sub-layer k+1 and runs while
it computes (spmd_partition schedules waits as late as dependencies allow). No parameters are
added; the model computes something else and must be healed (Ladder Residual, 2025).
`delay=0` leaves the Program unchanged. The residual stream and its layers are found from the
graph (`residual_stream.py`: a layer starts at each attention sub-layer); `layers` selects
transformer layers (`meshc.passes.layer_select`: `all`, `last:N`, `first:N`, `i-j`, `'3,5,7'`). A post-norm
decoder has no residual stream to rewire: the error names the norm node.
"""

from __future__ import annotations

from meshc.errors import MeshcError, NodeError
from meshc.passes.layer_select import select_layers
from meshc.passes.residual_stream import find_residual_stream
from meshc.pipeline import register_pass
from meshc.program import Program


@register_pass("ladder_residual", preserves_semantics=False,
               description="sub-layers read the residual stream one step earlier, so all-reduces overlap compute")
def ladder_residual(program: Program, *, layers: str = "all", delay: int = 1) -> Program:
    if delay < 0:
        raise MeshcError(f"ladder_residual: delay must be >= 0, got {delay}")
    stream = find_residual_stream(program)
    n_sub, grouped = len(stream), stream.layers()
    chosen = select_layers(layers, len(grouped))
    subs = [k for layer in chosen for k in grouped[layer]]
    if delay == 0:
        program.notes.append("ladder_residual: delay=0, Program unchanged")
        return program
    bodies = {k: stream.body(k) for k in subs}  # before any rewiring
    rewired = []
    for k in subs:
        old, new = stream.xs[k - 1], stream.xs[max(0, k - 1 - delay)]
        if old is new:
            continue
        if str(old.meta["val"].shape) != str(new.meta["val"].shape):
            raise NodeError(old, f"ladder_residual: sub-layer {k} reads the residual stream in shape "
                                 f"{list(old.meta['val'].shape)}, but x_(k-1-{delay}) has shape "
                                 f"{list(new.meta['val'].shape)}: the model reshapes its stream between "
                                 f"sub-layers here, and ladder_residual rewires only a stream of one shape")
        for node in bodies[k]:
            if old in node.all_input_nodes:
                node.replace_input_with(old, new)
                node.meta["meshc_pass"] = "ladder_residual"
        rewired.append(k)
    program.gm.recompile()
    program.notes.append(
        f"ladder_residual: {len(grouped)} layers / {n_sub} sub-layers found; rewired sub-layers {rewired} "
        f"(layers {chosen[0]}..{chosen[-1]}) to read x_(k-{1 + delay})")
    return program
