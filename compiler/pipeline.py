"""Pass registry and pipeline strings.

Entry points: `register_pass` (decorator used by `passes/*.py`), `PASSES` (name → Pass),
`parse_pipeline("dce,ladder_residual(layers=last:4)")` → list of `PassCall`, and `resolve(mesh,
pipeline, plan, schedule, ...)` → `Resolved`: the one place that turns what a user asked for into
the pipeline string that runs (`meshc.compile` and every CLI command call it).

A pass is a function `fn(program, **options) -> Program` whose keyword-only parameters are its
options; their annotations (int, float, bool, str) are how option strings are converted. Pipelines
are parsed and validated completely before any pass runs, so a typo fails in milliseconds.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshc.errors import PipelineError


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[..., Any]
    description: str
    preserves_semantics: bool
    preserves_outputs: tuple[str, ...] = ()  # an architecture-changing pass's outputs that stay equal

    def options(self) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class PassCall:
    pass_: Pass
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pass_.name

    def __str__(self) -> str:
        opts = ",".join(f"{k}={_quote(v)}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


PASSES: dict[str, Pass] = {}


def register_pass(name: str, *, description: str, preserves_semantics: bool,
                  preserves_outputs: tuple[str, ...] = ()):
    """Register `fn(program, **options) -> Program` as pass `name`. A pass that changes the
    architecture may name the output fields it leaves equal (`NumericCheck` checks those)."""

    def wrap(fn):
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = Pass(name, fn, description, preserves_semantics, tuple(preserves_outputs))
        return fn

    return wrap


def all_passes() -> dict[str, Pass]:
    import meshc.passes  # noqa: F401 - importing the package registers every pass

    return PASSES


_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\(([^()]*)\))?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[PassCall]:
    """Parse 'a,b(k=v,k2=v2),c' into validated PassCalls (unknown names/options are errors)."""
    passes = all_passes()
    text = text.strip()
    calls, pos = [], 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline {text!r} at position {pos}: {text[pos:]!r}. "
                                f"Write 'pass_a,pass_b(option=value)'.")
        name, opts = m.group(1), m.group(2)
        if name not in passes:
            raise PipelineError(f"unknown pass {name!r} in pipeline {text!r}. Valid passes: "
                                f"{', '.join(sorted(passes))} (see `meshc passes`).")
        calls.append(PassCall(passes[name], _parse_options(passes[name], opts or "")))
        pos = m.end()
    return calls


def _parse_options(p: Pass, text: str) -> dict[str, Any]:
    valid = p.options()
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _OPTION.findall(text))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise PipelineError(f"pass {p.name!r}: option {item!r} needs a value (name=value)")
        if key not in valid:
            names = ", ".join(valid) or "none"
            raise PipelineError(f"pass {p.name!r} has no option {key!r}; its options: {names}")
        out[key] = _convert(p.name, key, _unquote(value.strip()), valid[key].annotation)
    return out


#: One option 'key=value' of a pass call; a value in quotes ('1-2,4-6' or "3,5,7") may hold commas.
_OPTION = re.compile(r"""(?:[^,'"]|'[^']*'|"[^"]*"|['"])+""")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if "'" in value or '"' in value:
        raise PipelineError(f"option value {value!r} has an unmatched quote; write 'a,b' to keep commas in a value")
    return value


def _quote(value: Any) -> str:
    """An option value as the pipeline string spells it: in double quotes when it holds a comma, so a
    replay command can wrap the whole pipeline in single quotes."""
    return f'"{value}"' if isinstance(value, str) and "," in value else str(value)


def _convert(pass_name: str, key: str, value: str, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        raise PipelineError(f"pass {pass_name!r}: option {key}={value!r} is not a valid {kind}") from None
    return value


# ---- the one resolver --------------------------------------------------------------------------

@dataclass(frozen=True)
class Resolved:
    pipeline: str
    schedule: Any = None  # meshc.schedules.Schedule on a mesh with a pipeline dim, else None


def default_microbatches(stages: int, batch: int | None) -> int:
    """The most micro-batches, up to 2 per stage, that divide `batch` (2 per stage if unknown)."""
    if not batch:
        return 2 * stages
    return max(d for d in range(1, 2 * stages + 1) if batch % d == 0)


def resolve(mesh: Any = None, pipeline: str = "default", plan: Any = "auto", schedule: str = "1f1b",
            microbatches: int = 0, virtual: int = 1, batch: int | None = None) -> Resolved:
    """(mesh, plan, schedule, pipeline) -> the pipeline string that runs, and the schedule.

    One device: dce, propagate_shapes, lint. A tp/dp mesh: dce, [auto_shard if plan='auto'],
    spmd_partition, lint. A mesh with a pp dim: dce, pipeline_partition for the schedule, the
    same sharding passes on a tp dim, split_stages, differentiable_collectives (tp: training needs
    the adjoints), weight_grad_outputs (zero-bubble schedules, which have W actions), lint.
    microbatches=0: the most, up to 2 per stage, that divide the example `batch` of each dp replica.
    An explicit pipeline string is returned as given (the schedule is still built and checked)."""
    from meshc.mesh import MeshSpec
    from meshc.schedules import build_schedule

    spec = MeshSpec.parse(mesh)
    shard = "auto_shard,spmd_partition" if plan == "auto" else "spmd_partition"
    if spec.pp <= 1:
        default = "dce,propagate_shapes,lint" if spec.size <= 1 else f"dce,{shard},lint"
        return Resolved(default if pipeline == "default" else pipeline)
    stages = spec.pp * virtual
    share = batch // spec.dp if batch else None
    sched = build_schedule(schedule, spec.pp, microbatches or default_microbatches(stages, share), virtual)
    if pipeline != "default":
        return Resolved(pipeline, sched)
    parts = ["dce", f"pipeline_partition(virtual={virtual},schedule={schedule},microbatches={sched.microbatches})"]
    if spec.tp > 1:
        parts.append(shard)
    parts.append(f"split_stages(stages={stages})")
    if spec.tp > 1:
        parts.append("differentiable_collectives")
    if any(a.op == "W" for acts in sched.actions for a in acts):
        parts.append("weight_grad_outputs")
    return Resolved(",".join([*parts, "lint"]), sched)
