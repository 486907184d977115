"""meshc.runtime: run lowered Programs.

Entry points: `CompiledModel` (what `meshc.compile` returns) and `launch` (start an SPMD function
on every rank of a mesh, locally or under torchrun, never hanging). The runtime never imports a
pass.
"""

from meshc.runtime.compiled_model import CompiledModel
from meshc.runtime.launch import LaunchError, launch

__all__ = ["CompiledModel", "LaunchError", "launch"]
