"""Capture each model once per test session, where a test is about what comes after capture (which
pipeline a CLI command builds, what `meshc show` prints, which collectives a plan emits, what
auto_shard chooses), not about capture itself.

`captured(model, example_inputs, example_kwargs, dynamic_shapes=..., mesh=...)` is `meshc.capture`
with a session-wide memo keyed on everything capture reads - the model's class, structure and
config, its parameters and buffers (names, shapes, dtypes, values), the example inputs' values,
the keyword inputs, dynamic_shapes and options - and returns a clone of the memoized Program on
`mesh` (capture only records the mesh: `Program.mesh`). Capture is deterministic and every pass
works on a clone, so a test gets the Program it would have captured. `capture_once()` puts
`captured` in place of `meshc.capture` for code that calls it (the CLI); code that imported
`capture` by name captures for real, as a test about capture itself (or about two captures
agreeing) must.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

_MEMO: dict[str, Any] = {}  # key -> Program, for the whole session


def captured(model: torch.nn.Module, example_inputs: Any = None, example_kwargs: Any = None,
             dynamic_shapes: Any = None, mesh: Any = None, **options: Any):
    """`meshc.capture`, each (model, inputs, options) captured once per session; a clone on `mesh`."""
    import importlib

    from meshc.mesh import MeshSpec

    key = _key(model, example_inputs, example_kwargs, dynamic_shapes, **options)
    if key not in _MEMO:
        real = importlib.import_module("meshc.capture").capture  # the module's, whatever meshc.capture is now
        _MEMO[key] = real(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes, **options)
    program = _MEMO[key].clone()
    program.mesh = MeshSpec.parse(mesh)
    copies: dict[int, torch.Tensor] = {}  # its own tensors (tied ones stay one), so nothing writes the memo's
    for name, t in program.state.items():
        if id(t) not in copies:
            copies[id(t)] = _own_copy(t)
        program.state[name] = copies[id(t)]
    return program


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of the same kind: a Parameter stays a Parameter, a leaf stays a leaf."""
    c = t.detach().clone()
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(c, requires_grad=t.requires_grad)
    return c.requires_grad_(t.requires_grad)


@contextlib.contextmanager
def capture_once() -> Iterator[dict]:
    """Within the block `meshc.capture` is `captured`; yields the memo (key -> Program), so a test
    can check that a second command captured nothing new."""
    import meshc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meshc, "capture", captured)
        yield _MEMO


def _key(model: torch.nn.Module, args: Any, kwargs: Any, dynamic_shapes: Any, **options: Any) -> str:
    def rep(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{x.dtype}{x.device}:{_digest(x)}"
        if isinstance(x, (tuple, list)):
            return f"{type(x).__name__}({','.join(rep(v) for v in x)})"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}:{rep(v)}" for k, v in sorted(x.items())) + "}"
        return repr(x)

    config = getattr(model, "config", None)
    state = dict(sorted([*model.named_parameters(), *model.named_buffers()]))  # non-persistent buffers too
    return "|".join([type(model).__module__, type(model).__qualname__, repr(model),
                     config.to_json_string() if hasattr(config, "to_json_string") else repr(config),
                     rep(state), rep(args), rep(kwargs), rep(dynamic_shapes), rep(options)])


def _digest(t: torch.Tensor) -> str:
    t = t.detach()
    if t.device.type == "meta":
        return "meta"
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
