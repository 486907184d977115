"""meshc's error types: every failure a user can cause names its cause and what to do.

Entry points: `MeshcError` (base), `SpecError`, `CaptureError`, `PipelineError`, `PassError`, `MeshError`,
`InputError`, `ScheduleError`, and `NodeError` + `at_node`, which tie a failure to an FX node and the user's
source line that produced it. Errors never hide the original exception: it stays as `__cause__`.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator

import torch.fx as fx


class MeshcError(Exception):
    """Base class of every error meshc raises on purpose."""


class SpecError(MeshcError, ValueError):
    """A name or spec the user wrote (device preset, placement, model) is unknown or malformed.
    Also a ValueError, so code that caught the parsers' ValueError keeps working."""


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
    """A pass raised: names the pass, the passes that ran before it, the node if known, and the
    command that replays the run (`model`, `mesh`, `plan`: what to name in it; `replay_for` renames)."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException, *, call: str | None = None,
                 model: str | None = None, mesh: str | None = None, plan: str | None = None):
        self.pass_name = pass_name
        self.before = before
        self.call = call or pass_name  # the pass with its options, as the pipeline string spells it
        self.node = getattr(cause, "node", None)
        self.detail = str(cause) if isinstance(cause, MeshcError) else f"{type(cause).__name__}: {cause}"
        self.model, self.mesh, self.plan = model, mesh, plan
        super().__init__(self._message())

    def replay_for(self, model: str) -> PassError:
        """Name `model` (e.g. the spec the user typed on the command line) in the replay hint."""
        self.model = model
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        ran = ", ".join(self.before) if self.before else "none"
        return (f"pass '{self.pass_name}' failed (passes that ran before it: [{ran}])\n  {self.detail}\n"
                f"  Replay with: {self.replay_command()}")

    def replay_command(self) -> str:
        mesh = f" --mesh {shlex.quote(self.mesh)}" if self.mesh else ""
        plan = f" --plan {shlex.quote(self.plan)}" if self.plan else ""
        pipeline = ",".join([*self.before, self.call])
        return (f"meshc compile {shlex.quote(self.model) if self.model else 'MODEL'}{mesh}{plan} "
                f"--pipeline '{pipeline}' --print-after-change")


@contextlib.contextmanager
def at_node(node: fx.Node) -> Iterator[None]:
    """Attribute any exception raised inside the block to `node` (keeps the original as cause)."""
    try:
        yield
    except NodeError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the node attached
        raise NodeError(node, f"{type(e).__name__}: {e}") from e
