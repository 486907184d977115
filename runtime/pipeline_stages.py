"""Split a Program into one FX graph per pipeline stage, by `node.meta["meshc_stage"]`.

Entry point: `split_stages(program, num_stages) -> Split`. Stage s's graph takes, in order:
the values stage s-1 sends (`recv`), the state tensors it reads (`state`, placeholder names of
the Program) and the user inputs it reads (`user`, indices into the flat inputs); it returns the
values stage s+1 needs (`send`), or, for the last stage, the model's flat outputs.

A value used several stages after the one that made it (a skip connection) is forwarded through
every stage in between: stage s sends exactly the values made at or before s that a later stage
reads, so transfers only ever go from stage s to s+1 (and gradients back), which is what the
schedules' dependencies (F(s,m) needs F(s-1,m)) describe. User inputs are not sent: every rank
is called with the inputs and each stage reads the ones it uses. State (parameters, buffers) is
read locally; a tensor read by stages on several ranks (tied weights such as GPT-2's wte and
lm_head) is held by each of them and `shared_state` names the groups whose gradients the
runtime sums across those ranks.

Nodes without a stage (e.g. collectives a later pass inserted) take the latest stage of their
inputs, or if they have none, the earliest stage of their users; `getitem` of a multi-output node
stays with its producer. A node that reads a value from a later stage is an error naming it.

Also here: `differentiable_collectives(gm)`, the stage graph of a tp-partitioned Program with each
functional collective replaced by an autograd Function whose backward is its adjoint (see below).

Never imports a pass, never creates or chooses a process group: it reads the graph and copies
nodes (the collectives keep the group names `prepare_rank` bound).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from meshc.errors import MeshError, NodeError
from meshc.program import Program


@dataclass(frozen=True)
class Boundary:
    """A value crossing from one stage to the next."""

    name: str            # node name in the Program
    val: Any             # FakeTensor, or SymInt/int for a size
    requires_grad: bool  # a float tensor that depends on a trainable parameter: its gradient flows back


@dataclass
class StageGraph:
    index: int
    gm: fx.GraphModule
    recv: list[Boundary]            # placeholders 0..len(recv)-1, from stage index-1
    state: list[str]                # next placeholders: Program state placeholder names
    user: list[int]                 # last placeholders: indices into the flat user inputs
    send: list[Boundary]            # outputs to stage index+1 (empty on the last stage)
    outputs: list[str] = field(default_factory=list)  # last stage: node names of the model outputs


@dataclass
class Split:
    stages: list[StageGraph]
    output_template: list[Any]      # the flat model outputs; None where the last stage supplies a value
    shared_state: list[list[str]]   # groups of state placeholders holding one tensor, read by several stages


def stage_of_nodes(program: Program) -> dict[fx.Node, int]:
    """The stage of every non-placeholder node (see the module docstring for unlabelled nodes)."""
    nodes = [n for n in program.graph.nodes if n.op not in ("placeholder", "output")]
    stage: dict[fx.Node, int] = {}
    unlabelled = [n for n in nodes if not isinstance(n.meta.get("meshc_stage"), int)]
    if len(unlabelled) == len(nodes) and nodes:
        raise MeshError("no node of the program has meta['meshc_stage']: run the pipeline_partition pass "
                        "(e.g. pipeline 'dce,pipeline_partition,lint') before the pipeline runtime")
    for n in nodes:
        if isinstance(n.meta.get("meshc_stage"), int):
            stage[n] = n.meta["meshc_stage"]
    for n in nodes:  # forwards: the latest stage of the inputs
        if n not in stage:
            ins = [stage[a] for a in n.all_input_nodes if a in stage]
            if ins:
                stage[n] = max(ins)
    for n in reversed(nodes):  # backwards: the earliest stage of the users
        if n not in stage:
            users = [stage[u] for u in n.users if u in stage]
            stage[n] = min(users) if users else 0
    for n in nodes:  # getitem of a multi-output node stays with its producer
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0] in stage:
            stage[n] = stage[n.args[0]]
    return stage


def trainable(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return (node.op == "placeholder" and node.meta.get("meshc_input") == "parameter"
            and isinstance(val, torch.Tensor) and val.is_floating_point())


def _requires_grad(program: Program) -> set[fx.Node]:
    """Nodes whose value is a float tensor depending on a trainable parameter (static autograd)."""
    out: set[fx.Node] = set()
    for n in program.graph.nodes:
        if n.op == "placeholder":
            if trainable(n):
                out.add(n)
            continue
        vals = n.meta.get("val")
        floats = any(isinstance(v, torch.Tensor) and v.is_floating_point()
                     for v in (vals if isinstance(vals, (list, tuple)) else [vals]))
        if floats and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def split_stages(program: Program, num_stages: int) -> Split:
    stage = stage_of_nodes(program)
    used = sorted(set(stage.values()))
    if used and (used[0] < 0 or used[-1] >= num_stages):
        raise MeshError(f"the program's nodes carry stages {used[0]}..{used[-1]} but the schedule has "
                        f"{num_stages} stages (pp x virtual); partition it for {num_stages} stages")
    last = num_stages - 1
    output = next(n for n in program.graph.nodes if n.op == "output")
    consumers: dict[fx.Node, int] = {}  # producer -> latest stage that reads it
    for n, s in stage.items():
        for a in n.all_input_nodes:
            if a.op != "placeholder":
                if stage[a] > s:
                    raise NodeError(n, f"stage {s} reads %{a.name} from the later stage {stage[a]}; stages must "
                                       f"follow the data flow (re-run pipeline_partition)")
                consumers[a] = max(consumers.get(a, -1), s)
    for a in output.all_input_nodes:
        if a.op != "placeholder":
            consumers[a] = last
    rg = _requires_grad(program)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    crossing = sorted((n for n, c in consumers.items() if c > stage[n]), key=order.__getitem__)
    boundaries = [[Boundary(n.name, n.meta.get("val"), n in rg) for n in crossing if stage[n] <= s < consumers[n]]
                  for s in range(last)]
    by_name = {n.name: n for n in program.graph.nodes}
    user_index = {n.name: i for i, n in enumerate(program.placeholders("user"))}
    stages = []
    for s in range(num_stages):
        recv = boundaries[s - 1] if s > 0 else []
        send = boundaries[s] if s < last else []
        body = [n for n in program.graph.nodes if stage.get(n) == s]
        outputs = [a for a in output.args[0] if isinstance(a, fx.Node)] if s == last else []
        stages.append(_stage_graph(program, s, body, recv, send, outputs, by_name, user_index))
    template = [None if isinstance(a, fx.Node) else a for a in output.args[0]]
    readers: dict[str, set[int]] = {}
    for st in stages:
        for name in st.state:
            readers.setdefault(name, set()).add(st.index)
    shared = [sorted(g) for g in program.tied_groups() if len({s for n in g for s in readers.get(n, ())}) > 1]
    shared += [[n] for n, ss in readers.items() if len(ss) > 1 and not any(n in g for g in shared)]
    return Split(stages, template, sorted(shared))


def _stage_graph(program: Program, s: int, body: list[fx.Node], recv: list[Boundary], send: list[Boundary],
                 outputs: list[fx.Node], by_name: dict[str, fx.Node], user_index: dict[str, int]) -> StageGraph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for b in recv:
        src = by_name[b.name]
        env[src] = graph.placeholder(f"recv_{b.name}")
        env[src].meta = {"val": b.val}
    reads = [a for a in [*(a for n in body for a in n.all_input_nodes), *outputs] if a.op == "placeholder"]
    state, user = [], []
    for a in dict.fromkeys(reads):  # first-use order, no duplicates
        (user if a.meta["meshc_input"] == "user" else state).append(a)
    for a in state + user:
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in body:
        env[n] = graph.node_copy(n, lambda a: env[a])
    if outputs:
        graph.output(tuple(env[a] for a in outputs))
    else:
        graph.output(tuple(env[by_name[b.name]] for b in send))
    gm = fx.GraphModule(program.gm, graph)
    return StageGraph(s, gm, recv, [a.name for a in state], [user_index[a.name] for a in user], send,
                      [a.name for a in outputs])



# ---- tensor-parallel collectives inside a stage, made differentiable -----------------------------
# A stage of a tp-partitioned Program holds `_c10d_functional` collectives, which have no autograd.
# For training each is replaced by an autograd.Function whose backward is the collective's adjoint
# (all_reduce <-> all_reduce, all_gather <-> reduce_scatter, all_to_all <-> the reverse all_to_all),
# and its `wait_tensor` by the value itself (the Function waits). With every tp rank seeding its
# loss with 1/tp, this gives each rank the exact gradient of its shards; replicated parameters'
# gradients are then summed over the tp group by the runtime.

def _c10d():
    import torch.distributed._functional_collectives  # noqa: F401 - registers the ops

    return torch.ops._c10d_functional


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, group):
        if op != "sum":
            raise MeshError(f"the pipeline runtime differentiates all_reduce('sum') only, got {op!r}")
        ctx.group = group
        return _c10d().wait_tensor(_c10d().all_reduce(x, op, group))

    @staticmethod
    def backward(ctx, g):
        return _c10d().wait_tensor(_c10d().all_reduce(g.contiguous(), "sum", ctx.group)), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, group):
        ctx.n, ctx.group = n, group
        return _c10d().wait_tensor(_c10d().all_gather_into_tensor(x, n, group))

    @staticmethod
    def backward(ctx, g):
        return _c10d().wait_tensor(_c10d().reduce_scatter_tensor(g.contiguous(), "sum", ctx.n, ctx.group)), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, n, group):
        if op != "sum":
            raise MeshError(f"the pipeline runtime differentiates reduce_scatter('sum') only, got {op!r}")
        ctx.n, ctx.group = n, group
        return _c10d().wait_tensor(_c10d().reduce_scatter_tensor(x, op, n, group))

    @staticmethod
    def backward(ctx, g):
        return _c10d().wait_tensor(_c10d().all_gather_into_tensor(g.contiguous(), ctx.n, ctx.group)), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (list(out_splits), list(in_splits)), group
        return _c10d().wait_tensor(_c10d().all_to_all_single(x, out_splits, in_splits, group))

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        back = _c10d().all_to_all_single(g.contiguous(), in_splits, out_splits, ctx.group)
        return _c10d().wait_tensor(back), None, None, None


def _differentiable(fn):
    def call(*args):
        return fn.apply(*args)

    call.__name__ = f"differentiable_{fn.__name__.strip('_').lower()}"
    return call


_ADJOINTS = {"all_reduce": _differentiable(_AllReduce), "all_gather_into_tensor": _differentiable(_AllGather),
             "reduce_scatter_tensor": _differentiable(_ReduceScatter), "all_to_all_single": _differentiable(_AllToAll)}


def differentiable_collectives(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose functional collectives carry their adjoints (see above)."""
    from meshc.collectives import collective_name

    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    wait = _c10d().wait_tensor.default
    replaced = set()
    for node in list(graph.nodes):
        name = collective_name(node)
        if name:
            node.target = _ADJOINTS[name]
            replaced.add(node)
        elif node.target is wait and node.args[0] in replaced:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(gm, graph)
