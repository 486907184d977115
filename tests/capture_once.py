"""Capture each model once per test session, in the modules that opt in: for tests about what
comes after capture (which pipeline a CLI command builds, what `meshc show` prints, which
collectives a plan emits), not about capture itself.

`capture_once()` is a context manager that replaces `meshc.capture` with a memo keyed on
everything capture reads - the model's class and state (names, shapes, dtypes, values), the
example inputs' values, the keyword inputs, dynamic_shapes and the mesh - so a second call on the
same model spec, in this module or another one that opted in, gets a clone of the first call's
Program (capture is deterministic and every pass works on a clone). A call with anything
different captures for real. Code that imported `capture` by name is not affected.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def _digest(t: torch.Tensor) -> str:
    t = t.detach()
    if t.device.type == "meta":
        return f"meta{tuple(t.shape)}{t.dtype}"
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _key(model: torch.nn.Module, args: Any, kwargs: Any, dynamic_shapes: Any, mesh: Any, **options: Any) -> str:
    def rep(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{x.dtype}:{_digest(x)}"
        if isinstance(x, (tuple, list)):
            return f"{type(x).__name__}({','.join(rep(v) for v in x)})"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}:{rep(v)}" for k, v in sorted(x.items())) + "}"
        return repr(x)

    state = sorted(model.state_dict(keep_vars=True).items())
    return "|".join([type(model).__qualname__, rep(dict(state)), rep(args), rep(kwargs), rep(dynamic_shapes),
                     str(mesh), rep(options)])


_MEMO: dict[str, Any] = {}  # key -> Program, for the whole session


@contextlib.contextmanager
def capture_once() -> Iterator[dict]:
    """Within the block, `meshc.capture` returns a clone of the Program it captured for the same
    (model, inputs, options); yields the memo (key -> Program) so a test can check it was used."""
    import meshc

    real, memo = meshc.capture, _MEMO

    def capture(model, example_inputs=None, example_kwargs=None, dynamic_shapes=None, mesh=None, **options):
        key = _key(model, example_inputs, example_kwargs, dynamic_shapes, mesh, **options)
        if key not in memo:
            memo[key] = real(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes, mesh=mesh,
                             **options)
        return memo[key].clone()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meshc, "capture", capture)
        yield memo
