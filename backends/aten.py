"""The ATen backend: run the Program's graph as is, in eager PyTorch. The reference backend,
and the one used on machines without a GPU.

Entry point: `lower(program) -> Callable[[list], tuple]` mapping the flat user inputs to the flat
outputs (a pipeline stage's: its received values, then its user inputs); state tensors are
bound once here.
"""

from __future__ import annotations

from collections.abc import Callable

from meshc.program import Program


def lower(program: Program) -> Callable[[list], tuple]:
    gm = program.gm
    state = program.state_args()

    def run(flat_inputs: list) -> tuple:
        return gm(*state, *flat_inputs)

    return run
