"""spmd_partition: turn a Program and a sharding plan into one rank's local program.

Entry point: the pass `spmd_partition(plan=...)`. Steps, in order:

1. `make_plan` gives every parameter and user input a placement per mesh dim (`meshc.plan`).
2. Biased row-parallel linears become `linear(x, w) + b`, so the bias is added once, after the
   reduction.
3. Placements propagate through every node, one mesh dim at a time, by the rules in
   `sharding_rules` (`meshc_placement` on each node).
4. This rank's graph is emitted with local shapes; where a consumer needs a placement its
   producer does not have, the steps of the one redistribution table (`meshc.redistribute`) are
   emitted: functional collectives (`all_reduce`, `all_gather_into_tensor`, `reduce_scatter_tensor`,
   `all_to_all_single`) and local chunks. Each collective is issued right after its producer and
   its `wait_tensor` sits right before the first consumer, so independent compute can overlap it.
   Collectives name their group by mesh dim (`MeshSpec.group_name`: 'tp@tp=2'); the runtime binds
   the real process groups to those names.
5. `program.state` becomes this rank's shards.

User inputs enter replicated (every rank is called with the full inputs) and are chunked locally
where the plan shards them - except runtime-held ones (`meshc_held`, the KV cache), which enter as
this rank's shard, placed by `meshc.plan.held_placements`, and must stay so where an op writes
them in place (checked); outputs are gathered to Replicate. Size values (`sym_size`) stay
global in the local graph; view sizes on sharded dims are divided by the mesh dim size.
`predict_collectives` applies the table to a plan without emitting a graph (what auto_shard
reports; a test checks it equals the emitted graph's collectives). The pass never touches a
process group: `meshc compile --mesh tp=2` prints rank 0's program.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from meshc.collectives import count_collectives
from meshc.cost_model import size_hint
from meshc.errors import MeshError, NodeError, at_node
from meshc.mesh import DP
from meshc.passes import sharding_rules as rules
from meshc.pipeline import register_pass
from meshc.placement import InterleavedShard, Placement, Replicate, Shard, describe, local_shape, local_shard
from meshc.plan import Plan, held_placements, make_plan, unsharded_report
from meshc.program import Program
from meshc.redistribute import plan_steps, steps
from torch._guards import detect_fake_mode

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


@register_pass("spmd_partition", preserves_semantics=True,
               description="propagate the sharding plan through every node, insert collectives, emit this rank's graph")
def spmd_partition(program: Program, *, plan: str = "") -> Program:
    import torch.distributed._functional_collectives  # noqa: F401 - registers the _c10d_functional ops

    mesh = program.mesh
    if mesh.size <= 1:
        return program
    the_plan = make_plan(plan or program.plan or "megatron", program, mesh)
    _check_plan(program, the_plan)
    unsharded = unsharded_report(program, the_plan)  # on the global graph, before emission
    split_biases(program, the_plan, recompile=False)  # the emitted graph gets a GraphModule of its own
    placements, needs, fallbacks = _propagate(program, the_plan)
    with _size_oblivious():
        program.gm = fx.GraphModule(program.gm, schedule_waits_late(_Emitter(program, placements, needs).emit()))
        program.plan = the_plan
        _refresh_local_vals(program)
    _localize_state(program)
    kinds = count_collectives(program)
    program.notes.append(f"spmd_partition: plan '{the_plan.source}' (hash {the_plan.hash()}) on mesh '{mesh}', "
                         f"rank {program.rank}; collectives per forward: "
                         + (", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none"))
    if unsharded is not None:
        program.notes.append(f"spmd_partition: {unsharded}")
    if fallbacks:
        program.notes.append("spmd_partition: ops with no sharding rule ran replicated: "
                             + ", ".join(sorted(fallbacks)))
    return program


def _size_oblivious():
    """A context in which torch does not take a symbolic size it sees equal to 1 for the constant 1.
    Its 0/1 rule would: a dp rank's block of a batch of one row per rank (batch 2 on dp=2) would pin
    the batch symbol in the rank's fake values (`Eq((s + 1)//2, 1)`), and `meshc show` and the cost
    model would describe the example's batch. The code a rank runs reads each call's own sizes either
    way. (A no-op on a torch without the option.)"""
    from contextlib import nullcontext

    from torch.fx.experimental import _config

    if "backed_size_oblivious" not in getattr(_config, "_config", {}):
        return nullcontext()
    return _config.patch(backed_size_oblivious=True)


def predict_collectives(program: Program, plan: Any = None) -> Counter:
    """Multiset of (collective, mesh dim, bytes) this rank's program issues per forward under
    `plan` (default: the program's), from the redistribution table alone: no graph is emitted.
    User inputs enter replicated, outputs leave replicated, as the emitter does."""
    program = program.clone()
    the_plan = make_plan(plan or program.plan or "megatron", program, program.mesh)
    split_biases(program, the_plan, recompile=False)
    placements, needs, _ = _propagate(program, the_plan)
    out: Counter = Counter()

    def add(a: fx.Node, have: Any, want: Any) -> None:
        val = a.meta.get("val")
        if isinstance(val, torch.Tensor) and not isinstance(have, list) and not isinstance(want, list):
            shape = [size_hint(s) for s in val.shape]
            for s in plan_steps(have, want, shape, val.dtype.itemsize, program.mesh):
                if s.is_collective:
                    out[(s.op, s.dim, s.nbytes)] += 1

    seen: set = set()
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.meta["meshc_input"] == "user" and "meshc_held" not in node.meta:
                add(node, the_plan.replicated(), placements[node])
            continue
        for a, need in needs[node].items():
            key = (a, tuple(describe(p) for p in need))
            if key not in seen:
                seen.add(key)
                add(a, placements[a], need)
    return out


# ---- plan checks and pre-rewrite --------------------------------------------------------------

def _check_plan(program: Program, plan: Plan) -> None:
    for group in program.tied_groups():
        fqns = [program.fqn(name) for name in group]
        pls = {tuple(describe(p) for p in plan.for_param(f)) for f in fqns}
        if len(pls) > 1:
            raise MeshError(f"tied weights {', '.join(fqns)} share one tensor but the plan places them "
                            f"differently ({' vs '.join(map(str, sorted(pls)))}); give them the same placement")
    for node in program.placeholders():
        if node.meta["meshc_input"] not in ("parameter", "user") or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        name = node.meta["meshc_name"]
        pls = plan.for_param(name) if node.meta["meshc_input"] == "parameter" else plan.for_input(name)
        shape = node.meta["val"].shape
        for dim_name, n, p in zip(program.mesh.names, program.mesh.sizes, pls):
            if not isinstance(p, Shard):
                continue
            if p.dim >= len(shape):
                raise MeshError(f"plan shards {name} on dim {p.dim} but it has only {len(shape)} dims")
            size = shape[p.dim]
            unit = n * (p.groups if isinstance(p, InterleavedShard) else 1)
            if isinstance(size, int) and size % unit:
                raise MeshError(f"{name} {list(shape)}: dim {p.dim} (size {size}) does not divide over mesh dim "
                                f"'{dim_name}'={n}" + (f" x {p.groups} groups" if unit != n else "")
                                + f". Choose a mesh size that divides {size}, or replicate {name}.")



def split_biases(program: Program, plan: Plan | None, recompile: bool = True) -> None:
    """linear(x, w, b) / addmm(b, x, w) -> linear(x, w) + b where `plan` shards w's contraction dim
    (every biased linear if `plan` is None: auto_shard searches on that form). Without
    `recompile` only the graph changes (the GraphModule's code is stale until recompiled)."""
    graph = program.graph
    by_name = {n: n.meta.get("meshc_name") for n in program.placeholders()}
    for node in list(graph.nodes):
        if node.target not in (aten.linear.default, aten.addmm.default):
            continue
        w_idx, out_dim = (1, 0) if node.target is aten.linear.default else (2, 1)
        w = node.args[w_idx]
        b = node.args[0] if node.target is aten.addmm.default else (node.args[2] if len(node.args) > 2 else None)
        if not isinstance(b, fx.Node) or w not in by_name:
            continue
        if plan is not None and not any(isinstance(p, Shard) and p.dim != out_dim for p in plan.for_param(by_name[w])):
            continue
        with graph.inserting_before(node):
            if node.target is aten.linear.default:
                mm = graph.call_function(aten.linear.default, (node.args[0], w))
            else:
                mm = graph.call_function(aten.mm.default, (node.args[1], w))
            add = graph.call_function(aten.add.Tensor, (mm, b))
        for new in (mm, add):
            new.meta.update({k: node.meta[k] for k in ("stack_trace", "nn_module_stack", "val") if k in node.meta})
            new.meta["meshc_pass"] = "spmd_partition"
        node.replace_all_uses_with(add)
        graph.erase_node(node)
    if recompile:
        program.gm.recompile()


# ---- propagation ------------------------------------------------------------------------------

def _propagate(program: Program, plan: Plan):
    """node -> placements (tuple per mesh dim, or list of tuples); node -> {input: needed tuple}."""
    ndims = len(program.mesh.names)
    placements: dict[fx.Node, Any] = {}
    needs: dict[fx.Node, dict[fx.Node, tuple]] = {}
    fallbacks: set[str] = set()
    for node in program.graph.nodes:
        if node.op == "placeholder":
            kind, name = node.meta["meshc_input"], node.meta.get("meshc_name")
            placements[node] = (plan.for_param(name) if kind == "parameter" else
                                held_placements(node, program.mesh) if "meshc_held" in node.meta else
                                plan.for_input(name) if kind == "user" else plan.replicated())
            if kind != "user" or "meshc_held" in node.meta:
                node.meta["meshc_placement"] = placements[node]
            continue
        if node.op == "output":
            needs[node] = {a: plan.replicated() for a in rules.tensor_inputs(node)}
            continue
        per_dim_needs: dict[fx.Node, list[Placement]] = {}
        outs = []
        with at_node(node):
            for i in range(ndims):
                P = lambda a, i=i: _on_dim(placements.get(a), i)
                d = rules.decide(node, P)
                if d.fallback:
                    fallbacks.add(str(node.target))
                for a, p in d.needs.items():
                    per_dim_needs.setdefault(a, [Replicate()] * ndims)[i] = p
                outs.append(d.out)
        needs[node] = {a: tuple(v) for a, v in per_dim_needs.items()}
        _check_in_place(node, placements, needs[node], program)
        if any(isinstance(o, list) for o in outs):
            placements[node] = [tuple(o[k] if isinstance(o, list) else o for o in outs) for k in range(len(next(
                o for o in outs if isinstance(o, list))))]
        else:
            placements[node] = tuple(outs)
        _check_divisible(node, placements[node], program)
        node.meta["meshc_placement"] = placements[node]
    return placements, needs, fallbacks


def _check_in_place(node: fx.Node, placements: dict, need: dict, program: Program) -> None:
    """An op that writes its first argument in place (the KV cache's index_copy_) must find it in
    the placement it is held in: a redistributed copy would take the write and the held tensor
    would never see it - a silently wrong answer, so it is an error."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments or schema.arguments[0].alias_info is None \
            or not schema.arguments[0].alias_info.is_write or not isinstance(node.args[0], fx.Node):
        return
    target = node.args[0]
    have, want = placements.get(target), need.get(target)
    if want is not None and have is not None and tuple(map(describe, have)) != tuple(map(describe, want)):
        raise NodeError(node, f"writes {target.name} in place, but {target.name} is held "
                              f"{tuple(map(describe, have))} and this op needs it {tuple(map(describe, want))} on "
                              f"mesh '{program.mesh}': the write would land in a redistributed copy. Place "
                              f"{target.name} as the op needs it (sharding rule for {node.target})")


def _on_dim(p: Any, i: int) -> Any:
    if p is None:
        return Replicate()
    if isinstance(p, list):
        return [x[i] for x in p]
    return p[i]


def _check_divisible(node: fx.Node, pls: Any, program: Program) -> None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or isinstance(pls, list):
        return
    dims = [p.dim for p in pls if isinstance(p, Shard)]
    if len(dims) != len(set(dims)):
        raise NodeError(node, f"placements {tuple(describe(p) for p in pls)} on mesh '{program.mesh}' shard one tensor "
                              f"dim over two mesh dims, which the redistribution table does not express; shard "
                              f"different tensor dims on each mesh dim (or replicate on one of them)")
    for dim_name, n, p in zip(program.mesh.names, program.mesh.sizes, pls):
        if isinstance(p, Shard):
            size = val.shape[p.dim]
            if isinstance(size, int) and size % n:
                raise NodeError(node, f"output {list(val.shape)} would be sharded on dim {p.dim} (size {size}) over "
                                      f"mesh dim '{dim_name}'={n}, which does not divide it. Use a mesh size that "
                                      f"divides {size} (e.g. the number of attention heads), or another plan.")


# ---- emission ---------------------------------------------------------------------------------

class _Emitter:
    def __init__(self, program: Program, placements, needs):
        self.p, self.placements, self.needs = program, placements, needs
        self.mesh = program.mesh
        self.coords = self.mesh.coords(program.rank)
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.cache: dict[tuple, fx.Node] = {}
        self.local_sizes: dict[fx.Node, tuple[fx.Node, int]] = {}  # global size node -> (local size, factor)
        self.meta_from: fx.Node | None = None

    def emit(self) -> fx.Graph:
        for node in self.p.graph.nodes:
            self.meta_from = node
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
                new.meta = dict(node.meta)
                self.env[node] = new
                if (node.meta["meshc_input"] == "user" and "meshc_held" not in node.meta
                        and isinstance(node.meta.get("val"), torch.Tensor)):
                    held = tuple(Replicate() for _ in self.mesh.names)  # callers pass full inputs
                    self.env[node] = self._redistribute(new, held, self.placements[node], val=node.meta["val"])
            elif node.op == "output":
                outs = pytree.tree_map_only(fx.Node, lambda a, node=node: self._input(node, a), node.args[0])
                self.graph.output(outs)
            else:
                with at_node(node):
                    self.env[node] = self._emit_compute(node)
        return self.graph

    def _input(self, consumer: fx.Node, a: fx.Node) -> fx.Node:
        need = self.needs[consumer].get(a)
        if need is None:
            return self.env[a]
        key = (a, tuple(describe(p) for p in need))
        if key not in self.cache:
            self.cache[key] = self._redistribute(self.env[a], self.placements[a], need, early=True,
                                                 val=a.meta.get("val"))
        return self.cache[key]

    def _emit_compute(self, node: fx.Node) -> fx.Node:
        args, kwargs = pytree.tree_map_only(fx.Node, lambda a: self._input(node, a), (node.args, node.kwargs))
        args = self._localize_args(node, list(args))
        if node.target is torch.ops.aten.sym_size.int:
            return self._global_size(node, args)
        target = node.target
        if target in (aten.view.default, aten._unsafe_view.default):
            target = aten.reshape.default  # a local chunk may not be viewable where the global tensor was
        new = self.graph.call_function(target, tuple(args), kwargs)
        new.meta = {k: v for k, v in node.meta.items() if k != "val"}
        self._keep_global_val(node, new)
        return new

    def _keep_global_val(self, node: fx.Node, new: fx.Node) -> None:
        """Where this rank computes `node` at its global shape (its output not sharded; a view emitted
        as a reshape gives the same view), record its global value and the values it read, by the
        names of the nodes `new` reads instead."""
        if "val" in node.meta and not _sharded(self.placements.get(node)):
            read = {self._input(node, a).name: a.meta.get("val") for a in node.all_input_nodes}
            new.meta[_GLOBAL_VAL] = (node.meta["val"], read)

    def _localize_args(self, node: fx.Node, args: list) -> list:
        """Size arguments that refer to sharded dims become local sizes."""
        out_pl = self.placements.get(node)
        if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default):
            sizes = list(args[1])
            for p, n in zip(out_pl, self.mesh.sizes):
                if isinstance(p, Shard) and sizes[p.dim] != -1:
                    sizes[p.dim] = self._div(sizes[p.dim], n)
            args[1] = sizes
        elif node.target is aten.split.Tensor:
            src_pl = self.placements[node.args[0]]
            for i, (p, n) in enumerate(zip(src_pl, self.mesh.sizes)):  # out_pl: per output, per mesh dim
                if isinstance(p, InterleavedShard) and isinstance(out_pl, list) and isinstance(out_pl[0][i], Shard):
                    args[1] = self._div(args[1], n)
        return args

    def _div(self, size: Any, n: int) -> Any:
        if isinstance(size, fx.Node):
            local, factor = self.local_sizes.get(size, (None, 0))
            if factor == n:  # a global size this graph made as local x n: the local size itself
                return local
            return self._call(operator.floordiv, size, n)
        return size // n

    def _global_size(self, node: fx.Node, args: list) -> fx.Node:
        local = self._call(node.target, *args)
        pls, dim = self.placements.get(node.args[0]), node.args[1]
        factor = 1
        for p, n in zip(pls or (), self.mesh.sizes):
            if isinstance(p, Shard) and p.dim == dim:
                factor *= n
        if factor > 1:
            size = self._call(operator.mul, local, factor)
            self.local_sizes[size] = (local, factor)
            return size
        self._keep_global_val(node, local)
        return local

    def _call(self, target, *args) -> fx.Node:
        new = self.graph.call_function(target, args)
        if self.meta_from is not None:
            new.meta = {k: self.meta_from.meta[k] for k in ("stack_trace", "nn_module_stack")
                        if k in self.meta_from.meta}
        new.meta["meshc_pass"] = "spmd_partition"
        return new

    # -- collectives --
    def _redistribute(self, x: fx.Node, have: tuple, want: tuple, early: bool = False, val: Any = None) -> fx.Node:
        """Emit the steps of the one redistribution table (`meshc.redistribute`), dim 0 first; `val`:
        the global value `x` stands for (which of its sizes are symbolic: a batch dp splits)."""
        for i, (h, w) in enumerate(zip(have, want)):
            group, n, r = self.mesh.group_name(i), self.mesh.sizes[i], self.coords[i]
            for step in steps(h, w):
                if step.op == "chunk":
                    x = self._chunk(x, step.want, n, r, val if self.mesh.names[i] == DP else None)
                elif step.op == "all_reduce":
                    x = self._call(c10d.wait_tensor.default, self._issue(x, early, c10d.all_reduce.default, "sum",
                                                                          group))
                elif step.op == "reduce_scatter_tensor":
                    x = self._reduce_scatter(x, step.want.dim, group, n)
                elif step.op == "all_gather_into_tensor":
                    x = self._all_gather(x, step.have, group, n, early)
                else:  # all_to_all_single
                    x = self._all_to_all(x, step.have.dim, step.want.dim, group, n)
                early = False  # only the first collective can be issued at the producer
        return x

    def _issue(self, x: fx.Node, early: bool, target, *args) -> fx.Node:
        if early and x.op != "placeholder":
            with self.graph.inserting_after(x):
                return self._call(target, x, *args)
        return self._call(target, x, *args)

    def _all_gather(self, x: fx.Node, h: Placement, group: str, n: int, early: bool) -> fx.Node:
        """Shard(d) or InterleavedShard -> Replicate: gather along dim 0, then put blocks in place."""
        out = self._call(c10d.wait_tensor.default, self._issue(x, early, c10d.all_gather_into_tensor.default, n, group))
        if isinstance(h, InterleavedShard):  # [rank][group] blocks -> [group][rank]
            parts = self._call(aten.chunk.default, out if h.dim == 0 else self._undo_dim0(out, h.dim, n), n * h.groups,
                               h.dim)
            pieces = [self._call(operator.getitem, parts, r * h.groups + g) for g in range(h.groups) for r in range(n)]
            return self._call(aten.cat.default, pieces, h.dim)
        return out if h.dim == 0 else self._undo_dim0(out, h.dim, n)

    def _to_dim0(self, x: fx.Node, dim: int, n: int) -> fx.Node:
        """Blocks along `dim` stacked along dim 0 (block j first-dim-major), as dim-0 collectives want."""
        if dim == 0:
            return x
        parts = self._call(aten.chunk.default, x, n, dim)
        return self._call(aten.cat.default, [self._call(operator.getitem, parts, j) for j in range(n)], 0)

    def _reduce_scatter(self, x: fx.Node, dim: int, group: str, n: int) -> fx.Node:
        """Partial -> Shard(dim): each rank receives the sum of its block only."""
        rs = self._call(c10d.reduce_scatter_tensor.default, self._to_dim0(x, dim, n), "sum", n, group)
        return self._call(c10d.wait_tensor.default, rs)

    def _all_to_all(self, x: fx.Node, src: int, dst: int, group: str, n: int) -> fx.Node:
        """Shard(src) -> Shard(dst): block j of `dst` goes to rank j; received blocks join on `src`."""
        stacked = self._to_dim0(x, dst, n)
        split = self._call(operator.floordiv, self._call(aten.sym_size.int, stacked, 0), n)
        out = self._call(c10d.wait_tensor.default, self._call(
            c10d.all_to_all_single.default, stacked, [split] * n, [split] * n, group))
        return out if src == 0 else self._undo_dim0(out, src, n)

    def _undo_dim0(self, gathered: fx.Node, dim: int, n: int) -> fx.Node:
        parts = self._call(aten.chunk.default, gathered, n, 0)
        return self._call(aten.cat.default, [self._call(operator.getitem, parts, r) for r in range(n)], dim)

    def _chunk(self, x: fx.Node, w: Placement, n: int, r: int, val: Any = None) -> fx.Node:
        """This rank's block r of n along w's dim. A symbolic size split over dp (`val` given: the batch,
        which must divide, `Program.bind_inputs`) is cut with narrow, every rank's block
        (size + n - 1) // n long as chunk's first is: chunk's last block, size - (size + n - 1) // n,
        is an expression later shapes carry (GPT-2's last dp rank took 15 s to propagate its fake
        values, not 0.4). Elsewhere chunk's blocks, uneven where the size is."""
        if not isinstance(w, InterleavedShard) and isinstance(val, torch.Tensor) \
                and isinstance(val.shape[w.dim], torch.SymInt):
            size = self._call(aten.sym_size.int, x, w.dim)
            piece = self._call(operator.floordiv, self._call(operator.add, size, n - 1), n)
            start = self._call(operator.mul, piece, r)  # on every rank: the ranks' graphs differ in r only
            return self._call(aten.narrow.default, x, w.dim, start, piece)
        if isinstance(w, InterleavedShard):
            blocks = self._call(aten.chunk.default, x, w.groups, w.dim)
            mine = [self._call(operator.getitem, self._call(aten.chunk.default,
                                                            self._call(operator.getitem, blocks, g), n, w.dim), r)
                    for g in range(w.groups)]
            return self._call(aten.cat.default, mine, w.dim)
        return self._call(operator.getitem, self._call(aten.chunk.default, x, n, w.dim), r)


def schedule_waits_late(old: fx.Graph) -> fx.Graph:
    """Reorder so that every `wait_tensor` runs only when nothing else is ready: collectives are
    issued as soon as their input exists and waited as late as their users allow, so any compute
    that does not need the result (e.g. the next ladder sub-layer) overlaps the communication.
    Otherwise the original order is kept (ties go to the earlier node)."""
    import heapq

    nodes = list(old.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(n.all_input_nodes) for n in nodes}
    ready: list[tuple[int, int]] = []  # (is_wait, index)
    for n in nodes:
        if waiting[n] == 0:
            heapq.heappush(ready, (n.target is c10d.wait_tensor.default, index[n]))
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)[1]]
        order.append(node)
        for u in node.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (u.target is c10d.wait_tensor.default or u.op == "output", index[u]))
    graph, env = fx.Graph(), {}
    for n in order:
        env[n] = graph.node_copy(n, lambda a: env[a])
    return graph


def _localize_state(program: Program) -> None:
    """`program.state` becomes this rank's shards (tied weights stay one tensor; a tensor on 'meta'
    stays on 'meta', with its local shape, for `meshc.load_checkpoint` to fill)."""
    coords, sizes = program.mesh.coords(program.rank), program.mesh.sizes
    local: dict[int, torch.Tensor] = {}
    for node in program.placeholders():
        full, pls = program.state.get(node.name), node.meta.get("meshc_placement")
        if full is None or not pls or all(isinstance(p, Replicate) for p in pls):
            continue
        if id(full) not in local:
            local[id(full)] = local_shard(full, pls, coords, sizes).clone()
        program.state[node.name] = local[id(full)]


#: meta key, during emission only: (the value a node had in the global graph, {name of a node the rank's
#: copy reads: the value the global node read}), where the rank computes it at its global shape (not
#: sharded; Partial included). `_refresh_local_vals` reuses the value where the inputs are alike
#: (`propagate_shapes.fake_values`), and removes the key.
_GLOBAL_VAL = "meshc_global_val"


def _sharded(placements: Any) -> bool:
    """Whether a node's output placements (a tuple per mesh dim; a list of them for several outputs) shard it."""
    if isinstance(placements, list):
        return any(_sharded(p) for p in placements)
    return placements is None or any(isinstance(p, Shard) for p in placements)


def _refresh_local_vals(program: Program) -> None:
    """Placeholders of state get local fake values; every other node's val is recomputed, except
    where the rank computes the global value (`_GLOBAL_VAL`) from inputs like the global ones: reused
    (a fake tensor with symbolic sizes costs ~1 ms to make, and a tp rank's residual stream, norms
    and replicated layers keep their global values)."""
    from meshc.passes.propagate_shapes import fake_values

    vals = [n.meta.get("val") for n in program.placeholders()]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    for node in program.placeholders():
        val, pls = node.meta.get("val"), node.meta.get("meshc_placement")
        if (node.meta["meshc_input"] == "user" and "meshc_held" not in node.meta) or not isinstance(
                val, torch.Tensor) or pls is None:
            continue
        shape = local_shape(val.shape, pls, program.mesh.sizes)
        if list(shape) != list(val.shape):
            with mode:
                node.meta["val"] = torch.empty(shape, dtype=val.dtype)
    unchanged = {n: n.meta.pop(_GLOBAL_VAL) for n in program.graph.nodes if _GLOBAL_VAL in n.meta}
    values = fake_values(program, unchanged)
    for node in program.graph.nodes:
        if node.op not in ("placeholder", "output") and node.name in values:
            node.meta["val"] = values[node.name]
