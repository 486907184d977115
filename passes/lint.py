"""lint: structural checks of a Program; raises on the first problem, changes nothing.

Entry points: the pass `lint` and `lint_program(program)` (also used by the Verify instrument).
Checks FX's own graph lint, that every placeholder says what it is, that `state` feeds exactly
the state placeholders, and that every computed tensor node records its value.
"""

from __future__ import annotations

import torch
from meshc.errors import MeshcError, NodeError
from meshc.pipeline import register_pass
from meshc.program import META, Program

_NO_VALUE = {torch.ops.aten._assert_tensor_metadata.default}


def lint_program(program: Program) -> None:
    if program.split is not None:  # a pipelined Program: every stage is a Program of its own
        for stage in program.split.stages:
            lint_program(stage.program)
        return
    try:
        program.graph.lint()
    except Exception as e:
        raise MeshcError(f"graph lint failed: {e}") from e
    state_nodes = {n.name for n in program.state_placeholders()}
    if state_nodes != set(program.state):
        raise MeshcError(f"state and placeholders disagree: missing tensors for "
                         f"{sorted(state_nodes - set(program.state))}, tensors without a placeholder "
                         f"{sorted(set(program.state) - state_nodes)}")
    for node in program.graph.nodes:
        unknown = [k for k in node.meta if k.startswith("meshc_") and k not in META]
        if unknown:
            raise NodeError(node, f"unknown meshc meta keys {unknown}; define them in program.META")
        kinds = ("parameter", "buffer", "constant", "user", "recv")
        if node.op == "placeholder" and node.meta.get("meshc_input") not in kinds:
            raise NodeError(node, "placeholder without meta['meshc_input']")
        if node.op == "call_function" and node.target not in _NO_VALUE and "val" not in node.meta:
            raise NodeError(node, "node has no meta['val']; run propagate_shapes after creating nodes")


@register_pass("lint", description="check graph structure and meshc metadata (changes nothing)",
               preserves_semantics=True)
def lint(program: Program) -> Program:
    lint_program(program)
    return program
