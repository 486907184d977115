"""A pipelined Program's stages: data the `split_stages` pass makes and the pipeline runtime runs.

Entry points: `Split` (on `program.split`), `Stage`, `Boundary`, and `WeightReaders` / `Reader`
(set on a stage by the `weight_grad_outputs` pass for zero-bubble schedules).

Each stage is a Program of its own (`stage.program`): its graph takes the state tensors it reads
(placeholders first, as every Program), then the values stage s-1 sends (`recv`, placeholders of
kind 'recv'), then the user inputs it reads (`user`: indices into the flat user inputs); it
returns the values stage s+1 needs (`send`) or, for the last stage, the model's flat outputs —
with a `WeightReaders`, followed by the readers' outputs and arguments. Every stage goes through
`meshc.backends.lower` like any Program; `meshc show --after split_stages` prints them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Boundary:
    """A value crossing from one stage to the next."""

    name: str            # node name in the unsplit Program
    val: Any             # FakeTensor, or SymInt/int for a size
    requires_grad: bool  # a float tensor that depends on a trainable parameter: its gradient flows back


@dataclass(frozen=True)
class Reader:
    """A node of a stage that reads trainable weights (zero-bubble's W recomputes their gradient)."""

    target: Any
    args: tuple                          # ("slot", k): argvals[k]; anything else: a constant
    kwargs: dict
    weights: tuple[tuple[int, str], ...]  # (argument position, state placeholder name)


@dataclass(frozen=True)
class WeightReaders:
    """The stage graph returns (*outputs, *one output per reader, *the readers' argument values)."""

    readers: tuple[Reader, ...]
    num_argvals: int


@dataclass
class Stage:
    index: int
    program: Any                    # meshc.program.Program of this stage alone
    recv: list[Boundary]            # from stage index-1, in placeholder order
    user: list[int]                 # indices into the flat user inputs, in placeholder order
    send: list[Boundary]            # to stage index+1 (empty on the last stage)
    outputs: list[str] = field(default_factory=list)  # last stage: node names of the model outputs
    readers: WeightReaders | None = None

    @property
    def state(self) -> list[str]:
        """The state placeholders this stage reads, in order."""
        return [n.name for n in self.program.placeholders() if n.name in self.program.state]

    def clone(self) -> Stage:
        return replace(self, program=self.program.clone(), recv=list(self.recv), user=list(self.user),
                       send=list(self.send), outputs=list(self.outputs))


@dataclass
class Split:
    stages: list[Stage]
    output_template: list[Any]      # the flat model outputs; None where the last stage supplies a value
    shared_state: list[list[str]]   # groups of state placeholders holding one tensor, read by several stages

    def clone(self) -> Split:
        return Split([s.clone() for s in self.stages], list(self.output_template),
                     [list(g) for g in self.shared_state])
