"""meshc.runtime: run lowered Programs.

Entry points: `CompiledModel` (what `meshc.compile` returns), `PipelineModel` (what it returns on
a mesh with a `pp` dim: stages on the pp ranks, run by a schedule from `meshc.schedules`) and
`launch` (start an SPMD function on every rank of a mesh, locally or under torchrun, never
hanging). The runtime never imports a pass.
"""

from meshc.runtime.compiled_model import CompiledModel
from meshc.runtime.launch import LaunchError, launch
from meshc.runtime.pipeline import PipelineModel

__all__ = ["CompiledModel", "LaunchError", "PipelineModel", "launch"]
