"""Run one rank's local program: bind its collectives to process groups, hold only its shards.

Entry points: `device_mesh_for(spec)` (the torch DeviceMesh of this process for a MeshSpec),
`prepare_rank(program, device_mesh) -> Program` (local state + bound groups, after the plan hash
check), `load_checkpoint(compiled, path)` (each rank reads only its slices from safetensors).

Never hangs: the plan-hash exchange runs on the default group, whose timeout `launch` sets; a rank
that disagrees about the plan stops every rank with an error naming the ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from meshc.collectives import collective_name
from meshc.errors import MeshError
from meshc.mesh import MeshSpec
from meshc.placement import local_shape, local_shard
from meshc.program import Program


def device_mesh_for(spec: MeshSpec, mesh: Any = None):
    """The DeviceMesh to run `spec` on: `mesh` itself if it is one, else one built on the default
    process group (which `meshc.launch` or torchrun must have started)."""
    if type(mesh).__name__ == "DeviceMesh":
        return mesh
    if not dist.is_initialized():
        raise MeshError(
            f"mesh '{spec}' has {spec.size} devices, so it needs {spec.size} processes. Run the compile inside "
            f"meshc.launch(fn, '{spec}') or under torchrun --nproc-per-node {spec.size}, or try it from the "
            f"shell with `meshc run MODEL --mesh {spec}`.")
    world = dist.get_world_size()
    if world != spec.size:
        raise MeshError(f"mesh '{spec}' has {spec.size} devices but the process group has {world} ranks; "
                        f"launch {spec.size} processes or use a mesh of size {world}")
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, spec.sizes, mesh_dim_names=spec.names)


def prepare_rank(program: Program, device_mesh) -> Program:
    """This rank's runnable Program: state sliced to the local shards, collectives bound to the
    mesh's process groups. Checks first that every rank compiled the same plan."""
    check_same_plan(program)
    out = program.clone()
    groups = {name: device_mesh.get_group(name).group_name for name in program.mesh.names}
    for node in out.graph.nodes:
        if collective_name(node):
            node.args = (*node.args[:-1], groups[node.args[-1]])
    out.gm.recompile()
    coords = program.mesh.coords(program.rank)
    shared: dict[int, torch.Tensor] = {}  # tied weights stay one tensor on the rank too
    for node in out.placeholders():
        full = out.state.get(node.name)
        if full is None:
            continue
        pls = node.meta.get("meshc_placement") or ()
        key = id(full)
        if key not in shared:
            shared[key] = full if full.is_meta else local_shard(full, pls, coords, program.mesh.sizes).clone()
        out.state[node.name] = shared[key]
    return out


def check_same_plan(program: Program) -> None:
    """All ranks exchange (plan hash, graph size); any difference is an error naming the ranks."""
    mine = f"{program.plan.hash() if program.plan is not None else '-'}:{program.num_nodes()}"
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) > 1:
        by_value: dict[str, list[int]] = {}
        for r, v in enumerate(everyone):
            by_value.setdefault(v, []).append(r)
        detail = "; ".join(f"ranks {rs}: plan {v}" for v, rs in by_value.items())
        raise MeshError(f"ranks compiled different plans ({detail}). Every rank must compile the same model, "
                        f"inputs, mesh and plan.")


def local_state_bytes(compiled) -> int:
    """Bytes of parameters and buffers this rank holds (tied tensors counted once)."""
    seen = {id(t): t for t in compiled.program.state.values()}
    return sum(t.numel() * t.element_size() for t in seen.values())


def load_checkpoint(compiled, path: str | Path) -> None:
    """Fill a compiled model's state from safetensors file(s) in `path` (a Hugging Face folder or
    one file), reading only this rank's slice of every tensor. Tied weights read the key that
    exists (e.g. GPT-2's lm_head from the embedding)."""
    from safetensors import safe_open

    program = compiled.program
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            index.update({k: f for k in h.keys()})
    coords = program.mesh.coords(program.rank)
    tied = {name: group for group in program.tied_groups() for name in group}
    loaded: dict[str, torch.Tensor] = {}
    for node in program.placeholders():
        if node.name not in program.state or node.meta["meshc_input"] == "constant":
            continue
        names = [node.name, *tied.get(node.name, [])]
        fqns = [program.fqn(n) for n in names]
        key = next((f for f in fqns if f in index), None)
        if key is None:
            if program.state[node.name].is_meta:
                raise MeshError(f"checkpoint {path} has no tensor {fqns[0]} (and it was captured on 'meta')")
            continue
        if key not in loaded:
            with safe_open(str(index[key]), framework="pt") as h:
                loaded[key] = _read_local(h.get_slice(key), node, coords, program.mesh.sizes)
        program.state[node.name] = loaded[key]
    missing = [program.fqn(n) for n, t in program.state.items() if t.is_meta]
    if missing:
        raise MeshError(f"after loading {path}, {len(missing)} tensor(s) are still on 'meta' (not in the checkpoint, "
                        f"e.g. non-persistent buffers): {', '.join(missing[:5])}. Build the model on a real device, "
                        f"or add them to the checkpoint.")
    compiled.rebind()



def _read_local(sl, node, coords, sizes) -> torch.Tensor:
    """Read only the local block(s) of a safetensors slice."""
    pls = node.meta.get("meshc_placement") or ()
    shape = sl.get_shape()
    if not any(p.is_shard() for p in pls):
        return sl[:]
    want = local_shape(shape, pls, sizes)
    # Per dim, the [start, stop) ranges to read: one for a plain shard, one per block if interleaved.
    ranges = [[(0, s)] for s in shape]
    for p, c, n in zip(pls, coords, sizes):
        if not p.is_shard():
            continue
        groups = getattr(p, "groups", 1)
        new = []
        for start, stop in ranges[p.dim]:
            block = (stop - start) // groups
            for g in range(groups):
                b0 = start + g * block
                step = block // n
                new.append((b0 + c * step, b0 + (c + 1) * step))
        ranges[p.dim] = new
    parts = _gather_ranges(sl, ranges, 0, [])
    out = parts.reshape(want) if list(parts.shape) != want else parts
    return out.contiguous()


def _gather_ranges(sl, ranges, dim, prefix):
    if dim == len(ranges):
        return sl[tuple(prefix)]
    pieces = [_gather_ranges(sl, ranges, dim + 1, [*prefix, slice(a, b)]) for a, b in ranges[dim]]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

