"""CompiledModel: the nn.Module `meshc.compile` returns; same call signature and outputs as the
original model.

Entry point: `CompiledModel(program, backend)`; `rebind()` lowers again after the state changed
(e.g. `meshc.load_checkpoint`); `generate()` runs the decode loop (`meshc.runtime.generate.Generates`);
`train_step()`, `make_optimizer()`, `clip_grad_norm_()` train (`meshc.runtime.training.Trains`).
Calls are bound and checked against the captured inputs (`Program.bind_inputs`), run through the
lowered callable, and the outputs rebuilt in the model's own structure (e.g. a Hugging Face `CausalLMOutputWithPast`).
"""

from __future__ import annotations

from typing import Any

import torch
from meshc.program import Program
from meshc.runtime.generate import Generates
from meshc.runtime.training import Trains


class CompiledModel(Generates, Trains, torch.nn.Module):
    def __init__(self, program: Program, backend: str = "auto", report: str = ""):
        super().__init__()
        self.program = program
        self.requested_backend = backend
        self.report = report  # the pass table of the compile that made this model
        self.decoder = None  # a meshc.runtime.generate.Decoder when compiled with max_cache_len=...
        self.rebind()

    def rebind(self) -> None:
        from meshc.backends import lower

        self._run_flat, self.backend = lower(self.program, self.requested_backend)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.program.bind_inputs(args, kwargs)
        return self.program.unflatten_outputs(self._run_flat(flat))

    def extra_repr(self) -> str:
        p = self.program
        return (f"model={p.model_name}, mesh={p.mesh}, backend={self.backend}, "
                f"passes=[{', '.join(p.history)}], nodes={p.num_nodes()}")
