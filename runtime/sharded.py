"""A rank's process groups and its shards of the weights.

Entry points: `load_checkpoint(compiled, path)` (each rank reads only its slices from
safetensors), `local_state_bytes(compiled)`. The DeviceMesh itself is built in
`meshc.runtime.mesh.device_mesh_for`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from meshc.errors import MeshError, NodeError
from meshc.placement import local_shape


def local_state_bytes(compiled) -> int:
    """Bytes of parameters and buffers this rank holds (tied tensors counted once)."""
    seen = {id(t): t for t in compiled.program.state.values()}
    return sum(t.numel() * t.element_size() for t in seen.values())


def load_checkpoint(compiled, path: str | Path) -> None:
    """Fill a compiled model's state from safetensors file(s) in `path` (a Hugging Face folder or
    one file), reading only this rank's slice of every tensor. Tied weights read the key that
    exists (e.g. GPT-2's lm_head from the embedding); Hugging Face's key renames for the model class
    apply (e.g. GPT-NeoX saves `lm_head` as `embed_out`). Buffers no checkpoint holds (rotary
    `inv_freq`, ...) were recomputed at capture (`meshc.meta_buffers`) and are kept."""
    from safetensors import safe_open

    if getattr(compiled, "_trainer", None) is not None:
        raise MeshError("load_checkpoint replaces the weights a training run already holds (its optimizer would keep "
                        "the old ones): call it right after meshc.compile, before make_optimizer or train_step; to "
                        "resume training use load_sharded")
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            index.update({k: f for k in h.keys()})
    _load_program(compiled.program, path, index)
    compiled.rebind()
    decoder = getattr(compiled, "decoder", None)
    if decoder is not None:  # the generation Programs hold their own (differently cut) state
        for name in ("prefill", "decode"):
            runner = decoder.runners.get(name)
            _load_program(runner.program if runner is not None else getattr(decoder.programs, name), path, index)
        decoder.rebind()


def _load_program(program, path: str | Path, index: dict[str, Path]) -> None:
    from meshc.runtime.training import zero_held
    from safetensors import safe_open

    renamed = _hf_renames(program.model_name, path, index)
    coords = program.mesh.coords(program.rank)
    tied = {name: group for group in program.tied_groups() for name in group}
    loaded: dict[str, torch.Tensor] = {}
    blocks: dict[int, torch.Tensor] = {}  # a training Program's ZeRO shards of the loaded tensors
    for node in program.placeholders():
        if node.name not in program.state or node.meta["meshc_input"] == "constant":
            continue
        names = [node.name, *tied.get(node.name, [])]
        fqns = [program.fqn(n) for n in names]
        key = next((f for f in fqns if f in index), None) or next((renamed[f] for f in fqns if f in renamed), None)
        if key is None:
            if program.state[node.name].is_meta:
                raise MeshError(_missing_tensor(path, fqns[0], node.meta["meshc_input"]))
            continue
        if key not in loaded:
            with safe_open(str(index[key]), framework="pt") as h:
                loaded[key] = _read_local(h.get_slice(key), node, coords, program.mesh.sizes)
        program.state.update(zero_held(program, node, loaded[key], blocks))
    _check_constants(program)
    missing = [program.fqn(n) for n, t in program.state.items() if t.is_meta]
    if missing:
        raise MeshError(f"after loading {path}, {len(missing)} tensor(s) are still on 'meta' (not in the checkpoint, "
                        f"e.g. non-persistent buffers): {', '.join(missing[:5])}. Build the model on a real device, "
                        f"or add them to the checkpoint.")


def _check_constants(program) -> None:
    """A constant the model makes in forward from Python data (e.g. the index tensor of
    `x[..., [-2], :]`) lands on its weights' device; built on 'meta' its value is lost, and no
    checkpoint holds it. Name the node that reads it and its source line."""
    for node in program.placeholders("constant"):
        if program.state[node.name].is_meta and node.users:
            raise NodeError(next(iter(node.users)), (
                f"{node.meta['meshc_name']} is a tensor this model creates in forward from Python data, on the "
                f"device of its weights; the model was built on 'meta', so its value was never computed and no "
                f"checkpoint holds it. Build this model on a real device (or create the tensor on the input's "
                f"device in forward)"))


def _missing_tensor(path, fqn: str, kind: str) -> str:
    if kind == "buffer":
        return (f"checkpoint {path} has no tensor {fqn}, a buffer of a model captured on 'meta', and meshc could not "
                f"recompute it at capture (its module's initialiser - Hugging Face `_init_weights` or "
                f"`reset_parameters()` - does not write it). Build the model on a real device, or add {fqn} to the "
                f"checkpoint.")
    return (f"checkpoint {path} has no tensor {fqn} (a {kind} of a model captured on 'meta', so it has no value "
            f"yet). Check that the checkpoint belongs to this model class and config.")


def _hf_renames(model_name: str, path, index: dict[str, Path]) -> dict[str, str]:
    """Model key -> checkpoint key for the checkpoint keys that Hugging Face renames when it loads
    this model class (or the folder's config `model_type`); empty without `transformers`."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return {}
    config = Path(path) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    rules = get_checkpoint_conversion_mapping(model_name) or get_checkpoint_conversion_mapping(model_type) or []
    out: dict[str, str] = {}
    for rule in (r for r in rules if type(r) is WeightRenaming):
        for key in index:
            new, matched = rule.rename_source_key(key)
            if matched is not None and new != key:
                out.setdefault(new, key)
    return out


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

