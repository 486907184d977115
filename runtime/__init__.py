"""meshc.runtime: execute the Programs the PassManager produced. Nothing here builds or rewrites a graph.

Entry points: `CompiledModel` (what `meshc.compile` returns), `PipelineModel` (what it returns on
a mesh with a `pp` dim: the stage Programs of `split_stages`, each lowered by `meshc.backends`,
run on the pp ranks by a schedule from `meshc.schedules`) and `launch` (start an SPMD function on
every rank of a mesh, locally or under torchrun, never hanging). `mesh.py` is the one binding
point: it builds the DeviceMesh and registers each mesh dim's process group under the name the
program's collectives use. `sharded.py` loads checkpoints (each rank its slices). `generate.py`
runs the decode loop and `speculative.py` Medusa tree decoding (`generate(..., speculative="medusa")`)
on the prefill/decode Programs. The runtime never imports a pass.
"""

from meshc.runtime.compiled_model import CompiledModel
from meshc.runtime.launch import LaunchError, launch
from meshc.runtime.pipeline import PipelineModel

__all__ = ["CompiledModel", "LaunchError", "PipelineModel", "launch"]
