"""PassManager: runs a flat, named pipeline of passes over a Program.

Entry point: `PassManager(pipeline, instruments=()).run(program)`. `pipeline` is a pipeline
string or a list of `PassCall`s. Each pass gets a clone, so the input Program is never mutated;
nodes a pass creates are stamped `meta["meshc_pass"]`. Instruments (see `instruments.py`) observe
every step; this module knows nothing about printing, dumping or timing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from meshc.errors import MeshcError, PassError
from meshc.instruments import Instrument
from meshc.pipeline import PassCall, parse_pipeline
from meshc.program import Program


class PassManager:
    def __init__(self, pipeline: str | Sequence[PassCall], instruments: Sequence[Instrument] = ()):
        self.calls = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.instruments = list(instruments)

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.calls)

    def run(self, program: Program, stop_after: int | None = None) -> Program:
        """Run the passes (only the first `stop_after` of them, if given — used by bisection)."""
        calls = self.calls if stop_after is None else self.calls[:stop_after]
        for ins in self.instruments:
            ins.start(program, calls)
        done: list[str] = []
        for index, call in enumerate(calls):
            t0 = time.perf_counter()
            try:
                after = call.pass_.fn(program.clone(), **call.options)
                if not isinstance(after, Program):
                    raise MeshcError(f"returned {type(after).__name__}, not a Program")
            except Exception as e:  # noqa: BLE001 - every failure is re-raised naming the pass
                raise _pass_error(call, done, e, program) from e
            seconds = time.perf_counter() - t0
            _stamp_new_nodes(program, after, call.name)
            after.history.append(str(call))
            for ins in self.instruments:
                try:
                    ins.after_pass(index, call, program, after, seconds)
                except PassError:
                    raise
                except MeshcError as e:
                    raise _pass_error(call, done, e, program) from e
            done.append(str(call))
            program = after
        for ins in self.instruments:
            ins.finish(program)
        return program


def _pass_error(call: PassCall, done: list[str], cause: Exception, program: Program) -> PassError:
    """The error for a failed pass, with a replay command naming the model, its mesh and a named plan."""
    mesh = str(program.mesh) if program.mesh.size > 1 else None
    plan = program.plan if mesh and program.plan in ("megatron", "replicate") else None  # 'auto' is the default
    return PassError(call.name, done, cause, call=str(call), model=program.model_name, mesh=mesh, plan=plan)


def _stamp_new_nodes(before: Program, after: Program, pass_name: str) -> None:
    old = {n.name for n in before.graph.nodes}
    for node in after.graph.nodes:
        if node.name not in old and node.op != "output":
            node.meta.setdefault("meshc_pass", pass_name)
