"""meshc's error types: every failure a user can cause names its cause and what to do.

Entry points: `MeshcError` (base), `CaptureError`, `PipelineError`, `PassError`, `MeshError`,
`InputError`, `ScheduleError`, and `NodeError` + `at_node`, which tie a failure to an FX node and the user's
source line that produced it. Errors never hide the original exception: it stays as `__cause__`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.fx as fx


class MeshcError(Exception):
    """Base class of every error meshc raises on purpose."""


class CaptureError(MeshcError):
    """The model could not be captured into a Program."""


class PipelineError(MeshcError):
    """A pipeline string names an unknown pass or option, or has bad syntax."""


class MeshError(MeshcError):
    """A mesh is malformed, does not fit the world, or cannot run in this build."""


class InputError(MeshcError):
    """A compiled model was called with inputs that do not match what was captured."""


class ScheduleError(MeshcError):
    """A pipeline schedule is invalid for its (pp, virtual, microbatches) or cannot finish."""


class NodeError(MeshcError):
    """A failure tied to one FX node; the message names the node and its source line."""

    def __init__(self, node: fx.Node, message: str):
        from meshc.program import describe_node  # late: program imports errors

        self.node = node
        self.reason = message
        super().__init__(f"{message}\n  at node {describe_node(node)}")


class PassError(MeshcError):
    """A pass raised: names the pass, the passes that ran before it, and the node if known."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.before = before
        self.node = getattr(cause, "node", None)
        ran = ", ".join(before) if before else "none"
        detail = str(cause) if isinstance(cause, MeshcError) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"pass '{pass_name}' failed (passes that ran before it: [{ran}])\n  {detail}\n"
            f"  Replay with: meshc compile MODEL --pipeline '{','.join([*before, pass_name])}' "
            f"--print-after-change"
        )


@contextlib.contextmanager
def at_node(node: fx.Node) -> Iterator[None]:
    """Attribute any exception raised inside the block to `node` (keeps the original as cause)."""
    try:
        yield
    except NodeError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the node attached
        raise NodeError(node, f"{type(e).__name__}: {e}") from e
