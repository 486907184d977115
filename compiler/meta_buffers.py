"""Rebuild the buffers of a model built on 'meta' that no checkpoint holds.

Entry point: `rebuild_meta_buffers(model, state, fqns) -> list[str]`, called by capture. A model
built on 'meta' (large-model path: capture first, `meshc.load_checkpoint` later) has no values,
and its *non-persistent* buffers - rotary `inv_freq`, sinusoid tables, embedding scales - are
computed at construction and never saved, so no checkpoint can fill them. Each is recomputed on
CPU from its owning module: a data-free copy of the module gets fresh CPU buffers and is
re-initialised by the model's own initialiser (Hugging Face `_init_weights(module)`, which
recomputes such buffers from the module's config), else the module's `reset_parameters()`.
A buffer counts as rebuilt only if the initialiser wrote it (two runs from different fill values
agree); the others stay on 'meta' and `load_checkpoint` names them. Never mutates the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def rebuild_meta_buffers(model: torch.nn.Module, state: dict[str, torch.Tensor], fqns: dict[str, str]) -> list[str]:
    """Replace meta non-persistent buffers in `state` (placeholder -> tensor; `fqns`: placeholder ->
    model FQN) by recomputed CPU tensors, in place. Tied entries stay one tensor. Returns the FQNs
    that could not be rebuilt."""
    wanted: dict[int, list[str]] = {}  # id(meta tensor) -> placeholders holding it
    for ph, t in state.items():
        if t.is_meta and _is_non_persistent(model, fqns.get(ph, "")):
            wanted.setdefault(id(t), []).append(ph)
    if not wanted:
        return []
    init = _initialiser(model)
    rebuilt: dict[str, torch.Tensor] = {}
    by_owner: dict[str, list[str]] = {}
    for phs in wanted.values():
        owner, _, _ = fqns[phs[0]].rpartition(".")
        by_owner.setdefault(owner, []).append(fqns[phs[0]])
    for owner in by_owner:
        rebuilt.update(_recompute(model.get_submodule(owner), owner, init))
    failed = []
    for phs in wanted.values():
        value = rebuilt.get(fqns[phs[0]])
        if value is None:
            failed.append(fqns[phs[0]])
            continue
        for ph in phs:
            state[ph] = value
    return failed


def _is_non_persistent(model: torch.nn.Module, fqn: str) -> bool:
    owner, _, name = fqn.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return name in module._buffers and name in module._non_persistent_buffers_set


def _initialiser(model: torch.nn.Module) -> Callable[[torch.nn.Module], None]:
    hf_init = getattr(model, "_init_weights", None)  # Hugging Face PreTrainedModel
    if callable(hf_init):
        return hf_init

    def reset(module: torch.nn.Module) -> None:
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()

    return reset


def _recompute(owner: torch.nn.Module, prefix: str, init) -> dict[str, torch.Tensor]:
    """FQN -> value of the owner's own non-persistent buffers that `init` recomputes."""
    runs = [_init_copy(owner, init, fill) for fill in (0, 1)]
    if runs[0] is None or runs[1] is None:
        return {}
    out = {}
    for name, a in runs[0].items():
        b = runs[1][name]
        if torch.equal(a, b) and not (a.is_floating_point() and a.isnan().any()):
            out[f"{prefix}.{name}" if prefix else name] = a
    return out


def _init_copy(owner: torch.nn.Module, init, fill: int) -> dict[str, torch.Tensor] | None:
    twin = copy.deepcopy(owner)  # on 'meta': no data is copied
    names = [n for n in twin._buffers if n in twin._non_persistent_buffers_set and twin._buffers[n] is not None]
    for n in names:
        twin._buffers[n] = torch.full_like(twin._buffers[n], fill, device="cpu")
    try:
        with torch.no_grad():
            init(twin)
    except Exception:  # noqa: BLE001 - an initialiser that cannot run leaves the buffers unrebuilt
        return None
    return {n: twin._buffers[n] for n in names}
