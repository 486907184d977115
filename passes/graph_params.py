"""Adding and dropping parameters of a Program, for passes that change the architecture.

Entry points: `add_parameter(program, fqn, tensor)` (a new parameter placeholder, placed before
the user inputs, with its FakeTensor `val` and its tensor in `program.state`),
`erase_unused(program, nodes)` (those of `nodes` nothing reads, even ops FX keeps as impure such
as SDPA with its dropout argument), `drop_unused_state(program)` (placeholders of
parameters/buffers/constants nothing reads any more, and their tensors) and
`refresh_values(program)` (FakeTensor `val` of every node a pass created without one).
Never changes what the graph computes.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from meshc.program import Program
from torch._guards import detect_fake_mode


def add_parameter(program: Program, fqn: str, tensor: torch.Tensor, like: fx.Node | None = None) -> fx.Node:
    """A new parameter placeholder named after `fqn` (its `meshc_name`), holding `tensor`.
    `like`: a node whose provenance meta (nn_module_stack, stack_trace) the placeholder copies."""
    vals = [p.meta.get("val") for p in program.placeholders()]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    users = program.placeholders("user")
    anchor = users[0] if users else next(n for n in program.graph.nodes if n.op != "placeholder")
    with program.graph.inserting_before(anchor):
        node = program.graph.placeholder("p_" + fqn.replace(".", "_").replace("-", "_"))
    if like is not None:
        node.meta.update({k: like.meta[k] for k in ("nn_module_stack", "stack_trace") if k in like.meta})
    node.meta.update(meshc_input="parameter", meshc_name=fqn)
    node.meta["val"] = mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor.to("meta")
    program.state[node.name] = tensor
    return node


def erase_unused(program: Program, nodes: set[fx.Node]) -> int:
    """Erase the nodes of `nodes` without users, last first (so their inputs lose users too)."""
    erased = 0
    for node in reversed(list(program.graph.nodes)):
        if node in nodes and node.op == "call_function" and not node.users:
            program.graph.erase_node(node)
            erased += 1
    return erased


def drop_unused_state(program: Program) -> list[str]:
    """Remove state placeholders without users (and their tensors); returns their FQNs."""
    dropped = []
    for node in program.placeholders():
        if node.meta.get("meshc_input") in ("parameter", "buffer", "constant") and not node.users:
            dropped.append(node.meta["meshc_name"])
            program.state.pop(node.name, None)
            program.graph.erase_node(node)
    return dropped


def refresh_values(program: Program) -> None:
    """Fill in `val` for nodes a pass created (FakeTensor propagation from the placeholders)."""
    from meshc.passes.propagate_shapes import fake_values

    values = fake_values(program)
    for node in program.graph.nodes:
        if node.op not in ("placeholder", "output") and node.name in values:
            node.meta["val"] = values[node.name]
