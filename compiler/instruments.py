"""Instruments: small observers the PassManager calls around each pass.

Entry points: `PrintAfterChange`, `DumpDir`, `Timings`, `Verify`, `NumericCheck`. Each is
switched on by `compile(..., instruments=[...])` or by a CLI flag; none changes the Program.
An instrument that finds a problem raises a MeshcError, which the PassManager reports as a
failure of the pass that just ran.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import torch
from meshc.errors import MeshcError
from meshc.numerics import max_abs_error
from meshc.pipeline import PassCall
from meshc.program import Program


class Instrument:
    def start(self, program: Program, calls: list[PassCall]) -> None:
        pass

    def after_pass(self, index: int, call: PassCall, before: Program, after: Program, seconds: float) -> None:
        pass

    def finish(self, program: Program) -> None:
        pass


class PrintAfterChange(Instrument):
    """Print the IR after every pass that changed the graph's code."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def after_pass(self, index, call, before, after, seconds):
        if after.gm.code != before.gm.code:
            print(f"# ---- IR after pass {index + 1} '{call}' ----\n{after.code()}", file=self.stream)
        else:
            print(f"# ---- pass {index + 1} '{call}': no change ----", file=self.stream)


class DumpDir(Instrument):
    """Write one runnable `NNN_<pass>.py` per pass (000 is the captured program)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def start(self, program, calls):
        self.path.mkdir(parents=True, exist_ok=True)
        self._write(0, "captured", program)

    def after_pass(self, index, call, before, after, seconds):
        self._write(index + 1, call.name, after)

    def _write(self, index: int, name: str, program: Program) -> None:
        from meshc.dump import program_to_script

        (self.path / f"{index:03d}_{name}.py").write_text(program_to_script(program, title=name))


class Timings(Instrument):
    """Wall time and node counts per pass; `table()` renders them."""

    def __init__(self):
        self.rows: list[tuple[str, float, int, int, bool]] = []
        self._t0 = 0.0
        self.total = 0.0

    def start(self, program, calls):
        self.rows.clear()
        self._t0 = time.perf_counter()

    def after_pass(self, index, call, before, after, seconds):
        changed = after.gm.code != before.gm.code
        self.rows.append((str(call), seconds, before.num_nodes(), after.num_nodes(), changed))

    def finish(self, program):
        self.total = time.perf_counter() - self._t0

    def table(self) -> str:
        from meshc.table import render_table

        rows = [[i + 1, name, f"{s * 1e3:.1f}", before, after, "yes" if ch else "no"]
                for i, (name, s, before, after, ch) in enumerate(self.rows)]
        return render_table(["#", "pass", "ms", "nodes before", "nodes after", "changed"], rows)


class Verify(Instrument):
    """After each pass: graph lint and meshc meta checks, and shapes/dtypes re-propagated with
    fake tensors must equal the recorded ones."""

    def start(self, program, calls):
        self._check(program)

    def after_pass(self, index, call, before, after, seconds):
        self._check(after)

    def _check(self, program: Program) -> None:
        from meshc.passes.lint import lint_program
        from meshc.passes.propagate_shapes import check_recorded_shapes

        lint_program(program)
        check_recorded_shapes(program)


class NumericCheck(Instrument):
    """Run every semantics-preserving pass's output on the example inputs and compare it with the
    previous Program's (max abs error <= atol + rtol*|ref|); for a pass declaring
    `preserves_outputs`, only those output fields."""

    def __init__(self, atol: float = 1e-6, rtol: float = 0.0):
        self.atol, self.rtol = atol, rtol
        self.results: list[tuple[str, float | None]] = []
        self._ref = None

    def start(self, program, calls):
        self.results.clear()
        with torch.no_grad():
            self._ref = program.run_example()

    def after_pass(self, index, call, before, after, seconds):
        if after.mesh.size > 1 and after.plan is not None:  # a rank's program runs only on its mesh
            self.results.append((str(call), None))
            return
        with torch.no_grad():
            out = after.run_example()
        ref, kept = self._ref, call.pass_.preserves_outputs
        self._ref = out  # later passes are compared with the new architecture
        if not call.pass_.preserves_semantics and not kept:
            self.results.append((str(call), None))
            return
        if kept:  # only the fields the pass declares it keeps (a lone tensor output is the field)
            ref, out = ([o if isinstance(o, torch.Tensor) else o[k] for k in kept] for o in (ref, out))
        err, where, scale = max_abs_error(ref, out)
        self.results.append((str(call), err))
        if err > self.atol + self.rtol * scale:
            what = f"outputs {list(kept)}" if kept else "semantics"
            raise MeshcError(
                f"numeric check failed: pass '{call}' declares it preserves {what}, but output "
                f"{where} differs from the previous program by {err:.3g} (tolerance "
                f"{self.atol:g} + {self.rtol:g}*{scale:.3g}). Bisect with `meshc bisect`."
            )
