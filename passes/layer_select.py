"""The one parser of decoder-layer lists in pass options (ladder_residual, attention_removal,
ffn_fusion, parallel_blocks).

Entry points: `select_layers(spec, n_layers) -> list[int]` (a set of layers, sorted) and
`select_runs(spec, n_layers) -> list[list[int]]` (runs of consecutive layers, one per item).
Layers are numbered from 0 as in the model (`model.layers.0`). A spec is `all`, `last:N`,
`first:N`, an index `i`, an inclusive range `i-j`, or a comma list of indices and ranges
(`3,5,7`, `1-2,4-6`; in a pipeline string quote it: `attention_removal(layers='3,5,7')`).
Never reads a graph: callers say how many layers the model has.
"""

from __future__ import annotations

import re

from meshc.errors import MeshcError

_FORMS = "all, last:N, first:N, an index i, a range i-j, or a quoted list such as '3,5,7' or '1-2,4-6' (0-based)"


def select_runs(spec: str, n_layers: int, option: str = "layers") -> list[list[int]]:
    """Each comma item of `spec` as a run of consecutive 0-based layers; `all`, `last:N` and
    `first:N` are one run. Items may not overlap."""
    s = str(spec).strip().strip("'\"").strip()
    if s == "all":
        return [list(range(n_layers))]
    if m := re.fullmatch(r"(last|first):(\d+)", s):
        n = int(m.group(2))
        if not 1 <= n <= n_layers:
            raise MeshcError(f"{option}={s}: the model has {n_layers} layers; N must be in 1..{n_layers}")
        return [list(range(n_layers - n, n_layers)) if m.group(1) == "last" else list(range(n))]
    runs: list[list[int]] = []
    for item in s.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", item)
        if not m:
            raise MeshcError(f"{option}={spec!r}: cannot read {item.strip()!r}; write {_FORMS}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 0 <= lo <= hi < n_layers:
            raise MeshcError(f"{option}={spec!r}: {item.strip()!r} is outside the model's layers 0..{n_layers - 1} "
                             f"(or a range written high-low)")
        runs.append(list(range(lo, hi + 1)))
    seen: set[int] = set()
    for run in runs:
        if seen & set(run):
            raise MeshcError(f"{option}={spec!r}: layer {min(seen & set(run))} is named twice")
        seen |= set(run)
    return runs


def select_layers(spec: str, n_layers: int, option: str = "layers") -> list[int]:
    """0-based decoder layer indices named by `spec`, sorted."""
    return sorted(i for run in select_runs(spec, n_layers, option) for i in run)
