"""Split a Program into pipeline stages balanced by the cost model (an exact DP over cuts).

Entry points: the pass `pipeline_partition(stages, virtual, schedule, microbatches, preset,
memory_cap, cuts)`, which writes `meta["meshc_stage"]` (and `meta["meshc_cost"]`) on every node
and one note line per stage; `graph_units(program, preset, cuts)` (the costed units and candidate
cuts); the pure `partition(costs, stages, ...)` and its checker `brute_force(...)`;
`shared_parameters(program)` (weights used by several stages, read back from the meta).

Model. Stages are contiguous ranges of the graph's topological order, so data flows only forward.
Cuts are allowed only at candidate positions: by default right after each residual-stream value
x_k (found from the graph, `residual_stream.py`) - there only the stream and the values every layer
reads (rotary tables, masks) cross. Graphs without a residual stream use the narrowest cuts (fewest
bytes crossing), or every position (`cuts=all`; never between a tuple and its getitem). User
inputs are not sent between stages (every rank is called with them), so they cross no cut. The
DP is exact over the candidates. A unit is the nodes between two neighbouring candidates; a stage
is a range of units. With F = the units'
forward seconds (`cost_model.node_time`) and x(c) = `p2p_time(bytes crossing cut c)`:

    stage time   = k * F + x(out cut) [+ x(in cut) for training: the gradient it sends back]
    stage memory = parameter bytes (a tied/shared weight once per stage that uses it)
                   + activation bytes x in-flight micro-batches of that stage in the schedule

k = 3 for training schedules (backward = 2 x forward), 1 for "forward". The DP minimises the
slowest stage time subject to stage memory <= memory_cap (per rank; / virtual per virtual stage).
A value read by several later stages (skip connection) is forwarded stage to stage (as the
runtime does), so its bytes count at every cut it crosses.
Costs are those of the captured example inputs, taken as one micro-batch.

It never runs the model or moves nodes between graphs (the runtime splits by `meshc_stage`), and
reads the schedule tables from `meshc.schedules` (pure data shared with the runtime).
"""

from __future__ import annotations

import bisect
import itertools
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch.fx as fx
from meshc.cost_model import default_preset, node_time, p2p_time, value_bytes
from meshc.errors import MeshcError
from meshc.passes.residual_stream import find_residual_stream
from meshc.pipeline import register_pass
from meshc.program import Program


@dataclass(frozen=True)
class Split:
    bounds: tuple[int, ...]        # unit indices 0 = b_0 < b_1 < ... < b_S = N; stage j = units [b_j, b_j+1)
    stage_times: tuple[float, ...]
    stage_memory: tuple[float, ...]
    bottleneck: float              # max(stage_times): what the DP minimises


# --------------------------------------------------------------------------- the pure problem


class _Problem:
    """Vectorised stage time and memory of unit ranges [a, b) (a may be a numpy array)."""

    def __init__(self, costs, stages, cut_time, backward_sends, params, acts, shared, inflight):
        n = len(costs)
        self.n, self.stages = n, stages
        self.pc = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
        cut = np.zeros(n + 1) if cut_time is None else np.asarray(cut_time, dtype=np.float64).copy()
        if len(cut) != n + 1:
            raise MeshcError(f"cut_time needs {n + 1} entries (one per position 0..{n}), got {len(cut)}")
        cut[0] = cut[n] = 0.0  # nothing is sent before the first or after the last unit
        self.cut, self.back = cut, 1.0 if backward_sends else 0.0
        self.pp = np.concatenate([[0.0], np.cumsum(np.zeros(n) if params is None else np.asarray(params, float))])
        self.pa = np.concatenate([[0.0], np.cumsum(np.zeros(n) if acts is None else np.asarray(acts, float))])
        self.inflight = np.ones(stages) if inflight is None else np.asarray(inflight, dtype=np.float64)
        if len(self.inflight) != stages:
            raise MeshcError(f"inflight needs one entry per stage ({stages}), got {len(self.inflight)}")
        # shared weights (used by several units): bytes, and for each start a the first user unit >= a
        self.shared = []
        for nbytes, units in shared:
            us = sorted(set(units))
            nxt = np.array([us[bisect.bisect_left(us, a)] if bisect.bisect_left(us, a) < len(us) else n + 1
                            for a in range(n + 1)])
            self.shared.append((float(nbytes), nxt))

    def time(self, a, b):
        return (self.pc[b] - self.pc[a]) + self.cut[b] + self.back * self.cut[a]

    def memory(self, a, b, j):
        m = (self.pp[b] - self.pp[a]) + (self.pa[b] - self.pa[a]) * self.inflight[j]
        for nbytes, nxt in self.shared:
            m = m + nbytes * (nxt[a] < b)
        return m

    def split(self, bounds: Sequence[int]) -> Split:
        ts = tuple(float(self.time(a, b)) for a, b in zip(bounds, bounds[1:]))
        ms = tuple(float(self.memory(a, b, j)) for j, (a, b) in enumerate(zip(bounds, bounds[1:])))
        return Split(tuple(bounds), ts, ms, max(ts))


def _problem(costs, stages, cut_time=None, backward_sends=False, params=None, acts=None, shared=(),
             inflight=None) -> _Problem:
    if not 1 <= stages <= len(costs):
        raise MeshcError(f"cannot split {len(costs)} units into {stages} non-empty stages: "
                         f"use 1..{len(costs)} stages, or finer cut candidates (cuts=all)")
    return _Problem(costs, stages, cut_time, backward_sends, params, acts, shared, inflight)


def partition(costs: Sequence[float], stages: int, *, cut_time: Sequence[float] | None = None,
              backward_sends: bool = False, params: Sequence[float] | None = None,
              acts: Sequence[float] | None = None, shared: Sequence[tuple[float, Sequence[int]]] = (),
              inflight: Sequence[float] | None = None, memory_cap: float | None = None) -> Split:
    """Exact DP: split units 0..N-1 into `stages` contiguous non-empty ranges minimising the slowest
    stage time (costs + cut_time[out] [+ cut_time[in] if backward_sends]) subject to stage memory
    (params + acts * inflight[stage] + shared weights once) <= memory_cap. O(stages * N^2)."""
    pr = _problem(costs, stages, cut_time, backward_sends, params, acts, shared, inflight)
    n, s = pr.n, stages
    best = np.full((s + 1, n + 1), np.inf)
    arg = np.zeros((s + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for j in range(1, s + 1):
        for i in range(j, n - (s - j) + 1):
            a = np.arange(j - 1, i)
            cand = np.maximum(best[j - 1, a], pr.time(a, i))
            if memory_cap is not None:
                cand = np.where(pr.memory(a, i, j - 1) <= memory_cap, cand, np.inf)
            k = int(np.argmin(cand))
            best[j, i], arg[j, i] = cand[k], a[k]
    if not np.isfinite(best[s, n]):
        need = _min_peak_memory(pr)
        raise MeshcError(f"no split into {s} stages fits memory_cap={memory_cap / 2**20:.2f} MiB per stage: the "
                         f"best split needs {need / 2**20:.2f} MiB on its fullest stage. Raise memory_cap, use "
                         f"more stages, or a schedule with fewer micro-batches in flight (1f1b instead of gpipe)")
    bounds, i = [n], n
    for j in range(s, 0, -1):
        i = int(arg[j, i])
        bounds.append(i)
    return pr.split(bounds[::-1])


def _min_peak_memory(pr: _Problem) -> float:
    """The smallest achievable max stage memory (same DP with memory as the objective)."""
    n, s = pr.n, pr.stages
    best = np.full((s + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    for j in range(1, s + 1):
        for i in range(j, n - (s - j) + 1):
            a = np.arange(j - 1, i)
            best[j, i] = np.min(np.maximum(best[j - 1, a], pr.memory(a, i, j - 1)))
    return float(best[s, n])


def brute_force(costs: Sequence[float], stages: int, *, memory_cap: float | None = None, **kw) -> Split:
    """Every placement of stages-1 cuts (same arguments as `partition`); for tests on small graphs."""
    pr = _problem(costs, stages, **kw)
    best: Split | None = None
    for inner in itertools.combinations(range(1, pr.n), stages - 1):
        sp = pr.split((0, *inner, pr.n))
        if memory_cap is not None and max(sp.stage_memory) > memory_cap:
            continue
        if best is None or sp.bottleneck < best.bottleneck:
            best = sp
    if best is None:
        raise MeshcError(f"no split into {stages} stages fits memory_cap={memory_cap}")
    return best


# --------------------------------------------------------------------------- from the graph


@dataclass
class Units:
    order: list[fx.Node]            # compute nodes in topological order
    node_time: list[float]          # forward seconds of each, from the cost model
    bounds: list[int]               # positions in `order`: 0 = p_0 < ... < p_N = len(order); unit u = [p_u, p_u+1)
    labels: list[str]               # per unit
    how: str                        # which cut candidates
    time: list[float]               # forward seconds per unit
    acts: list[float]               # activation bytes a unit keeps for the backward, per micro-batch
    params: list[float]             # bytes of weights used only by this unit
    shared: list[tuple[float, list[int], list[str]]]  # weights used by several units: bytes, units, names
    cross: list[float]              # bytes crossing each unit boundary (len N+1)
    skips: list[tuple[fx.Node, float, int, int]]  # values crossing several unit boundaries: node, bytes, first, last

    def unit_of(self, pos: int) -> int:
        return bisect.bisect_right(self.bounds, pos) - 1


def graph_units(program: Program, preset: str, cuts: str = "auto") -> Units:
    """Cost every compute node and group nodes into units between candidate cuts."""
    g = program.graph
    order = [n for n in g.nodes if n.op not in ("placeholder", "output")]
    pos = {n: i for i, n in enumerate(order)}
    L = len(order)
    # bytes crossing position i (between order[i-1] and order[i]): produced before i, used at >= i.
    # User inputs are not sent (every rank is called with them), so only computed values cross.
    diff = np.zeros(L + 2)
    spans = []
    for v in order:
        users = [pos.get(u, L) for u in v.users]  # the output node sits at L (last stage)
        b = value_bytes(v)
        if not users or b == 0:
            continue
        first, last = pos[v] + 1, max(users)
        if last >= first:
            diff[first] += b
            diff[last + 1] -= b
            spans.append((v, b, first, last))
    cross_at = np.cumsum(diff)[: L + 1]
    bounds, labels, how = _candidates(program, order, pos, cross_at, cuts)
    cost = [node_time(n, preset) for n in order]
    units = Units(order, cost, bounds, labels, how, [], [], [], [], [float(cross_at[p]) for p in bounds], [])
    units.cross[0] = units.cross[-1] = 0.0
    for a, b in zip(bounds, bounds[1:]):
        seg = order[a:b]
        units.time.append(sum(cost[a:b]))
        units.acts.append(sum(value_bytes(n) for n in seg if n.op == "call_function"
                              and not getattr(n.target, "is_view", False) and not isinstance(n.meta.get("val"), tuple)))
    # weights: tied placeholders share one tensor -> one key
    by_tensor: dict[int, list[fx.Node]] = {}
    for ph in program.placeholders():
        if ph.meta.get("meshc_input") != "user" and ph.name in program.state:
            by_tensor.setdefault(id(program.state[ph.name]), []).append(ph)
    units.params = [0.0] * (len(bounds) - 1)
    for phs in by_tensor.values():
        t = program.state[phs[0].name]
        nbytes = float(t.numel() * t.element_size())
        used = sorted({units.unit_of(pos[u]) for ph in phs for u in ph.users if u in pos})
        if len(used) == 1:
            units.params[used[0]] += nbytes
        elif used:
            units.shared.append((nbytes, used, [ph.meta.get("meshc_name", ph.name) for ph in phs]))
    inner = bounds[1:-1]  # unit boundary u = inner[u - 1]
    for v, b, first, last in spans:
        lo, hi = bisect.bisect_left(inner, first), bisect.bisect_right(inner, last)
        if hi - lo > 1:
            units.skips.append((v, b, lo + 1, hi))
    return units


def _candidates(program, order, pos, cross_at, cuts) -> tuple[list[int], list[str], str]:
    L = len(order)
    if cuts not in ("auto", "residual", "narrow", "all"):
        raise MeshcError(f"pipeline_partition: cuts={cuts!r}; use auto, residual, narrow or all")
    if cuts in ("auto", "residual"):
        try:
            stream = find_residual_stream(program)
        except MeshcError as e:
            if cuts == "residual":
                raise MeshcError(f"pipeline_partition(cuts=residual): {e}; use cuts=narrow or cuts=all") from e
            stream = None
        if stream is not None:
            marks = [(pos[x] + 1, k) for k, x in enumerate(stream.xs) if x in pos and 0 < pos[x] + 1 < L]
            bounds = [0] + [p for p, _ in marks] + [L]
            layer_of = {k: i for i, group in enumerate(stream.layers()) for k in group}
            labels, prev = [], 0
            for p, k in [*marks, (L, None)]:
                if k is None:
                    labels.append("head")
                elif prev == 0 and k == 0:
                    labels.append("embedding")
                else:
                    labels.append(f"sub-layer {k}" + (f" (layer {layer_of[k]})" if k in layer_of else ""))
                prev = p
            return bounds, labels, f"{len(marks)} residual-stream boundaries"
    allowed = [i for i in range(1, L) if order[i].target is not operator.getitem]  # getitem stays with its tuple
    if cuts in ("auto", "narrow") and allowed:
        least = min(cross_at[i] for i in allowed)
        narrow = [i for i in allowed if cross_at[i] <= least * 1.0000001]
        if cuts == "narrow" or len(narrow) >= 16:
            return [0, *narrow, L], [f"%{order[i].name}" for i in [0, *narrow]], \
                f"{len(narrow)} narrowest cuts ({least:.0f} bytes)"
    return [0, *allowed, L], [f"%{order[i].name}" for i in [0, *allowed]], f"every position ({len(allowed)})"



def shared_parameters(program: Program) -> dict[str, tuple[int, ...]]:
    """Weights read by nodes of several stages (from meta["meshc_stage"]): name -> stages.
    Tied placeholders (one tensor, several names) are merged under their first name."""
    out: dict[str, tuple[int, ...]] = {}
    groups = {n: g for g in program.tied_groups() for n in g}
    by_key: dict[str, set[int]] = {}
    for ph in program.placeholders():
        if ph.meta.get("meshc_input") == "user":
            continue
        key = groups.get(ph.name, [ph.name])[0]
        by_key.setdefault(key, set()).update(u.meta["meshc_stage"] for u in ph.users if "meshc_stage" in u.meta)
    for key, stages in by_key.items():
        if len(stages) > 1:
            out[program.fqn(key)] = tuple(sorted(stages))
    return out


# --------------------------------------------------------------------------- the pass


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


@register_pass("pipeline_partition", preserves_semantics=True,
               description="cost-balanced pipeline stages: exact DP over cuts under a per-stage memory cap")
def pipeline_partition(program: Program, *, stages: int = 0, virtual: int = 1, schedule: str = "1f1b",
                       microbatches: int = 0, preset: str = "auto", memory_cap: float = 0.0,
                       cuts: str = "auto") -> Program:
    """stages: 0 = mesh dim pp x virtual. microbatches: 0 = 2 x stages. memory_cap: bytes per rank
    (0 = none). cuts: auto | residual | narrow | all (where stage boundaries may go)."""
    from meshc.schedules import build_schedule, stage_inflight  # pure data, see the docstring

    if virtual < 1:
        raise MeshcError(f"pipeline_partition: virtual must be >= 1, got {virtual}")
    stages = stages or program.mesh.pp * virtual
    if stages % virtual:
        raise MeshcError(f"pipeline_partition: stages={stages} is not a multiple of virtual={virtual}; "
                         f"use stages = pp x virtual")
    pp, microbatches = stages // virtual, microbatches or 2 * stages
    sched = build_schedule(schedule, pp, microbatches, virtual)  # ScheduleError says what to change
    preset = default_preset(program) if preset == "auto" else preset
    t0 = time.perf_counter()
    u = graph_units(program, preset, cuts)
    k = 3.0 if sched.training else 1.0
    cap = memory_cap / virtual if memory_cap else None
    split = partition([k * t for t in u.time], stages, cut_time=[p2p_time(b, preset) for b in u.cross],
                      backward_sends=sched.training, params=u.params, acts=u.acts if sched.training else None,
                      shared=[(b, us) for b, us, _ in u.shared], inflight=stage_inflight(sched), memory_cap=cap)
    dp_s = time.perf_counter() - t0
    stage_of_unit = [j for j, (a, b) in enumerate(zip(split.bounds, split.bounds[1:])) for _ in range(a, b)]
    for i, n in enumerate(u.order):
        n.meta["meshc_stage"], n.meta["meshc_cost"] = stage_of_unit[u.unit_of(i)], u.node_time[i]
    for ph in program.placeholders():
        users = [x.meta["meshc_stage"] for x in ph.users if "meshc_stage" in x.meta]
        ph.meta["meshc_stage"] = 0 if ph.meta.get("meshc_input") == "user" or not users else min(users)
    next(n for n in program.graph.nodes if n.op == "output").meta["meshc_stage"] = stages - 1
    _report(program, u, split, sched, preset, dp_s, k)
    return program


def _report(program, u: Units, split: Split, sched, preset, dp_s, k) -> None:
    mean = sum(split.stage_times) / len(split.stage_times)
    kind = "F+B" if sched.training else "F"
    program.notes.append(
        f"pipeline_partition: {len(split.stage_times)} stages, {sched}, preset {preset}; cut candidates: {u.how}; "
        f"exact DP over {len(u.time)} units in {dp_s * 1e3:.0f} ms; slowest stage {split.bottleneck * 1e3:.3f} ms "
        f"per micro-batch ({kind}), max/mean {split.bottleneck / mean:.3f}")
    for j, (a, b) in enumerate(zip(split.bounds, split.bounds[1:])):
        nodes = u.order[u.bounds[a]:u.bounds[b]]
        what = u.labels[a] if b - a == 1 else f"{u.labels[a]} .. {u.labels[b - 1]}"
        program.notes.append(
            f"  stage {j} (rank {sched.stage_rank(j)}): {what}; {len(nodes)} nodes "
            f"%{nodes[0].name}..%{nodes[-1].name}; "
            f"{split.stage_times[j] * 1e3:.3f} ms ({kind} {k * sum(u.time[a:b]) * 1e3:.3f} + sends); memory "
            f"{_mib(split.stage_memory[j])}; sends {u.cross[b] / 1024:.1f} KiB forward")
    for nbytes, units, names in u.shared:
        st = sorted({s for s, (a, b) in enumerate(zip(split.bounds, split.bounds[1:])) for x in units if a <= x < b})
        if len(st) > 1:
            program.notes.append(f"  shared weight {' = '.join(names)} ({_mib(nbytes)}) is used by stages "
                                 f"{', '.join(map(str, st))}: each holds a copy; their gradients must be summed")
    cut_units = set(split.bounds[1:-1])
    skips = [(v, b) for v, b, first, last in u.skips if sum(first <= c <= last for c in cut_units) > 1]
    if skips:
        shown = ", ".join(f"%{v.name} ({b / 1024:.1f} KiB)" for v, b in skips[:6])
        more = f" and {len(skips) - 6} more" if len(skips) > 6 else ""
        program.notes.append(f"  values crossing several stage cuts (counted at each): {shown}{more}")

