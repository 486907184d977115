"""The ATen backend: run the Program's graph as is, in eager PyTorch. The reference backend,
and the one used on machines without a GPU.

Entry point: `lower(program) -> LoweredProgram`, a callable mapping the flat user inputs to the
flat outputs (a pipeline stage's: its received values, then its user inputs); state tensors are
bound once here. `.gm` is the graph that executes (the Program's own: what `meshc show` prints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from meshc.program import Program


@dataclass(eq=False)
class LoweredProgram:
    gm: fx.GraphModule
    state: list[torch.Tensor]

    def __call__(self, flat_inputs: list) -> tuple:
        return self.gm(*self.state, *flat_inputs)


def lower(program: Program) -> LoweredProgram:
    return LoweredProgram(program.gm, program.state_args())
