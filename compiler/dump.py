"""Runnable IR dumps. Entry point: `program_to_script(program, title) -> str`.

A dump is a standalone Python file: the graph as a `torch.nn.Module` (from FX's own code, with
shapes and user source lines as comments) plus a `__main__` that rebuilds the graph with
`torch.fx.symbolic_trace` and runs it on random inputs of the captured sizes.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from meshc.program import Program

_TEMPLATE = '''\
# meshc IR of {model} after {title!r}
# passes applied: {history}
# mesh: {mesh}; {nodes} nodes. Run this file to rebuild the graph and execute it on random inputs.
import math  # noqa: F401
from math import inf, nan  # noqa: F401

import torch
import torch.fx
from torch import device  # noqa: F401

{code}

# (placeholder, dtype, size at capture; or a Python constant)
INPUTS = {inputs!r}


def random_inputs():
    out = []
    for _, dtype, size in INPUTS:
        if dtype is None:
            out.append(size)
            continue
        dtype = getattr(torch, dtype)
        if dtype.is_floating_point:
            out.append(torch.randn(size, dtype=dtype) * 0.02)
        else:
            out.append(torch.ones(size, dtype=dtype))  # valid as token ids and as masks
    return out


if __name__ == "__main__":
    gm = torch.fx.symbolic_trace(GraphModule())
    print(f"rebuilt graph: {{len(gm.graph.nodes)}} nodes")
    with torch.no_grad():
        outputs = gm(*random_inputs())
    for i, t in enumerate(torch.utils._pytree.tree_leaves(outputs)):
        print(f"output {{i}}: {{tuple(t.shape) if isinstance(t, torch.Tensor) else t}}")
'''


def program_to_script(program: Program, title: str) -> str:
    args, kwargs = program.example_inputs
    user_values = iter(pytree.tree_leaves((args, kwargs)))
    inputs = []
    for node in program.placeholders():
        value = program.state.get(node.name) if node.meta["meshc_input"] != "user" else next(user_values)
        if isinstance(value, torch.Tensor):
            inputs.append((node.name, str(value.dtype).removeprefix("torch."), list(value.shape)))
        else:
            inputs.append((node.name, None, value))
    return _TEMPLATE.format(
        model=program.model_name,
        title=title,
        history=", ".join(program.history) or "none",
        mesh=program.mesh,
        nodes=program.num_nodes(),
        code=program.code(),
        inputs=inputs,
    )
