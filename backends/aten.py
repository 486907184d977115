"""The ATen backend: run the Program's graph in eager PyTorch. The reference backend, and the one
used on machines without a GPU.

Entry point: `lower(program) -> LoweredProgram`, a callable mapping the flat user inputs to the
flat outputs (a pipeline stage's: its received values, then its user inputs); state tensors are
bound once here. `.gm` is the Program's own graph (what `meshc show` prints); what executes is the
same graph with the same nodes, only each call spelled the cheap way (`fast_calls`).

Why: a graph node calls an ATen overload, `torch.ops.aten.mul.Tensor(a, b)`, whose Python entry
costs about 2-3 us more than the binding `torch.mul(a, b)` of the same ATen kernel. At batch 1 on a
CPU a decode step is hundreds of such tiny ops, so that entry is a large part of the step.
`FAST_CALLS` lists, per overload, the binding with the same argument names, order and defaults; it
must never hold a binding whose behaviour differs (a test runs both on every entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from meshc.program import Program

aten = torch.ops.aten
#: ATen overload -> the torch binding that dispatches to the same kernel with the same schema.
FAST_CALLS: dict[Any, Any] = {
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div, aten.neg.default: torch.neg, aten.pow.Tensor_Scalar: torch.pow,
    aten.rsqrt.default: torch.rsqrt, aten.sqrt.default: torch.sqrt, aten.exp.default: torch.exp,
    aten.sin.default: torch.sin, aten.cos.default: torch.cos, aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid, aten.erf.default: torch.erf, aten.where.self: torch.where,
    aten.mean.dim: torch.mean, aten.sum.dim_IntList: torch.sum, aten.softmax.int: torch.softmax,
    aten.view.default: torch.Tensor.view, aten.reshape.default: torch.reshape,
    aten.transpose.int: torch.transpose, aten.permute.default: torch.permute, aten.t.default: torch.t,
    aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze, aten.cat.default: torch.cat,
    aten.sym_size.int: torch.Tensor.size, aten.index_copy_.default: torch.Tensor.index_copy_,
    aten.linear.default: torch._C._nn.linear, aten.mm.default: torch.mm, aten.bmm.default: torch.bmm,
    aten.addmm.default: torch.addmm, aten.silu.default: torch._C._nn.silu, aten.gelu.default: torch._C._nn.gelu,
    aten.embedding.default: torch.embedding, aten.layer_norm.default: torch.layer_norm,
    aten.scaled_dot_product_attention.default: torch._C._nn.scaled_dot_product_attention,
}


@dataclass(eq=False)
class LoweredProgram:
    gm: fx.GraphModule
    state: list[torch.Tensor]
    run: Any = field(default=None, repr=False)  # the forward that executes (fast_calls(gm))

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = fast_calls(self.gm).forward  # the bound forward: no nn.Module call machinery

    def __call__(self, flat_inputs: list) -> tuple:
        return self.run(*self.state, *flat_inputs)


def lower(program: Program) -> LoweredProgram:
    return LoweredProgram(program.gm, program.state_args())


def fast_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose call_function nodes in FAST_CALLS call the torch binding instead of
    the ATen overload (same kernel, same arguments); every other node as it was."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in FAST_CALLS:
            node.target = FAST_CALLS[node.target]
    return fx.GraphModule(gm, graph)
