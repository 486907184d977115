"""The one binding point between compiled Programs and torch.distributed's process groups.

Entry points: `device_mesh_for(spec, mesh=None)` — the one function that builds a DeviceMesh
(on the default process group that `meshc.launch`, the caller or torchrun's environment starts) —
and `bind(program, device_mesh)`: every rank checks that all ranks compiled the same
program (plan hash, graph size, pipeline stages), then each mesh dim's process group is registered
under the name the program's collectives use (`MeshSpec.group_name`, e.g. 'tp@dp=2,tp=2'); a gloo
group as its twin that runs one collective at a time (`serial_gloo`, issue 14). No graph is
rewritten: the Program `meshc show` prints is the one that runs.

Never hangs: the exchange runs on the default group, whose timeout `launch` (or torchrun's
set-up in `device_mesh_for`) sets; a rank that disagrees stops every rank with an error naming the
ranks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from meshc.errors import MeshError
from meshc.mesh import MeshSpec
from meshc.program import Program


def device_mesh_for(spec: MeshSpec, mesh: Any = None, model: str | None = None, timeout: float | None = None):
    """The DeviceMesh to run `spec` on: `mesh` itself if it is one, else one built on the default
    process group — started by `meshc.launch`, by the caller, or here from torchrun's environment
    (with `timeout` seconds per collective; default `launch.DEFAULT_TIMEOUT_S`). `model` is the
    model spec the error hint names (`meshc run MODEL ...`) when no processes were started."""
    from meshc.runtime.launch import DEFAULT_TIMEOUT_S, init_from_torchrun, started_by_torchrun

    if type(mesh).__name__ == "DeviceMesh":
        return mesh
    if not dist.is_initialized() and started_by_torchrun():
        init_from_torchrun(DEFAULT_TIMEOUT_S if timeout is None else timeout)
    if not dist.is_initialized():
        raise MeshError(
            f"mesh '{spec}' has {spec.size} devices, so it needs {spec.size} processes. Run the compile inside "
            f"meshc.launch(fn, '{spec}') or under torchrun --nproc-per-node {spec.size}, or try it from the "
            f"shell with `meshc run {model or 'MODEL'} --mesh {spec}`.")
    world = dist.get_world_size()
    if world != spec.size:
        raise MeshError(f"mesh '{spec}' has {spec.size} devices but the process group has {world} ranks; "
                        f"launch {spec.size} processes or use a mesh of size {world}")
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, spec.sizes or (1,), mesh_dim_names=spec.names or ("world",))


def bind(program: Program, device_mesh) -> None:
    check_same_program(program)
    bind_groups(program.mesh, device_mesh)


def bind_groups(spec, device_mesh) -> None:
    """Register the process group of every dim of `spec` under `spec.group_name(dim)` (on gloo: its
    one-worker twin, see `serial_gloo`)."""
    from torch._C._distributed_c10d import _register_process_group, _unregister_process_group

    for name in spec.names:
        group = device_mesh.get_group(name)
        if dist.get_backend(group) == "gloo":
            group = serial_gloo(group)
        key = spec.group_name(name)
        try:
            _unregister_process_group(key)  # a compile before this one bound the same name
        except Exception:  # noqa: BLE001 - not registered yet
            pass
        _register_process_group(key, group)


#: global ranks -> (the default group it was built under, that group's one-worker gloo twin).
_SERIAL: dict[tuple[int, ...], tuple[Any, Any]] = {}


def serial_gloo(group):
    """A gloo process group over the ranks of `group` that runs one collective at a time.

    Why: a gloo group runs its queued collectives on 2 worker threads. When several are in flight at
    once (a Program issues each collective as early as it can and waits as late as it can, e.g.
    Medusa's 5 vocabulary all-gathers at the end of a tp=2 decode step), this torch/gloo build
    corrupts the heap now and then (`malloc(): unaligned tcache chunk detected`, or a segfault;
    issue 14), in the gloo layer: the same graph replayed on plain torch with no meshc code crashes
    too. With one worker thread the collectives still overlap compute, only not each other. NCCL
    groups are used as they are."""
    from torch._C._distributed_c10d import PrefixStore, ProcessGroup, ProcessGroupGloo

    ranks, default = tuple(dist.get_process_group_ranks(group)), dist.distributed_c10d._get_default_group()
    if ranks not in _SERIAL or _SERIAL[ranks][0] is not default:  # built once per process group
        options = ProcessGroupGloo._Options()
        options._threads = 1
        options._devices = [ProcessGroupGloo.create_default_device()]
        options._timeout = group._get_backend(torch.device("cpu")).options._timeout
        store = PrefixStore(f"meshc-serial-gloo/{len(_SERIAL)}/{','.join(map(str, ranks))}",
                            dist.distributed_c10d._get_default_store())
        backend = ProcessGroupGloo(store, group.rank(), group.size(), options)
        serial = ProcessGroup(store, group.rank(), group.size())
        serial._set_default_backend(ProcessGroup.BackendType.GLOO)
        serial._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, backend)
        _SERIAL[ranks] = (default, serial)
    return _SERIAL[ranks][1]


def program_fingerprint(program: Program) -> str:
    """What every rank must agree on: the plan, the graph size and the pipeline stages."""
    plan = program.plan.hash() if hasattr(program.plan, "hash") else "-"
    stages = [n.meta.get("meshc_stage") for n in program.graph.nodes]
    return f"{plan}:{program.num_nodes()}:{hashlib.sha1(repr(stages).encode()).hexdigest()[:12]}"


def check_same_program(program: Program) -> None:
    """All ranks exchange `program_fingerprint`; any difference is an error naming the ranks."""
    mine = program_fingerprint(program)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) > 1:
        by_value: dict[str, list[int]] = {}
        for r, v in enumerate(everyone):
            by_value.setdefault(v, []).append(r)
        detail = "; ".join(f"ranks {rs}: plan:nodes:stages {v}" for v, rs in by_value.items())
        raise MeshError(f"ranks compiled different programs ({detail}). Every rank must compile the same model, "
                        f"inputs, mesh, plan and pipeline.")
