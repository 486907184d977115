"""Pipeline schedules as data: which action each pp rank runs, in which order, and what it predicts.

Entry points: `build_schedule(name, pp, microbatches, virtual=1) -> Schedule` (built from the
`SCHEDULES` table, validated), `validate(schedule)`, `simulate(schedule, stage_cost, p2p_time)
-> Timeline` (event simulation: makespan, bubble fraction, peak in-flight activations per rank;
`stage_inflight` per virtual stage),
`format_table(schedule, timeline)` (the step x rank table `meshc schedule` prints).

An `Action` is `F` (forward), `B` (full backward), `I` (input-gradient backward) or `W`
(weight-gradient backward) of one virtual stage and one micro-batch. Stage s runs on pp rank
s % pp. Data dependencies (the runtime relies on exactly these): F(s,m) needs F(s-1,m);
B(s,m) / I(s,m) need F(s,m) and, below the last stage, the B/I of (s+1,m); W(s,m) needs
I(s,m). The loss is computed inside the last stage's F/B.

Lives in the compiler (pipeline_partition reads it) and is executed by `meshc.runtime.pipeline`.
This module never runs a model, never imports torch.distributed and never imports a pass: it is
pure data + arithmetic, so every rank builds the same schedule and validation happens before any
process waits on another.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from meshc.errors import ScheduleError

OPS = {"F": "forward", "B": "full backward", "I": "input-gradient backward", "W": "weight-gradient backward"}
DEFAULT_COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # uniform stages, B = I + W = 2F


@dataclass(frozen=True)
class Action:
    op: str     # "F" | "B" | "I" | "W"
    stage: int  # virtual stage 0..num_stages-1
    mb: int     # micro-batch 0..microbatches-1

    def __str__(self) -> str:  # F0.3 = forward of stage 0, micro-batch 3
        return f"{self.op}{self.stage}.{self.mb}"


@dataclass(frozen=True)
class Schedule:
    name: str
    pp: int
    virtual: int
    microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # per pp rank, in execution order

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    @property
    def training(self) -> bool:
        return self.name != "forward"

    def stage_rank(self, stage: int) -> int:
        """Stage s runs on pp rank s % pp (round-robin for interleaved; stage s itself when virtual=1)."""
        return stage % self.pp

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        return tuple(range(rank, self.num_stages, self.pp))

    @functools.cached_property
    def _all(self) -> frozenset[Action]:
        return frozenset(a for rank in self.actions for a in rank)

    def dependencies(self, a: Action) -> tuple[Action, ...]:
        """The actions whose results `a` consumes (see the module docstring)."""
        split = a.stage + 1 < self.num_stages and Action("I", a.stage + 1, a.mb) in self._all
        return _deps(a, self.num_stages, "I" if split else "B")

    def __str__(self) -> str:
        v = f", virtual={self.virtual}" if self.virtual > 1 else ""
        return f"schedule '{self.name}' (pp={self.pp}{v}, microbatches={self.microbatches})"


@dataclass(frozen=True)
class Event:
    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    events: tuple[Event, ...]          # in the order the simulation ran them
    makespan: float
    busy: tuple[float, ...]            # per rank
    bubble: tuple[float, ...]          # idle fraction of the makespan per rank
    bubble_overall: float              # idle time of all ranks / (pp * makespan)
    peak_inflight: tuple[int, ...]     # per rank: most micro-batches with F done and B/I not yet done


# --------------------------------------------------------------------------- builders


def _forward(pp: int, m: int, v: int) -> list[list[Action]]:
    return [[Action("F", r, i) for i in range(m)] for r in range(pp)]


def _gpipe(pp: int, m: int, v: int) -> list[list[Action]]:
    return [[Action("F", r, i) for i in range(m)] + [Action("B", r, i) for i in range(m)] for r in range(pp)]


def _one_f_one_b_order(pp: int, m: int, r: int, back: str) -> list[Action]:
    warmup = min(pp - 1 - r, m)
    order = [Action("F", r, i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        order += [Action("F", r, warmup + i), Action(back, r, i)]
    return order + [Action(back, r, i) for i in range(m - warmup, m)]  # cool-down


def _one_f_one_b(pp: int, m: int, v: int) -> list[list[Action]]:
    return [_one_f_one_b_order(pp, m, r, "B") for r in range(pp)]


def _interleaved(pp: int, m: int, v: int) -> list[list[Action]]:
    """Megatron-LM's interleaved 1F1B: micro-batches go through the rank's v chunks in groups of pp."""
    total = m * v

    def action(op: str, k: int, r: int) -> Action:
        chunk = (k % (pp * v)) // pp
        if op == "B":
            chunk = v - 1 - chunk
        return Action(op, chunk * pp + r, (k // (pp * v)) * pp + k % pp)

    ranks = []
    for r in range(pp):
        warmup = total if m == pp else min((pp - r - 1) * 2 + (v - 1) * pp, total)
        order = [action("F", k, r) for k in range(warmup)]
        for k in range(total - warmup):
            order += [action("F", warmup + k, r), action("B", k, r)]
        ranks.append(order + [action("B", k, r) for k in range(total - warmup, total)])
    return ranks


def _zb_h1(pp: int, m: int, v: int) -> list[list[Action]]:
    """Zero Bubble H1 (Qi et al. 2023): 1F1B's F/I order; each W is deferred to fill a gap where the
    rank would wait, rank r holding back at most r of them, so F-to-I activations (<= pp-r) plus
    deferred W's stay <= pp, 1F1B's peak. The order comes from a unit-time list scheduling
    (F = I = W = 1); with uniform stages it reaches the paper's bubble (pp-1)(F+I-W)."""
    fi = [deque(_one_f_one_b_order(pp, m, r, "I")) for r in range(pp)]
    pending: list[deque[Action]] = [deque() for _ in range(pp)]
    order: list[list[Action]] = [[] for _ in range(pp)]
    end: dict[Action, int] = {}
    t = 0
    while any(fi) or any(pending):
        started = []
        for r in range(pp):
            nxt = fi[r][0] if fi[r] else None
            ready = nxt is not None and all(end.get(d, t + 1) <= t for d in _deps(nxt, pp, "I"))
            if pending[r] and (len(pending[r]) > r or not ready):
                a = pending[r].popleft()
            elif ready:
                a = fi[r].popleft()
                if a.op == "I":
                    pending[r].append(Action("W", r, a.mb))
            else:
                continue
            order[r].append(a)
            started.append(a)
        end.update((a, t + 1) for a in started)
        t += 1
        if t > 10 * (pp + 3 * m):  # cannot happen for this construction; guard against an endless loop
            raise ScheduleError(f"zb-h1 construction did not finish for pp={pp}, microbatches={m}")
    return order


def _deps(a: Action, num_stages: int, grad_op: str) -> tuple[Action, ...]:
    """F(s,m) <- F(s-1,m); B/I(s,m) <- F(s,m) and the B/I (`grad_op`) of (s+1,m); W(s,m) <- I(s,m)."""
    if a.op == "F":
        return (Action("F", a.stage - 1, a.mb),) if a.stage > 0 else ()
    if a.op == "W":
        return (Action("I", a.stage, a.mb),)
    nxt = (Action(grad_op, a.stage + 1, a.mb),) if a.stage < num_stages - 1 else ()
    return (Action("F", a.stage, a.mb), *nxt)


def _check_plain(name: str, pp: int, m: int, v: int) -> str | None:
    if v != 1:
        return (f"virtual={v} is only for interleaved-1f1b; use virtual=1 with '{name}' "
                f"or --schedule interleaved-1f1b")
    return None


def _check_interleaved(name: str, pp: int, m: int, v: int) -> str | None:
    if v < 2:
        return "interleaved-1f1b needs virtual >= 2 stages per rank (with virtual=1 use '1f1b')"
    if m % pp:
        ok = ", ".join(str(pp * k) for k in range(1, 4))
        return (f"interleaved-1f1b (Megatron's formulation) needs microbatches to be a multiple of pp={pp}; "
                f"got {m}: use {ok}, ... or a non-interleaved schedule (gpipe, 1f1b, zb-h1 take any count)")
    return None


# name -> (builder, configuration check, one-line description)
SCHEDULES: dict[str, tuple[Callable, Callable, str]] = {
    "forward": (_forward, _check_plain, "inference: forwards only, micro-batches streamed through the stages"),
    "gpipe": (_gpipe, _check_plain, "GPipe: all forwards, then all backwards"),
    "1f1b": (_one_f_one_b, _check_plain, "1F1B: pp-1-r warm-up forwards, one forward one backward, cool-down"),
    "interleaved-1f1b": (_interleaved, _check_interleaved,
                         "Megatron interleaved 1F1B: virtual stages round-robin over ranks"),
    "zb-h1": (_zb_h1, _check_plain, "Zero Bubble H1: backward split into I and W, W deferred into bubbles"),
}


def build_schedule(name: str, pp: int, microbatches: int, virtual: int = 1) -> Schedule:
    """Build the named schedule and validate it (raises ScheduleError saying what to change)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
    for label, value in (("pp", pp), ("microbatches", microbatches), ("virtual", virtual)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{label} must be a positive integer, got {value!r}")
    builder, check, _ = SCHEDULES[name]
    problem = check(name, pp, microbatches, virtual)
    if problem:
        raise ScheduleError(f"{name} with pp={pp}, virtual={virtual}, microbatches={microbatches}: {problem}")
    sched = Schedule(name, pp, virtual, microbatches,
                     tuple(tuple(r) for r in builder(pp, microbatches, virtual)))
    validate(sched)
    return sched


# --------------------------------------------------------------------------- validation + simulation


def validate(schedule: Schedule) -> None:
    """Every (stage, mb) has the right actions on its rank, each rank's order respects its own
    dependencies, and the whole schedule finishes (sends never block, receives do)."""
    s = schedule
    if len(s.actions) != s.pp:
        raise ScheduleError(f"{s}: has action lists for {len(s.actions)} ranks, expected pp={s.pp}")
    allowed = set(OPS) if s.training else {"F"}
    seen: dict[tuple[int, int], list[str]] = {}
    for r, acts in enumerate(s.actions):
        for a in acts:
            if a.op not in allowed:
                raise ScheduleError(f"{s}: rank {r} runs {a}, but this schedule only allows {sorted(allowed)}")
            if not (0 <= a.stage < s.num_stages and 0 <= a.mb < s.microbatches):
                raise ScheduleError(f"{s}: rank {r} runs {a}: stage must be in 0..{s.num_stages - 1} and "
                                    f"micro-batch in 0..{s.microbatches - 1}")
            if s.stage_rank(a.stage) != r:
                raise ScheduleError(f"{s}: rank {r} runs {a}, but stage {a.stage} belongs to rank "
                                    f"{s.stage_rank(a.stage)} (stage s runs on rank s % pp)")
            seen.setdefault((a.stage, a.mb), []).append(a.op)
    for st in range(s.num_stages):
        for mb in range(s.microbatches):
            ops = sorted(seen.get((st, mb), []))
            good = [["F"]] if not s.training else [["B", "F"], ["F", "I", "W"]]
            if ops not in good:
                want = " or ".join("+".join(g) for g in good)
                raise ScheduleError(f"{s}: stage {st}, micro-batch {mb} has actions {ops or 'none'}; "
                                    f"each needs exactly {want}")
    for r, acts in enumerate(s.actions):
        done: set[Action] = set()
        for a in acts:
            for d in s.dependencies(a):
                if s.stage_rank(d.stage) == r and d not in done:
                    raise ScheduleError(f"{s}: rank {r} runs {a} before {d}, which it needs and which runs "
                                        f"later on the same rank; move {a} after {d}")
            done.add(a)
    simulate(s)  # raises if the schedule cannot finish


def simulate(schedule: Schedule, stage_cost: Callable[[Action], float] | None = None,
             p2p_time: float = 0.0) -> Timeline:
    """Event simulation: each rank runs its actions in order; an action starts when its rank is free
    and its dependencies are done (+ p2p_time when a dependency ran on another rank)."""
    s = schedule
    cost = stage_cost or (lambda a: DEFAULT_COST[a.op])
    pos, free = [0] * s.pp, [0.0] * s.pp
    end: dict[Action, float] = {}
    events: list[Event] = []
    progress = True
    while progress:
        progress = False
        for r in range(s.pp):
            while pos[r] < len(s.actions[r]):
                a = s.actions[r][pos[r]]
                deps = s.dependencies(a)
                if any(d not in end for d in deps):
                    break
                start = max([free[r]] + [end[d] + (p2p_time if s.stage_rank(d.stage) != r else 0.0) for d in deps])
                end[a] = free[r] = start + float(cost(a))
                events.append(Event(r, a, start, end[a]))
                pos[r] += 1
                progress = True
    stuck = [r for r in range(s.pp) if pos[r] < len(s.actions[r])]
    if stuck:
        raise ScheduleError(_deadlock_message(s, pos, end, stuck))
    makespan = max(free) if events else 0.0
    busy = tuple(sum(e.end - e.start for e in events if e.rank == r) for r in range(s.pp))
    bubble = tuple((makespan - b) / makespan if makespan else 0.0 for b in busy)
    overall = (s.pp * makespan - sum(busy)) / (s.pp * makespan) if makespan else 0.0
    return Timeline(tuple(events), makespan, busy, bubble, overall, peak_inflight(s))


def _deadlock_message(s: Schedule, pos: list[int], end: dict[Action, float], stuck: list[int]) -> str:
    lines = [f"{s} cannot finish (it would hang at run time):"]
    for r in stuck:
        a = s.actions[r][pos[r]]
        d = next(d for d in s.dependencies(a) if d not in end)
        owner = s.stage_rank(d.stage)
        where = (f"which rank {owner} never reaches (it waits at {s.actions[owner][pos[owner]]})"
                 if d in s._all else "which no rank runs")
        lines.append(f"  rank {r}'s next action {a} waits for {d} from rank {owner}, {where}")
    lines.append("  reorder the ranks' actions so every receive has a matching earlier send")
    return "\n".join(lines)


def peak_inflight(schedule: Schedule) -> tuple[int, ...]:
    """Per rank: most micro-batches whose F is done and whose B/I is not (0 for forward-only:
    inference keeps no activations for a backward)."""
    if not schedule.training:
        return (0,) * schedule.pp
    peaks = []
    for acts in schedule.actions:
        live = peak = 0
        for a in acts:
            live += 1 if a.op == "F" else -1 if a.op in ("B", "I") else 0
            peak = max(peak, live)
        peaks.append(peak)
    return tuple(peaks)


def stage_inflight(schedule: Schedule) -> tuple[int, ...]:
    """Per virtual stage: most micro-batches whose F is done and whose B/I is not (what the stage's
    activation memory must hold; pipeline_partition's memory cap uses it). 1 for forward-only."""
    if not schedule.training:
        return (1,) * schedule.num_stages
    live, peak = [0] * schedule.num_stages, [0] * schedule.num_stages
    for acts in schedule.actions:
        for a in acts:
            live[a.stage] += 1 if a.op == "F" else -1 if a.op in ("B", "I") else 0
            peak[a.stage] = max(peak[a.stage], live[a.stage])
    return tuple(peak)


def format_table(schedule: Schedule, timeline: Timeline | None = None) -> str:
    """Step x rank table: one row per time unit and per further event time (its start time in the
    first column), the action a rank starts there, `"` while it continues, `.` while the rank
    is idle; then bubble and peak in-flight activations per rank. Default: the unit-cost simulation."""
    tl = timeline or simulate(schedule)
    times = sorted({round(t, 9) for e in tl.events for t in (e.start, e.end)}
                   | set(range(int(tl.makespan) + 1)) if tl.events else set())
    rows_t = times[:-1]
    grid = [["."] * schedule.pp for _ in rows_t]
    for e in tl.events:
        for k, t in enumerate(rows_t):
            if e.start - 1e-9 <= t < e.end - 1e-9:
                grid[k][e.rank] = str(e.action) if abs(t - e.start) < 1e-9 else '"'
    width = max([6] + [len(str(e.action)) for e in tl.events]) + 1
    head = "time  " + "".join(f"rank {r}".ljust(width + 1) for r in range(schedule.pp))
    rows = [head.rstrip()] + [(f"{t:<6g}" + "".join(c.ljust(width + 1) for c in row)).rstrip()
                              for t, row in zip(rows_t, grid)]
    rows.append("")
    rows.append("bubble  " + "  ".join(f"r{r} {b:.1%}" for r, b in enumerate(tl.bubble))
                + f"  overall {tl.bubble_overall:.1%}")
    rows.append("peak in-flight activations (micro-batches)  "
                + "  ".join(f"r{r} {p}" for r, p in enumerate(tl.peak_inflight)))
    rows.append(f"makespan {tl.makespan:g}")
    return "\n".join(rows)
