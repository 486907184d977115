"""Numeric comparison of model outputs (any pytree of tensors): the one place meshc measures error.

Entry point: `max_abs_error(reference, actual) -> (error, where, scale)`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree


def max_abs_error(reference: Any, actual: Any) -> tuple[float, str, float]:
    """Largest |reference - actual| over all tensor leaves, the leaf path where it occurs, and the
    largest |reference| (for relative tolerances). A structure/shape mismatch is an infinite error."""
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(reference)
    act_leaves, act_spec = pytree.tree_flatten_with_path(actual)
    if ref_spec != act_spec:
        return float("inf"), f"structure ({ref_spec} vs {act_spec})", 0.0
    worst, where, scale = 0.0, "output", 0.0
    for (path, r), (_, a) in zip(ref_leaves, act_leaves):
        if not isinstance(r, torch.Tensor):
            if r != a:
                return float("inf"), pytree.keystr(path) or "output", 0.0
            continue
        if r.shape != a.shape:
            return float("inf"), f"{pytree.keystr(path)} shape {tuple(r.shape)} vs {tuple(a.shape)}", 0.0
        if r.numel() == 0:
            continue
        diff = (r.detach().double() - a.detach().double()).abs()
        diff = torch.where(torch.isnan(diff), torch.tensor(float("inf"), dtype=diff.dtype), diff)
        err = float(diff.max())
        if err > worst or where == "output":
            worst, where = err, pytree.keystr(path) or "output"
        scale = max(scale, float(r.detach().double().abs().max()))
    return worst, where, scale
