"""Sharded training checkpoints: each rank saves what it owns, any dp size resumes from them.

Entry points (every rank calls them; collectives inside):

* `save_sharded(compiled, optimizer, folder)` — `rank{r:05d}.safetensors` per rank (its shard of
  every parameter and of every optimizer-state tensor shaped like one, as the optimizer updates
  them: flat dp shards under zero>=1) and, from rank 0, `index.json` (mesh, ZeRO stage, each
  parameter's global and local shape and tp placement, the optimizer's scalar state and groups).
* `load_sharded(compiled, optimizer, folder)` — rebuild each parameter (and state tensor) from the
  files of the saving mesh, then keep this rank's part under its own mesh and stage: another dp
  size or stage resumes the same training. Parameters tp-sharded with `Shard(d)` or replicated
  are supported (not the interleaved q|k|v shards of GPT-2's fused projections).
* `consolidate(folder, model, out)` — the full tensors into `model` (built on any device, `meta`
  included; a tied parameter takes the one name the shards hold) and `model.save_pretrained(out)`:
  a Hugging Face folder from the shards. (An HF folder into a training model: `meshc.load_checkpoint`
  right after compile, which keeps each tensor as the ZeRO stage holds it, `training.zero_held`.)

Reading rebuilds whole tensors from every file: meant for models that fit one host's memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from meshc.errors import MeshcError
from meshc.mesh import DP, MeshSpec
from meshc.placement import Replicate, Shard, describe, local_shard, parse_placement
from meshc.redistribute import flat_block


def _barrier(program) -> None:
    if program.mesh.size > 1 and dist.is_initialized():
        dist.barrier()


def save_sharded(compiled, optimizer, folder: str | Path) -> None:
    from safetensors.torch import save_file

    trainer, program = compiled.trainer, compiled.program
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nodes = {program.fqn(n.name): n for n in program.placeholders()}
    tensors, params, scalars = {}, {}, {}
    for s in trainer.slots:
        tensors[f"param/{s.fqn}"] = s.shard.detach().contiguous()
        state = optimizer.state.get(s.shard, {}) if optimizer is not None else {}
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == s.shard.shape:
                tensors[f"state/{k}/{s.fqn}"] = v.detach().contiguous()
            else:
                scalars.setdefault(s.fqn, {})[k] = float(v)
        pls = nodes[s.fqn].meta.get("meshc_placement") or ()
        params[s.fqn] = {"local_shape": list(s.shape), "tp_placements": [describe(p) for p in pls]}
    save_file(tensors, str(folder / f"rank{program.rank:05d}.safetensors"))
    if program.rank == 0:
        index = {"mesh": str(program.mesh), "names": list(program.mesh.names), "sizes": list(program.mesh.sizes),
                 "zero": trainer.stage, "params": params, "optimizer_scalars": scalars,
                 "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                 "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
                 if optimizer is not None else []}
        (folder / "index.json").write_text(json.dumps(index, indent=1, default=str))
    _barrier(program)


def read_full(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(index, {'param/<fqn>' | 'state/<key>/<fqn>': the full global tensor}) from every rank's file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    mesh = MeshSpec(tuple(index["names"]), tuple(index["sizes"]))
    files = [load_file(str(folder / f"rank{r:05d}.safetensors")) for r in range(mesh.size)]
    dp_i = mesh.index(DP)
    out = {}
    for key in files[0]:
        fqn = key.split("/", 2)[-1] if key.startswith("state/") else key[len("param/"):]
        meta = index["params"][fqn]
        shape = meta["local_shape"]
        pls = [parse_placement(p) for p in meta["tp_placements"]] or [Replicate()] * len(mesh.sizes)
        locals_by_coords = {}
        for r in range(mesh.size):
            coords = mesh.coords(r)
            others = tuple(c for i, c in enumerate(coords) if i != dp_i)
            if others in locals_by_coords:
                continue
            if index["zero"] >= 1 and mesh.dp > 1:  # flat dp shards in dp order, padding cut
                parts = [files[mesh.with_coord(r, DP, d)][key] for d in range(mesh.dp)]
                numel = torch.Size(shape).numel()
                locals_by_coords[others] = torch.cat(parts)[:numel].view(shape)
            else:
                locals_by_coords[others] = files[r][key].view(shape)
        out[key] = _assemble(locals_by_coords, pls, mesh, dp_i, fqn)
    return index, out


def _assemble(parts: dict, pls: list, mesh: MeshSpec, dp_i, fqn: str) -> torch.Tensor:
    """The global tensor from each non-dp coordinate's local tensor (Shard(d): concatenated along d)."""
    dims = [(i, p, n) for i, (p, n) in enumerate(zip(pls, mesh.sizes)) if i != dp_i and n > 1]
    for i, p, _ in dims:
        if type(p) is not Shard and not isinstance(p, Replicate):
            raise MeshcError(f"{fqn}: placement {describe(p)} on mesh dim '{mesh.names[i]}' cannot be rebuilt from "
                             f"sharded checkpoints yet (only S(d) and R)")
    sharded = [(i, p, n) for i, p, n in dims if type(p) is Shard]
    if not sharded:
        return parts[min(parts)]
    if len(sharded) > 1:
        raise MeshcError(f"{fqn} is sharded on two mesh dims besides dp; rebuilding it is not supported yet")
    i, p, n = sharded[0]
    j = [k for k in range(len(mesh.sizes)) if k != dp_i].index(i)
    return torch.cat([next(v for c, v in parts.items() if c[j] == t) for t in range(n)], dim=p.dim)


def load_sharded(compiled, optimizer, folder: str | Path) -> None:
    trainer, program = compiled.trainer, compiled.program
    index, full = read_full(folder)
    mesh, coords = program.mesh, program.mesh.coords(program.rank)
    nodes = {program.fqn(n.name): n for n in program.placeholders()}
    dp_i = mesh.index(DP)

    def mine(t: torch.Tensor, fqn: str, owned: bool) -> torch.Tensor:
        pls = nodes[fqn].meta.get("meshc_placement") or ()
        local = local_shard(t, [Replicate() if i == dp_i else p for i, p in enumerate(pls)], coords, mesh.sizes) \
            if pls else t
        if not owned or trainer.stage == 0:
            return local
        return flat_block(local, mesh.dp, mesh.coord(program.rank, DP))

    with torch.no_grad():
        for s in trainer.slots:
            key = f"param/{s.fqn}"
            if key not in full:
                raise MeshcError(f"{folder} has no tensor for parameter {s.fqn}; it was saved from another model")
            s.shard.copy_(mine(full[key], s.fqn, owned=True)[:s.shard.numel()].view(s.shard.shape))
            if s.full is not None:
                s.full.copy_(mine(full[key], s.fqn, owned=False).view(s.full.shape))
            if s.leaf is not s.shard and s.leaf is not s.full:
                s.leaf.copy_(mine(full[key], s.fqn, owned=False).view(s.leaf.shape))
            if optimizer is None:
                continue
            state = {k.split("/")[1]: mine(v, s.fqn, owned=True)[:s.shard.numel()].clone().view(s.shard.shape)
                     for k, v in full.items()
                     if k.startswith("state/") and k.split("/", 2)[2] == s.fqn}
            for k, v in index["optimizer_scalars"].get(s.fqn, {}).items():
                state[k] = torch.tensor(v)
            if state:
                optimizer.state[s.shard] = state
    _barrier(program)


def consolidate(folder: str | Path, model: torch.nn.Module, out: str | Path) -> None:
    """Write a Hugging Face `save_pretrained` folder at `out` from the sharded checkpoint in `folder`."""
    _, full = read_full(folder)
    state = {k[len("param/"):]: v for k, v in full.items() if k.startswith("param/")}
    tied: dict[int, list[str]] = {}  # the model's own tied parameters: the shards hold one name of each
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in tied.values():
        have = next((n for n in names if n in state), None)
        state.update({n: state[have] for n in names if have is not None and n not in state})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise MeshcError(f"{folder} holds tensors {unexpected[:5]} that {type(model).__name__} does not have")
    params = {n for names in tied.values() for n in names}
    if missing := [n for n in missing if n in params]:
        raise MeshcError(f"{folder} has no tensor for {len(missing)} parameter(s) of {type(model).__name__}, e.g. "
                         f"{missing[:3]}: it was saved from another model (or a frozen parameter was not trained)")
    model.save_pretrained(str(out))
