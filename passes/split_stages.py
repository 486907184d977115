"""split_stages: cut a Program into one Program per pipeline stage, by `node.meta["meshc_stage"]`.

Entry point: the pass `split_stages(stages=0)` (0: as many as the nodes' stages), which sets
`program.split` (`meshc.stages.Split`); `stage_of_nodes(program)`. Stage s's graph takes the state
tensors it reads, then the values stage s-1 sends (`recv`), then the user inputs it reads; it
returns the values stage s+1 needs (`send`), or, for the last stage, the model's flat outputs.

Cross-stage forwarding: a value used several stages after the one that made it (a skip
connection, a rotary table) is forwarded through every stage in between — stage s sends exactly
the values made at or before s that a later stage reads — so transfers only go from stage s to
s+1 (and gradients back), which is what the schedules' dependencies describe. User inputs are not
sent: every rank is called with the inputs. A tensor read by stages on several ranks (tied
weights such as GPT-2's wte and lm_head) is held by each; `Split.shared_state` names the groups
whose gradients the runtime sums across those ranks.

Nodes without a stage (e.g. collectives spmd_partition inserted) take the latest stage of their
inputs, or if they have none, the earliest stage of their users; `getitem` of a multi-output node
stays with its producer. A node that reads a value from a later stage is an error naming it.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from meshc.errors import MeshError, NodeError
from meshc.pipeline import register_pass
from meshc.program import Program, trainable
from meshc.stages import Boundary, Split, Stage


@register_pass("split_stages", preserves_semantics=True,
               description="one Program per pipeline stage (by meshc_stage), values forwarded stage to stage")
def split_stages(program: Program, *, stages: int = 0) -> Program:
    stage = stage_of_nodes(program)
    num_stages = stages or max(stage.values(), default=0) + 1
    used = sorted(set(stage.values()))
    if used and (used[0] < 0 or used[-1] >= num_stages):
        raise MeshError(f"the program's nodes carry stages {used[0]}..{used[-1]} but {num_stages} stages were asked "
                        f"for; partition it for {num_stages} stages")
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
    rg = requires_grad(program)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    crossing = sorted((n for n, c in consumers.items() if c > stage[n]), key=order.__getitem__)
    boundaries = [[Boundary(n.name, n.meta.get("val"), n in rg) for n in crossing if stage[n] <= s < consumers[n]]
                  for s in range(last)]
    by_name = {n.name: n for n in program.graph.nodes}
    user_index = {n.name: i for i, n in enumerate(program.placeholders("user"))}
    out = []
    for s in range(num_stages):
        body = [n for n in program.graph.nodes if stage.get(n) == s]
        outputs = [a for a in output.args[0] if isinstance(a, fx.Node)] if s == last else []
        out.append(_stage(program, s, body, boundaries[s - 1] if s > 0 else [], boundaries[s] if s < last else [],
                          outputs, by_name, user_index))
    template = [None if isinstance(a, fx.Node) else a for a in output.args[0]]
    readers: dict[str, set[int]] = {}
    for st in out:
        for name in st.state:
            readers.setdefault(name, set()).add(st.index)
    shared = [sorted(g) for g in program.tied_groups() if len({s for n in g for s in readers.get(n, ())}) > 1]
    shared += [[n] for n, ss in readers.items() if len(ss) > 1 and not any(n in g for g in shared)]
    program.split = Split(out, template, sorted(shared))
    crossing_counts = ", ".join(str(len(b)) for b in boundaries) or "-"
    program.notes.append(f"split_stages: {num_stages} stage programs; values sent across each boundary: "
                         f"{crossing_counts}")
    return program


def stage_of_nodes(program: Program) -> dict[fx.Node, int]:
    """The stage of every non-placeholder node (see the module docstring for unlabelled nodes)."""
    nodes = [n for n in program.graph.nodes if n.op not in ("placeholder", "output")]
    stage: dict[fx.Node, int] = {}
    unlabelled = [n for n in nodes if not isinstance(n.meta.get("meshc_stage"), int)]
    if len(unlabelled) == len(nodes) and nodes:
        raise MeshError("no node of the program has meta['meshc_stage']: run the pipeline_partition pass "
                        "(e.g. pipeline 'dce,pipeline_partition,split_stages,lint') before split_stages")
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


def requires_grad(program: Program) -> set[fx.Node]:
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


def _stage(program: Program, s: int, body: list[fx.Node], recv: list[Boundary], send: list[Boundary],
           outputs: list[fx.Node], by_name: dict[str, fx.Node], user_index: dict[str, int]) -> Stage:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    reads = [a for a in [*(a for n in body for a in n.all_input_nodes), *outputs] if a.op == "placeholder"]
    state, user = [], []
    for a in dict.fromkeys(reads):  # first-use order, no duplicates
        (user if a.meta["meshc_input"] == "user" else state).append(a)
    for a in state:
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for b in recv:
        src = by_name[b.name]
        env[src] = graph.placeholder(f"recv_{b.name}")
        env[src].meta = {"val": b.val, "meshc_input": "recv", "meshc_name": f"recv:{b.name}"}
    for a in user:
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in body:
        env[n] = graph.node_copy(n, lambda a: env[a])
    if outputs:
        graph.output(tuple(env[a] for a in outputs))
    else:
        graph.output(tuple(env[by_name[b.name]] for b in send))
    sub = dataclasses.replace(program, gm=fx.GraphModule(program.gm, graph),
                              state={a.name: program.state[a.name] for a in state},
                              history=list(program.history), notes=[], split=None)
    return Stage(s, sub, recv, [user_index[a.name] for a in user], send, [a.name for a in outputs])
