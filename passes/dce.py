"""dce: dead-code elimination, including torch.export's `_assert_tensor_metadata` checks.

The asserts re-check dtype/device facts the capture already recorded and `Program.bind_inputs`
checks at every call, so they are dead weight in the IR. Placeholders are never removed.
"""

from __future__ import annotations

import torch
from meshc.pipeline import register_pass
from meshc.program import Program

_METADATA_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


@register_pass("dce", description="remove unused nodes and export's tensor-metadata asserts",
               preserves_semantics=True)
def dce(program: Program) -> Program:
    graph = program.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _METADATA_ASSERTS and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    program.gm.recompile()
    return program
