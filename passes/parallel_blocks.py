"""parallel_blocks: consecutive whole decoder blocks read the same input and add up their outputs.

Entry point: the pass `parallel_blocks(runs=...)` (not semantics-preserving; the FFN Fusion
paper's block-level variant). For each run of consecutive decoder layers (`runs=1-2`, or a quoted
list of runs `'1-2,4-5'` as in `layer_select`):

    sequential:  x <- x + f_i(x)              for i in the run, one after another
    parallel:    x <- x + sum_i f_i(x)

where f_i(x) is block i's full contribution computed as inside the block: its attention
a_i = Attn_i(Norm(x)), then its FFN on x + a_i, f_i(x) = a_i + FFN_i(Norm(x + a_i)) (for a
block of any number of sub-layers: the sum of its sub-layer outputs, each sub-layer reading the
block-internal stream). The rewrite rewires the blocks after the first to read the run's input
and adds one sum; no weights change. Blocks are found from the residual stream in the graph
(`residual_stream.py`), numbered as in the model (also after attention_removal).
"""

from __future__ import annotations

import torch
from meshc.errors import MeshcError
from meshc.passes.attention_removal import stamp_layers
from meshc.passes.dce import dce
from meshc.passes.graph_params import erase_unused, refresh_values
from meshc.passes.layer_select import select_runs
from meshc.passes.residual_stream import find_residual_stream
from meshc.pipeline import register_pass
from meshc.program import Program

aten = torch.ops.aten


@register_pass("parallel_blocks", preserves_semantics=False,
               description="consecutive decoder blocks read the same input: x + sum_i f_i(x)")
def parallel_blocks(program: Program, *, runs: str = "") -> Program:
    if not runs.strip():
        raise MeshcError("parallel_blocks: name the runs of consecutive decoder layers, e.g. runs=1-2 or "
                         "runs='1-2,4-5'")
    program = dce(program)
    stream = find_residual_stream(program)
    grouped = stamp_layers(stream)
    graph, done = program.graph, []
    replaced = {}  # a run's old output add -> its new one (the next run's input)
    for run in select_runs(runs, len(grouped), option="runs"):
        if len(run) < 2:
            raise MeshcError(f"parallel_blocks: runs={runs!r}: layer {run[0]} alone is not a run; name two or more "
                             f"consecutive layers (i-j)")
        empty = [layer for layer in run if not grouped[layer]]
        if empty:
            raise MeshcError(f"parallel_blocks: layer(s) {empty} have no sub-layer of their own any more (fused into "
                             f"an earlier layer)")
        x_in = stream.xs[grouped[run[0]][0] - 1]
        x_in = replaced.get(x_in, x_in)
        contributions = []
        for layer in run:
            subs = grouped[layer]
            old_in = stream.xs[subs[0] - 1]
            for k in subs:  # the block reads the run's input instead of the previous block's output
                for node in [*stream.body(k), stream.adds[k - 1]]:
                    if old_in in node.all_input_nodes and old_in is not x_in:
                        node.replace_input_with(old_in, x_in)
                        node.meta["meshc_pass"] = "parallel_blocks"
            contributions.append([stream.hs[k - 1] for k in subs])
        last_add = stream.adds[grouped[run[-1]][-1] - 1]
        with graph.inserting_before(last_add):
            total = None
            for hs in contributions:
                f = hs[0]
                for h in hs[1:]:
                    f = _add(graph, f, h, last_add)
                total = f if total is None else _add(graph, total, f, last_add)
            new = _add(graph, x_in, total, last_add)
        new.meta["meshc_layer"] = tuple(run)
        last_add.replace_all_uses_with(new)
        replaced[last_add] = new
        done.append(run)
    dead = {stream.adds[grouped[layer][-1] - 1] for run in done for layer in run}
    erase_unused(program, dead)
    refresh_values(program)
    program.gm.recompile()
    program.notes.append(f"parallel_blocks: layers {done} now read their run's input and add sum_i f_i(x)")
    return program


def _add(graph, a, b, like):
    node = graph.call_function(aten.add.Tensor, (a, b))
    node.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.meta["meshc_pass"] = "parallel_blocks"
    return node
