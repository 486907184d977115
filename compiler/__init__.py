"""meshc: a graph compiler for distributed PyTorch.

    compiled = meshc.compile(model, mesh, example_inputs=(ids,))

Capture (torch.export → FX Program), passes (`meshc.passes`, run by a PassManager with
instruments), backends (`meshc.backends`), runtime (`meshc.runtime`). See DESIGN.md for the map.
"""

from meshc.capture import capture
from meshc.driver import compile
from meshc.errors import (
    CaptureError,
    InputError,
    MeshcError,
    MeshError,
    NodeError,
    PassError,
    PipelineError,
    ScheduleError,
    SpecError,
)
from meshc.instruments import DumpDir, NumericCheck, PrintAfterChange, Timings, Verify
from meshc.mesh import MeshSpec
from meshc.pass_manager import PassManager
from meshc.pipeline import PASSES, parse_pipeline, register_pass
from meshc.program import META, Program
from meshc.runtime.launch import LaunchError, launch
from meshc.runtime.sharded import load_checkpoint

__all__ = [
    "compile", "capture", "Program", "META", "MeshSpec", "PassManager", "PASSES", "parse_pipeline",
    "register_pass", "launch", "load_checkpoint", "LaunchError",
    "DumpDir", "NumericCheck", "PrintAfterChange", "Timings", "Verify",
    "MeshcError", "CaptureError", "InputError", "MeshError", "NodeError", "PassError", "PipelineError",
    "ScheduleError", "SpecError",
]
