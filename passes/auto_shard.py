"""auto_shard: choose every parameter's placement with an exact integer program.

Entry points: the pass `auto_shard(budget=..., preset=..., time_limit=...)` (sets `program.plan`
for `spmd_partition`), and `solve_sharding(program, ...) -> Solution` (used by `meshc explain`).

Formulation (Alpa-style, over meshc's own sharding rules so the plan is exactly what
`spmd_partition` then builds). On the sharding mesh dim ('tp', or the only dim):

* every node v has strategies s = (placements it assumes for its inputs, the placements the rule
  `sharding_rules.decide` then needs, its output placement), enumerated from the outputs its
  producers can have; parameters may be Replicate or Shard(d) (InterleavedShard for fused q|k|v);
  user inputs are pinned (Shard(0) on 'dp', else Replicate);
* binary x[v,s], one per node; if v picks s, each producer u must pick a strategy whose output is
  what s assumed (x[v,s] <= sum x[u,i] over matching i) — so propagation is exact;
* cost of s = compute (cost model; divided by the mesh size when the work is sharded) + the
  collectives its needs imply (alpha-beta, cost_model) ; outputs are gathered to Replicate;
* per-rank parameter bytes <= budget; pins (`pin={"glob": "S(0)"}`) fix parameters.

Solved by HiGHS (`scipy.optimize.milp`) with a time limit; a result stopped by the limit says so
and reports its gap. Deterministic: same graph, same options -> byte-identical plan JSON.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from meshc.cost_model import collective_time, get_preset, node_time
from meshc.errors import MeshcError
from meshc.passes import sharding_rules as rules
from meshc.pipeline import register_pass
from meshc.placement import InterleavedShard, Partial, Placement, Replicate, Shard, describe, parse_placement
from meshc.plan import LINEAR_OPS, Plan, _split_groups, make_plan, tp_dim
from meshc.program import Program

R = Replicate()


@dataclass
class Strategy:
    assumed: dict[fx.Node, Any]  # producer -> the output placement this strategy expects
    needs: dict[fx.Node, Placement]
    out: Any
    compute: float
    comm: float
    collectives: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float:
        return self.compute + self.comm


@dataclass
class Solution:
    plan: Plan
    cost: float  # predicted seconds per forward (objective)
    chosen: dict[fx.Node, Strategy]
    options: dict[fx.Node, list[Strategy]]
    status: str  # "optimal" or "time limit (gap x%)"
    solve_seconds: float
    variables: int
    shared_nodes: int = 0  # nodes of repeated layers that reuse an earlier layer's variables


def _key(p: Any) -> str:
    return "|".join(describe(x) for x in p) if isinstance(p, list) else describe(p) if p is not None else "-"


def _param_candidates(node: fx.Node, n: int, groups: set[int]) -> list[Placement]:
    """Replicate, Shard(d) for every dim the mesh divides, and InterleavedShard(d, g) for the group
    counts `g` of the fused projections in the graph (GPT-2's q|k|v: weight and bias)."""
    shape = node.meta["val"].shape
    out: list[Placement] = [R]
    for d, size in enumerate(shape):
        if isinstance(size, int) and size % n == 0 and size >= n:
            out.append(Shard(d))
            out.extend(InterleavedShard(d, g) for g in sorted(groups) if size % (g * n) == 0)
    return out


def _transition(have: Any, need: Any) -> str | None:
    if _key(have) == _key(need):
        return None
    if isinstance(have, Partial):
        return "all_reduce" if isinstance(need, Replicate) else "reduce_scatter_tensor"
    if isinstance(have, Shard):
        return "all_gather_into_tensor" if isinstance(need, Replicate) else "all_to_all_single"
    return None  # Replicate -> Shard is a local chunk


def _nbytes(node: fx.Node) -> int:
    from meshc.cost_model import size_hint

    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return 0
    return int(np.prod([size_hint(s) for s in v.shape], dtype=np.int64)) * v.element_size()


def _is_param(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.meta.get("meshc_input") == "parameter"


def enumerate_strategies(program: Program, dim: int, preset, pins: dict[fx.Node, Placement],
                         gather_params: bool = False):
    """Strategies per node. Unless `gather_params`, weights stay where they are stored (a
    strategy that would all-gather a parameter every forward, FSDP-style, is not offered)."""
    n = program.mesh.sizes[dim]
    options: dict[fx.Node, list[Strategy]] = {}
    groups = {g for node in program.graph.nodes if node.target in LINEAR_OPS and (g := _split_groups(node)) > 1}
    for node in program.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            kind = node.meta["meshc_input"]
            if kind == "parameter" and isinstance(node.meta.get("val"), torch.Tensor):
                cands = [pins[node]] if node in pins else _param_candidates(node, n, groups)
            elif kind == "user" and program.mesh.names[dim] == "dp" and isinstance(node.meta.get("val"), torch.Tensor):
                cands = [Shard(0)]
            else:
                cands = [R]
            options[node] = [Strategy({}, {}, c, 0.0, 0.0) for c in cands]
            continue
        inputs = rules.tensor_inputs(node)
        per_input = [list({_key(s.out): s.out for s in options[u]}.values()) for u in inputs]
        seen: dict[tuple, Strategy] = {}
        t_full = node_time(node, preset) if node.op == "call_function" else 0.0
        for combo in itertools.product(*per_input):
            assumed = dict(zip(inputs, combo))
            d = rules.decide(node, lambda a, assumed=assumed: assumed.get(a, R))
            key = (tuple(_key(c) for c in combo), _key(d.out))
            if key in seen:
                continue
            moves_param = any(_is_param(u) and _key(need) != _key(assumed[u]) for u, need in d.needs.items())
            if moves_param and not gather_params:
                continue
            comm, colls = 0.0, []
            for u, need in d.needs.items():
                kind = _transition(assumed.get(u, R), need)
                if kind:
                    comm += collective_time(kind, _nbytes(u), n, preset)
                    colls.append(f"{kind}({u.name} {_key(assumed[u])}->{_key(need)})")
            sharded = any(not isinstance(p, Replicate) for p in [*d.needs.values(),
                                                                  *(d.out if isinstance(d.out, list) else [d.out])]
                          if p is not None)
            seen[key] = Strategy(assumed, dict(d.needs), d.out, t_full / n if sharded else t_full, comm, colls)
        options[node] = list(seen.values())
    return options


def solve_sharding(program: Program, budget: float | None = None, preset: Any = "cpu-gloo",
                   time_limit: float = 30.0, pin: dict[str, Any] | None = None,
                   fixed_plan: Plan | None = None, gather_params: bool = False) -> Solution:
    """Optimal parameter placements on the sharding dim of `program.mesh` (see module docstring).

    budget: per-rank parameter bytes (None: unlimited); or a float in (0, 1] = fraction of all
    parameter bytes. fixed_plan: evaluate that plan instead of choosing (e.g. Megatron's)."""
    from meshc.passes.spmd_partition import split_biases
    from scipy.optimize import LinearConstraint, milp

    program = program.clone()
    split_biases(program, None)  # biases as separate adds: row-parallel linears become expressible
    mesh, preset = program.mesh, get_preset(preset)
    dim = tp_dim(mesh) if tp_dim(mesh) is not None else 0
    params = {n.meta["meshc_name"]: n for n in program.placeholders("parameter")}
    pins = _pins(program, params, pin or {}, fixed_plan, dim)
    options = enumerate_strategies(program, dim, preset, pins, gather_params)
    nodes = list(options)
    offset, col, shared = {}, 0, 0
    for v, rep in _representatives(nodes, options).items():  # repeated layers share their variables
        if rep is v:
            offset[v] = col
            col += len(options[v])
        else:
            offset[v] = offset[rep]
            shared += 1
    c = np.zeros(col)
    rows: list[dict[int, float]] = []
    lo, hi = [], []

    def row(coeffs: dict[int, float], lb: float, ub: float) -> None:
        rows.append(coeffs)
        lo.append(lb)
        hi.append(ub)

    for v in nodes:
        for i, s in enumerate(options[v]):
            c[offset[v] + i] += s.cost
        row({offset[v] + i: 1.0 for i in range(len(options[v]))}, 1, 1)
        for i, s in enumerate(options[v]):
            for u, assumed in s.assumed.items():
                match = {offset[u] + j: 1.0 for j, t in enumerate(options[u]) if _key(t.out) == _key(assumed)}
                match[offset[v] + i] = match.get(offset[v] + i, 0.0) - 1.0
                row(match, 0, np.inf)
    for group in program.tied_groups():  # one tensor: one placement
        nodes_g = [n for n in program.placeholders() if n.name in group]
        for other in nodes_g[1:]:
            for j in range(len(options[other])):
                if offset[nodes_g[0]] != offset[other]:
                    row({offset[nodes_g[0]] + j: 1.0, offset[other] + j: -1.0}, 0, 0)
    output = next(n for n in program.graph.nodes if n.op == "output")
    for u in rules.tensor_inputs(output):  # outputs are gathered back to every rank
        for j, t in enumerate(options[u]):
            kind = _transition(t.out, R)
            c[offset[u] + j] += collective_time(kind, _nbytes(u), mesh.sizes[dim], preset) if kind else 0.0
    total_param = sum(_nbytes(p) for p in params.values())
    if budget is not None:
        limit = budget * total_param if budget <= 1 else budget
        mem: dict[int, float] = {}
        for p in params.values():
            for j, t in enumerate(options[p]):
                mem[offset[p] + j] = mem.get(offset[p] + j, 0.0) + _nbytes(p) / (
                    mesh.sizes[dim] if isinstance(t.out, Shard) else 1)
        row(mem, -np.inf, limit)
    from scipy.sparse import coo_matrix

    ri = [r for r, coeffs in enumerate(rows) for _ in coeffs]
    ci = [j for coeffs in rows for j in coeffs]
    vals = [v for coeffs in rows for v in coeffs.values()]
    A = coo_matrix((vals, (ri, ci)), shape=(len(rows), col)).tocsr()
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=np.ones(col), bounds=(0, 1),
               options={"time_limit": time_limit, "disp": False})
    seconds = time.perf_counter() - t0
    if res.x is None:
        raise MeshcError(_infeasible_message(program, budget, pins, total_param, mesh.sizes[dim]))
    status = "optimal" if res.status == 0 else f"time limit reached (gap {100 * (res.mip_gap or 0):.2f}%)"
    chosen = {v: options[v][int(np.argmax(res.x[offset[v]:offset[v] + len(options[v])]))] for v in nodes}
    plan = Plan(mesh, source="auto_shard" if fixed_plan is None else fixed_plan.source)
    plan.inputs = make_plan(None, program, mesh).inputs
    for fqn, p in params.items():
        out = chosen[p].out
        if not isinstance(out, Replicate):
            plan.params[fqn] = tuple(out if i == dim else R for i in range(len(mesh.names)))
    return Solution(plan, float(res.fun), chosen, options, status, seconds, col, shared)


_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")  # 'model.layers.3.mlp.up_proj' -> 'model.layers.3'


def _module_path(node: fx.Node) -> str:
    """A placeholder's model-side name, or the innermost module a node was traced in ('' if none)."""
    if node.op == "placeholder":
        return node.meta.get("meshc_name", node.name)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _block(path: str) -> str | None:
    """The repeated block ('model.layers.3') a module path lies in, if any."""
    m = _BLOCK.match(path)
    return m.group(1) if m else None


def _class_key(node: fx.Node) -> str:
    """Where a node sits inside its repeated block: its module path with layer indices as '*'."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", _module_path(node)) + "|" + str(node.target)


def _representatives(nodes: list[fx.Node], options) -> dict[fx.Node, fx.Node]:
    """Each node -> the first earlier node at the same place in an identical block (same class key,
    same k-th occurrence within its block, identical strategy list), else itself."""
    count: dict[tuple, int] = {}
    first: dict[tuple, fx.Node] = {}
    out = {}
    for v in nodes:
        block = _block(_module_path(v))
        if block is None:
            out[v] = v
            continue
        ck = (block, _class_key(v))
        k = count[ck] = count.get(ck, -1) + 1
        sig = (_class_key(v), k, tuple((tuple(_key(a) for a in s.assumed.values()), _key(s.out), round(s.cost, 15))
                                         for s in options[v]))
        out[v] = first.setdefault(sig, v)
    return out


def _pins(program, params, pin, fixed_plan, dim) -> dict[fx.Node, Placement]:
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


def _infeasible_message(program, budget, pins, total_param, n) -> str:
    pinned = sum(_nbytes(p) / (n if isinstance(pl, Shard) else 1) for p, pl in pins.items())
    unpinned_min = sum(_nbytes(p) for p in program.placeholders("parameter") if p not in pins) / n
    names = [p.meta["meshc_name"] for p, pl in pins.items() if isinstance(pl, Replicate)][:6]
    return (f"auto_shard: no plan satisfies the constraints. Budget {budget} of {total_param / 2**20:.2f} MiB "
            f"parameters; pinned parameters alone need {pinned / 2**20:.2f} MiB per rank and the rest at least "
            f"{unpinned_min / 2**20:.2f} MiB. Conflicting pins (replicated): {', '.join(names) or 'none'}. "
            f"Raise the budget or unpin them.")


@register_pass("auto_shard", preserves_semantics=True,
               description="choose parameter placements with an exact integer program over the cost model")
def auto_shard(program: Program, *, budget: float = 0.0, preset: str = "cpu-gloo", time_limit: float = 30.0) -> Program:
    if program.mesh.size <= 1:
        return program
    sol = solve_sharding(program, budget or None, preset, time_limit)
    program.plan = sol.plan
    sharded = len(sol.plan.params)
    program.notes.append(f"auto_shard: {sol.status} in {sol.solve_seconds:.2f} s over {sol.variables} strategy "
                         f"variables; predicted {sol.cost * 1e3:.3f} ms per forward ({preset}); "
                         f"{sharded} parameters sharded")
    return program


def _layer_of(node: fx.Node) -> str:
    path = _module_path(node)
    if not path:
        return "(top)"
    return _block(path) or (path.rsplit(".", 1)[0] if "." in path else "(top)")


def explain(solution: Solution, baseline: Solution | None = None, node_name: str | None = None) -> str:
    """Per-layer placements, implied collectives and predicted costs; or one node's alternatives."""
    from meshc.table import render_table

    if node_name is not None:
        node = next((n for n in solution.options if n.name == node_name), None)
        if node is None:
            raise MeshcError(f"no node %{node_name}; node names are those of `meshc show MODEL --after dce`")
        chosen = solution.chosen[node]
        ranked = sorted(solution.options[node], key=lambda s: (s.cost, _key(s.out)))[:8]
        assumes = lambda s: ", ".join(f"{u.name}:{_key(p)}" for u, p in s.assumed.items())  # noqa: E731
        rows = [["*" if s is chosen else "", _key(s.out), assumes(s),
                 f"{s.compute * 1e6:.2f}", f"{s.comm * 1e6:.2f}", "; ".join(s.collectives) or "-"]
                for s in ranked]
        return (f"%{node.name} ({node.target}): {len(solution.options[node])} strategies, cheapest first. Local "
                f"cost alone does not decide: the solver picks the assignment whose total over the graph is "
                f"least, so a locally cheap strategy loses when it forces collectives elsewhere.\n"
                + render_table(["chosen", "output", "assumes inputs", "compute us", "comm us", "collectives"], rows))
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
        params.setdefault(prefix, []).append(f"{short}={'/'.join(_key(p) for p in pls)}")
    rows = []
    for layer, (comp, comm) in per_layer.items():
        kinds = colls[layer]
        summary = ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds))) or "-"
        rows.append([layer, f"{comp * 1e6:.1f}", f"{comm * 1e6:.1f}", summary, " ".join(params.get(layer, [])) or "R"])
    total_c = sum(v[0] for v in per_layer.values())
    total_m = sum(v[1] for v in per_layer.values())
    lines = [render_table(["layer", "compute us", "comm us", "collectives", "sharded parameters"], rows), "",
             f"total: compute {total_c * 1e3:.3f} ms + communication {total_m * 1e3:.3f} ms "
             f"(objective incl. output gathers {solution.cost * 1e3:.3f} ms); {solution.status}, "
             f"{solution.solve_seconds:.2f} s, {solution.variables} variables"]
    if baseline is not None:
        a, b = solution.plan.params, baseline.plan.params
        moved = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        lines.append(f"{baseline.plan.source} plan: {baseline.cost * 1e3:.3f} ms predicted; auto_shard differs on "
                     f"{len(moved)} parameters" + (f" (e.g. {', '.join(moved[:3])})" if moved else ""))
    return "\n".join(lines)


def _layer_prefix(fqn: str) -> str:
    return _block(fqn.rsplit(".", 1)[0]) or "(top)"
