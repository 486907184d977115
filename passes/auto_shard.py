"""auto_shard: choose every parameter's placement with an exact integer program.

Entry points: the pass `auto_shard(budget="auto", preset="auto", time_limit=...)` (sets
`program.plan` for `spmd_partition`), and `solve_sharding(program, ...) -> Solution` (used by
`meshc explain`).

Formulation (Alpa-style, over meshc's own sharding rules so the plan is exactly what
`spmd_partition` then builds), per mesh dim (the tensor-parallel dim first, then the others;
a `pp` dim is the pipeline's and is not solved here):

* strategies per node from `sharding_strategies` (identical repeated layers share theirs);
* binary x[v,s], one per strategy; sum_s x[v,s] = 1; if v picks s, each producer u must pick a
  strategy whose output is what s assumed (x[v,s] <= sum x[u,i] over matching i);
* cost of s = compute (cost model; divided by the dim size when the work is sharded) + the
  collectives its needs imply (alpha-beta); outputs are gathered to Replicate;
* per-rank parameter bytes <= budget (bytes already divided by the dims solved before);
  pins (`pin={"glob": "S(0)"}`, or every parameter from `fixed_plan`) fix variables by bounds.

Solved by HiGHS (`scipy.optimize.milp`) with a time limit; a result stopped by the limit says so
with its gap. Infeasible constraints are reduced to a minimal conflicting set of pins (deletion
filter) and named. Deterministic: same graph and options -> byte-identical plan JSON.
"""

from __future__ import annotations

import fnmatch
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx
from meshc.cost_model import default_preset, get_preset, value_bytes
from meshc.errors import MeshcError
from meshc.mesh import PP
from meshc.passes import sharding_rules as rules
from meshc.passes.sharding_strategies import (
    Strategy,
    block_of_path,
    enumerate_strategies,
    key,
    module_path,
)
from meshc.pipeline import register_pass
from meshc.placement import Placement, Replicate, Shard, parse_placement
from meshc.plan import Plan, make_plan
from meshc.program import Program
from meshc.redistribute import transition_time

R = Replicate()


@dataclass
class DimSolution:
    dim: str
    cost: float
    status: str
    seconds: float
    variables: int
    shared_nodes: int
    chosen: dict[fx.Node, Strategy]
    options: dict[fx.Node, list[Strategy]]


@dataclass
class Solution:
    plan: Plan
    cost: float  # predicted seconds per forward (objective, summed over the solved dims)
    chosen: dict[fx.Node, Strategy]  # on the first solved (tensor-parallel) dim
    options: dict[fx.Node, list[Strategy]]
    status: str  # "optimal" or "time limit reached (gap x%)"
    solve_seconds: float
    variables: int
    shared_nodes: int = 0  # nodes of repeated layers that reuse an earlier layer's variables
    dims: list[DimSolution] = field(default_factory=list)
    #: (collective, mesh dim, bytes) -> count per forward: the redistribution table applied to the
    #: plan (input chunks and output gathers included) - exactly what spmd_partition will emit
    collectives: Counter = field(default_factory=Counter)

    def collectives_summary(self) -> str:
        kinds = Counter()
        for (op, dim, _), k in self.collectives.items():
            kinds[f"{op}@{dim}"] += k
        return ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none"


def solve_dims(mesh) -> list[int]:
    """Mesh dims auto_shard decides, in order: the tensor-parallel dim, then the rest but `pp`."""
    first = mesh.tp_index
    rest = [i for i, n in enumerate(mesh.names) if n != PP and i != first and mesh.sizes[i] > 1]
    return ([first] if first is not None else []) + rest


def solve_sharding(program: Program, budget: float | None = None, preset: Any = "cpu-gloo",
                   time_limit: float = 30.0, pin: dict[str, Any] | None = None,
                   fixed_plan: Plan | None = None, gather_params: bool = False, copy: bool = True) -> Solution:
    """Optimal parameter placements on every (non-pipeline) dim of `program.mesh`.

    budget: per-rank parameter bytes (None: unlimited), or a float in (0, 1] = fraction of all
    parameter bytes. pin: {parameter glob: placement on the first solved dim}. fixed_plan:
    evaluate that plan instead of choosing (e.g. Megatron's). copy=False: solve on `program`
    itself, splitting its biased linears in its graph (the pass does this on its own copy)."""
    from meshc.passes.spmd_partition import split_biases

    if copy:
        program = program.clone()
    split_biases(program, None, recompile=False)  # biases as separate adds: row-parallel linears expressible
    mesh, preset = program.mesh, get_preset(preset)
    params = {n.meta["meshc_name"]: n for n in program.placeholders("parameter")}
    total = sum(value_bytes(p) for p in params.values())
    limit = None if budget is None else budget * total if budget <= 1 else budget
    dims = solve_dims(mesh)
    divisor = {p: 1.0 for p in params.values()}  # how far the dims solved so far divide each parameter
    solved: list[DimSolution] = []
    placements = {fqn: [R] * len(mesh.names) for fqn in params}
    taken: dict[fx.Node, set[int]] = {}  # tensor dims the dims solved so far shard, per node
    for i, d in enumerate(dims):
        pins = _pins(params, (pin or {}) if i == 0 else {}, fixed_plan, d)
        sol = _solve_dim(program, d, preset, limit, divisor, pins, time_limit, gather_params, taken)
        solved.append(sol)
        for v, s in sol.chosen.items():
            if isinstance(s.out, Shard):
                taken.setdefault(v, set()).add(s.out.dim)
        for fqn, p in params.items():
            out = sol.chosen[p].out
            placements[fqn][d] = out
            if not isinstance(out, Replicate):
                divisor[p] *= mesh.sizes[d]
    plan = Plan(mesh, source="auto_shard" if fixed_plan is None else fixed_plan.source)
    plan.inputs = make_plan(None, program, mesh).inputs
    plan.params = {fqn: tuple(pl) for fqn, pl in placements.items() if any(not isinstance(x, Replicate) for x in pl)}
    main = solved[0] if solved else DimSolution("-", 0.0, "optimal", 0.0, 0, 0, {}, {})
    worst = next((s.status for s in solved if s.status != "optimal"), "optimal")
    from meshc.passes.spmd_partition import predict_collectives

    return Solution(plan, sum(s.cost for s in solved), main.chosen, main.options, worst,
                    sum(s.seconds for s in solved), sum(s.variables for s in solved),
                    sum(s.shared_nodes for s in solved), solved, predict_collectives(program, plan))


def _solve_dim(program, dim, preset, limit, divisor, pins, time_limit, gather_params, taken) -> DimSolution:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n = program.mesh.sizes[dim]
    st = enumerate_strategies(program, dim, preset, gather_params, taken=taken,
                              pinned={p.meta["meshc_name"]: key(pl) for p, pl in pins.items()})
    opts, rep = st.options, st.rep
    offset, col = {}, 0
    for v in opts:
        if rep[v] is v:
            offset[v] = col
            col += len(opts[v])
    var = lambda v, i: offset[rep[v]] + i  # noqa: E731
    weight = Counter(rep[v] for v in opts)
    c = np.zeros(col)
    rows: dict[tuple, tuple[float, float]] = {}  # deduplicated: shared layers repeat their rows

    def row(coeffs: dict[int, float], lb: float, ub: float) -> None:
        rows.setdefault(tuple(sorted(coeffs.items())), (lb, ub))

    def consistency(v_var: int, u: fx.Node, assumed: Any) -> None:
        match = {var(u, j): 1.0 for j, t in enumerate(opts[u]) if key(t.out) == key(assumed)}
        match[v_var] = match.get(v_var, 0.0) - 1.0
        row(match, 0, np.inf)

    for v in offset:
        row({var(v, i): 1.0 for i in range(len(opts[v]))}, 1, 1)
        for i, s in enumerate(opts[v]):
            c[var(v, i)] += s.cost * weight[v]
            for u, assumed in s.assumed.items():
                consistency(var(v, i), u, assumed)
    for v, pairs in st.boundary.items():  # shared layers: only edges into other layers are new
        for i, s in enumerate(opts[v]):
            for rep_u, u in pairs:
                if rep_u in s.assumed:
                    consistency(var(v, i), u, s.assumed[rep_u])
    for group in program.tied_groups():  # one tensor: one placement
        tied = [n for n in program.placeholders() if n.name in group and n in opts]
        for other in tied[1:]:
            if rep[other] is not rep[tied[0]]:
                for j in range(len(opts[other])):
                    row({var(tied[0], j): 1.0, var(other, j): -1.0}, 0, 0)
    output = next(v for v in program.graph.nodes if v.op == "output")
    for u in rules.tensor_inputs(output):  # outputs are gathered back to every rank
        for j, t in enumerate(opts[u]):
            if not isinstance(t.out, list):
                c[var(u, j)] += transition_time(t.out, R, value_bytes(u), n, preset)
    if limit is not None:
        mem: dict[int, float] = {}
        for p in divisor:
            for j, t in enumerate(opts[p]):
                k = var(p, j)
                mem[k] = mem.get(k, 0.0) + value_bytes(p) / divisor[p] / (1 if isinstance(t.out, Replicate) else n)
        row(mem, -np.inf, limit)
    keys = list(rows)
    entries = [(r, j, a) for r, k in enumerate(keys) for j, a in k]
    A = coo_matrix(([a for _, _, a in entries], ([r for r, _, _ in entries], [j for _, j, _ in entries])),
                   shape=(len(keys), col)).tocsr()
    cons = LinearConstraint(A, [rows[k][0] for k in keys], [rows[k][1] for k in keys])

    def run(active: dict[fx.Node, Placement], limit_s: float):
        ub = np.ones(col)
        for p, pl in active.items():
            for j, t in enumerate(opts[p]):
                if key(t.out) != key(pl):
                    ub[var(p, j)] = 0.0
        # costs in microseconds: HiGHS's absolute gap tolerance (1e-6) must not hide differences
        return milp(c * 1e6, constraints=cons, integrality=np.ones(col), bounds=Bounds(np.zeros(col), ub),
                    options={"time_limit": limit_s, "disp": False, "mip_rel_gap": 1e-6})

    for p, pl in pins.items():
        if all(key(t.out) != key(pl) for t in opts[p]):
            raise MeshcError(f"auto_shard: cannot pin {p.meta['meshc_name']} to {key(pl)} on mesh dim "
                             f"'{program.mesh.names[dim]}' (size {n}); its possible placements are "
                             f"{', '.join(key(t.out) for t in opts[p])}")
    t0 = time.perf_counter()
    res = run(pins, time_limit)
    seconds = time.perf_counter() - t0
    if res.x is None:
        raise MeshcError(_infeasible(program, dim, pins, run, limit, divisor, opts, time_limit))
    status = "optimal" if res.status == 0 else f"time limit reached (gap {100 * (res.mip_gap or 0):.2f}%)"
    chosen = {v: opts[v][int(np.argmax(res.x[var(v, 0):var(v, 0) + len(opts[v])]))] for v in opts}
    return DimSolution(program.mesh.names[dim], float(res.fun) / 1e6, status, seconds, col,
                       sum(rep[v] is not v for v in opts), chosen, opts)


def _pins(params, pin, fixed_plan, dim) -> dict[fx.Node, Placement]:
    out: dict[fx.Node, Placement] = {}
    if fixed_plan is not None:
        for fqn, node in params.items():
            out[node] = fixed_plan.for_param(fqn)[dim]
    for pattern, value in sorted(pin.items()):
        hits = [node for fqn, node in params.items() if fnmatch.fnmatch(fqn, pattern)]
        if not hits:
            raise MeshcError(f"pin {pattern!r} matches no parameter (e.g. {next(iter(params), '?')})")
        for node in hits:
            out[node] = parse_placement(value) if isinstance(value, str) else value
    return out


def _infeasible(program, dim, pins, run, limit, divisor, opts, time_limit) -> str:
    """Name a minimal set of pins that cannot hold together with the budget (deletion filter:
    drop each pin in turn and keep it dropped if the rest is still infeasible)."""
    n = program.mesh.sizes[dim]
    active = dict(pins)
    for p in list(pins):
        trial = {q: pl for q, pl in active.items() if q is not p}
        if run(trial, min(time_limit, 5.0)).x is None:
            active = trial
    best = sum(value_bytes(p) / divisor[p] / (n if any(not isinstance(t.out, Replicate) for t in opts[p]) else 1)
               for p in divisor if p not in active)
    pinned = sum(value_bytes(p) / divisor[p] / (1 if isinstance(pl, Replicate) else n) for p, pl in active.items())
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    where = f"on mesh dim '{program.mesh.names[dim]}' (size {n})"
    budget = f"the budget of {mib(limit)} per rank" if limit is not None else "the graph"
    if not active:
        return (f"auto_shard: no plan satisfies {budget} {where}: even sharding every parameter that can be "
                f"sharded leaves {mib(best)} per rank. Raise the budget or use a larger mesh.")
    names = "; ".join(f"{p.meta['meshc_name']} (node %{p.name}) pinned {key(pl)}" for p, pl in active.items())
    return (f"auto_shard: no plan satisfies {budget} {where}. Conflicting constraints: {names}. These pins "
            f"need {mib(pinned)} per rank and the other parameters at least {mib(best)}"
            + (" (pins may also conflict with tied weights or with each other)" if limit is None else "")
            + ". Unpin one of them or raise the budget.")


def default_budget(program: Program) -> float | None:
    """Per-rank parameter bytes when none is given: on a tensor-parallel dim, what the Megatron
    plan needs — which shards only what the mesh divides, so the budget is reachable by
    construction (plus a relative tolerance of 1e-9, so that rounding never makes it infeasible);
    otherwise unlimited."""
    d = program.mesh.tp_index
    if d is None:
        return None
    megatron = make_plan("megatron", program, program.mesh)
    n = program.mesh.sizes[d]
    need = sum(value_bytes(p) / (1 if isinstance(megatron.for_param(p.meta["meshc_name"])[d], Replicate) else n)
               for p in program.placeholders("parameter"))
    return need * (1 + 1e-9) + 1


@register_pass("auto_shard", preserves_semantics=True,
               description="choose parameter placements with an exact integer program over the cost model")
def auto_shard(program: Program, *, budget: str = "auto", preset: str = "auto", time_limit: float = 30.0) -> Program:
    """budget: 'auto' (Megatron's per-rank parameter bytes on a tp dim), 'none', a fraction of
    all parameter bytes (0.5) or bytes per rank (2e9). preset: a cost-model preset or 'auto'."""
    if program.mesh.size <= 1:
        return program
    limit = parse_budget(budget, program)
    preset = default_preset(program) if preset == "auto" else preset
    sol = solve_sharding(program, limit, preset, time_limit, copy=False)
    program.gm.recompile()
    program.plan = sol.plan
    per_dim = ", ".join(f"{d.dim} {d.cost * 1e3:.3f} ms" for d in sol.dims)
    program.notes.append(f"auto_shard: {sol.status} in {sol.solve_seconds:.2f} s over {sol.variables} strategy "
                         f"variables ({sol.shared_nodes} nodes share a repeated layer's); predicted "
                         f"{sol.cost * 1e3:.3f} ms per forward ({preset}: {per_dim}); budget "
                         f"{'none' if limit is None else f'{limit / 2**20:.2f} MiB'} per rank; "
                         f"{len(sol.plan.params)} parameters sharded; collectives per forward: "
                         f"{sol.collectives_summary()}")
    return program


def parse_budget(budget: Any, program: Program) -> float | None:
    """'auto' | 'none' | a fraction | bytes -> per-rank bytes (or a fraction) for solve_sharding."""
    text = str(budget).strip().lower()
    if text == "auto":
        return default_budget(program)
    if text in ("none", "0", "0.0", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise MeshcError(f"auto_shard: budget {budget!r} is not 'auto', 'none', a fraction (0.5) or bytes "
                         f"per rank (2e9)") from None


# ---- explanations ----------------------------------------------------------------------------
def _layer_of(node: fx.Node) -> str:
    path = module_path(node)
    if not path:
        return "(top)"
    return block_of_path(path) or (path.rsplit(".", 1)[0] if "." in path else "(top)")


def _layer_prefix(fqn: str) -> str:
    return block_of_path(fqn.rsplit(".", 1)[0]) or "(top)"


def explain(solution: Solution, baseline: Solution | None = None, node_name: str | None = None) -> str:
    """Per-layer placements, implied collectives and predicted costs; or one node's alternatives."""
    from meshc.table import render_table

    if node_name is not None:
        return _explain_node(solution, node_name)
    per_layer: dict[str, list[float]] = {}
    colls: dict[str, list[str]] = {}
    for node, s in solution.chosen.items():
        layer = _layer_of(node)
        acc = per_layer.setdefault(layer, [0.0, 0.0])
        acc[0] += s.compute
        acc[1] += s.comm
        colls.setdefault(layer, []).extend(c.split("(")[0] for c in s.collectives)
    params: dict[str, list[str]] = {}
    for fqn, pls in solution.plan.params.items():
        prefix = _layer_prefix(fqn)
        short = fqn[len(prefix) + 1:] if prefix != "(top)" else fqn
        params.setdefault(prefix, []).append(f"{short}={'/'.join(key(p) for p in pls)}")
    rows = []
    for layer, (comp, comm) in per_layer.items():
        kinds = colls[layer]
        summary = ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds))) or "-"
        rows.append([layer, f"{comp * 1e6:.1f}", f"{comm * 1e6:.1f}", summary, " ".join(params.get(layer, [])) or "R"])
    rows = group_identical_rows(rows)
    total_c = sum(v[0] for v in per_layer.values())
    total_m = sum(v[1] for v in per_layer.values())
    main = solution.dims[0].dim if solution.dims else "-"
    order = "/".join(solution.plan.mesh.names)
    lines = [f"costs on mesh dim '{main}'; placements per mesh dim ({order}):",
             render_table(["layer", "compute us", "comm us", "collectives", "sharded parameters"], rows), "",
             f"total on '{main}': compute {total_c * 1e3:.3f} ms + communication {total_m * 1e3:.3f} ms"]
    lines += [f"dim '{d.dim}': {d.cost * 1e3:.3f} ms predicted (incl. output gathers), {d.status}, {d.seconds:.2f} s, "
              f"{d.variables} variables, {d.shared_nodes} nodes share a repeated layer's" for d in solution.dims]
    if baseline is not None:
        a, b = solution.plan.params, baseline.plan.params
        moved = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        lines.append(f"{baseline.plan.source} plan: {baseline.cost * 1e3:.3f} ms predicted vs auto_shard "
                     f"{solution.cost * 1e3:.3f} ms; they differ on {len(moved)} parameters"
                     + (f" (e.g. {', '.join(moved[:3])})" if moved else ""))
    return "\n".join(lines)


def group_identical_rows(rows: list[list[str]]) -> list[list[str]]:
    """Consecutive rows of blocks 'p.i', 'p.i+1', ... whose other columns agree become one row
    'p.i-j (n identical)' (an 80-layer decoder prints one row per kind of layer, not 80)."""
    out: list[list[str]] = []
    runs: list[tuple[str, int, int]] = []  # (prefix, first index, last index) of each output row
    for row in rows:
        prefix, dot, idx = row[0].rpartition(".")
        if dot and idx.isdigit() and out and runs[-1][0] == prefix and runs[-1][2] + 1 == int(idx) \
                and out[-1][1:] == row[1:]:
            runs[-1] = (prefix, runs[-1][1], int(idx))
            continue
        out.append(list(row))
        runs.append((prefix, int(idx), int(idx)) if dot and idx.isdigit() else ("", -2, -2))
    for row, (prefix, first, last) in zip(out, runs):
        if last > first:
            row[0] = f"{prefix}.{first}-{last} ({last - first + 1} identical, each)"
    return out


def _explain_node(solution: Solution, node_name: str) -> str:
    from meshc.table import render_table

    node = next((n for n in solution.options if n.name == node_name), None)
    if node is None:
        raise MeshcError(f"no node %{node_name}; node names are those of `meshc show MODEL --after dce`")
    chosen = solution.chosen[node]
    ranked = sorted(solution.options[node], key=lambda s: (s.cost, key(s.out)))[:8]
    assumes = lambda s: ", ".join(f"{u.name}:{key(p)}" for u, p in s.assumed.items())  # noqa: E731
    rows = [["*" if s is chosen else "", key(s.out), assumes(s), f"{s.compute * 1e6:.2f}", f"{s.comm * 1e6:.2f}",
             "; ".join(s.collectives) or "-"] for s in ranked]
    return (f"%{node.name} ({node.target}): {len(solution.options[node])} strategies, cheapest first (nodes of a "
            f"repeated layer show the first such layer's inputs). Local cost alone does not decide: the solver "
            f"picks the assignment whose total over the graph is least, so a locally cheap strategy loses when it "
            f"forces collectives elsewhere.\n"
            + render_table(["chosen", "output", "assumes inputs", "compute us", "comm us", "collectives"], rows))
