"""Sharding strategies per node on one mesh dim, and the repeated blocks that share them.

Entry points: `enumerate_strategies(program, dim, preset, gather_params) -> Strategies`, used by
`auto_shard`. A strategy of node v is (the output placement it assumes of each producer, the
placements `sharding_rules.decide` then needs, v's output placement, its compute and the
collectives its needs imply, priced from the one redistribution table `meshc.redistribute`).
Strategies come from meshc's own rule table, so a chosen strategy is exactly what
`spmd_partition` builds.

Identical repeated blocks (transformer layers) are enumerated once: a block whose structure
(ops, shapes, arguments, how it reads earlier blocks) and whose inputs' possible placements
match an earlier block's is *shared* — its nodes map to the earlier block's nodes (`rep`) and
reuse their strategies and decision variables. That is why building and solving the integer
program does not grow with depth. Never mutates the program.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from meshc.cost_model import node_time, value_bytes
from meshc.mesh import DP
from meshc.passes import sharding_rules as rules
from meshc.placement import InterleavedShard, Placement, Replicate, Shard, describe
from meshc.plan import LINEAR_OPS, _split_groups, held_placements
from meshc.program import Program
from meshc.redistribute import describe_steps, shardable, transition_time

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
class Strategies:
    options: dict[fx.Node, list[Strategy]]  # every node (shared nodes: their representative's list)
    rep: dict[fx.Node, fx.Node]  # node -> the node whose decision variables it uses (itself if none)
    boundary: dict[fx.Node, list[tuple[fx.Node, fx.Node]]]  # shared node -> (rep's producer, own producer)
    #                                                         for producers in other blocks


def key(p: Any) -> str:
    """A placement (or list of them, for tuple outputs) as a short stable string: 'S(0)', 'R|P'."""
    return "|".join(describe(x) for x in p) if isinstance(p, list) else describe(p) if p is not None else "-"


def is_param(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.meta.get("meshc_input") == "parameter"


def _param_candidates(node: fx.Node, n: int, groups: set[int]) -> list[Placement]:
    """Replicate, Shard(d) for every dim the mesh divides, and InterleavedShard(d, g) for the group
    counts `g` of the fused projections in the graph (GPT-2's q|k|v: weight and bias)."""
    out: list[Placement] = [R]
    for d, size in enumerate(node.meta["val"].shape):
        if shardable(size, n):
            out.append(Shard(d))
            out.extend(InterleavedShard(d, g) for g in sorted(groups) if shardable(size, g * n))
    return out


def enumerate_strategies(program: Program, dim: int, preset, gather_params: bool = False,
                         pinned: dict[str, str] | None = None,
                         taken: dict[fx.Node, set[int]] | None = None) -> Strategies:
    """Strategies per node on mesh dim `dim`. Unless `gather_params`, weights stay where they are
    stored (a strategy that would all-gather a parameter every forward, FSDP-style, is not
    offered). `pinned`: {parameter name: pinned placement}; blocks share only if pinned alike.
    `taken`: node -> tensor dims that mesh dims solved before this one already shard; a tensor dim
    is never sharded by two mesh dims (nested shards are not in the redistribution table)."""
    taken = taken or {}
    n = program.mesh.sizes[dim]
    on_dp = program.mesh.names[dim] == DP
    options: dict[fx.Node, list[Strategy]] = {}
    rep: dict[fx.Node, fx.Node] = {}
    boundary: dict[fx.Node, list[tuple[fx.Node, fx.Node]]] = {}
    groups = {g for node in program.graph.nodes if node.target in LINEAR_OPS and (g := _split_groups(node)) > 1}
    blocks = _blocks(program)
    seen: dict[tuple, list[fx.Node]] = {}  # (fingerprint, input placements) -> first block's nodes
    block_of = {v: b for b, nodes in blocks.items() for v in nodes}
    start_of = {nodes[0]: b for b, nodes in blocks.items()}
    index = {b: i for i, b in enumerate(blocks)}
    pos = {v: i for nodes in blocks.values() for i, v in enumerate(nodes)}
    prints = {b: _fingerprint(b, nodes, block_of, index, pos) for b, nodes in blocks.items()}
    skip: set[fx.Node] = set()
    for node in program.graph.nodes:
        if node.op == "output":
            continue
        if node in start_of:  # entering a repeated block: share an identical earlier one if any
            b = start_of[node]
            shared = _share(b, blocks, prints, seen, options, pinned or {})
            if shared is not None:
                for v, r in zip(blocks[b], shared):
                    rep[v], options[v] = rep[r], options[r]
                    outer = [(ru, u) for ru, u in zip(rules.tensor_inputs(r), rules.tensor_inputs(v))
                             if not is_param(u) and block_of.get(u) not in (None, b)]
                    if outer:
                        boundary[v] = outer
                    for ru, u in zip(rules.tensor_inputs(r), rules.tensor_inputs(v)):
                        if is_param(u):
                            rep[u] = rep[ru]
                skip.update(blocks[b])
        if node in skip:
            continue
        rep.setdefault(node, node)
        if node.op == "placeholder":
            kind = node.meta["meshc_input"]
            if kind == "parameter" and isinstance(node.meta.get("val"), torch.Tensor):
                cands = [c for c in _param_candidates(node, n, groups) if _fits(node, c, n, taken)]
            elif kind == "user" and "meshc_held" in node.meta:
                cands = [held_placements(node, program.mesh)[dim]]
            elif (kind == "user" and on_dp and isinstance(node.meta.get("val"), torch.Tensor)
                  and not node.meta.get("meshc_unbatched")):
                cands = [Shard(0)]
            else:
                cands = [R]
            options[node] = [Strategy({}, {}, c, 0.0, 0.0) for c in cands]
            continue
        options[node] = _node_strategies(node, options, n, preset, gather_params, taken)
    for p in program.placeholders("parameter"):  # shared blocks' parameters use their rep's list
        if rep.get(p, p) is not p:
            options[p] = options[rep[p]]
    return Strategies(options, rep, boundary)


def _node_strategies(node: fx.Node, options, n: int, preset, gather_params: bool, taken) -> list[Strategy]:
    inputs = rules.tensor_inputs(node)
    per_input = [list({key(s.out): s.out for s in options[u]}.values()) for u in inputs]
    seen: dict[tuple, Strategy] = {}
    t_full = node_time(node, preset) if node.op == "call_function" else 0.0
    for combo in itertools.product(*per_input):
        assumed = dict(zip(inputs, combo))
        d = rules.decide(node, lambda a, assumed=assumed: assumed.get(a, R))
        k = (tuple(key(c) for c in combo), key(d.out))
        if k in seen:
            continue
        if not gather_params and any(is_param(u) and key(need) != key(assumed[u]) for u, need in d.needs.items()):
            continue
        if not _fits(node, d.out, n, taken) or any(not _fits(u, need, n, taken) for u, need in d.needs.items()):
            continue  # shards a dim the mesh does not divide: spmd_partition could not build it
        comm, colls = 0.0, []
        for u, need in d.needs.items():
            have = assumed.get(u, R)
            kinds = "" if isinstance(have, list) or isinstance(need, list) else describe_steps(have, need)
            if kinds:
                comm += transition_time(have, need, value_bytes(u), n, preset)
                colls.append(f"{kinds}({u.name} {key(have)}->{key(need)})")
        outs = d.out if isinstance(d.out, list) else [d.out]
        sharded = any(p is not None and not isinstance(p, Replicate) for p in [*d.needs.values(), *outs])
        seen[k] = Strategy(assumed, dict(d.needs), d.out, t_full / n if sharded else t_full, comm, colls)
    return list(seen.values())


def _fits(node: fx.Node, p: Any, n: int, taken: dict[fx.Node, set[int]]) -> bool:
    """Whether placement `p` of node's value can be built on a mesh dim of size n: a static dim is
    sharded only where the table's `shardable` rule allows (symbolic dims - batch, sequence - are
    checked at run time), and never a dim an earlier-solved mesh dim already shards."""
    val = node.meta.get("val")
    if not isinstance(p, Shard) or not isinstance(val, torch.Tensor) or p.dim >= val.dim():
        return True
    if p.dim in taken.get(node, ()):
        return False
    size = val.shape[p.dim]
    return not isinstance(size, int) or shardable(size, n * getattr(p, "groups", 1))


# ---- repeated blocks -------------------------------------------------------------------------
_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")  # 'model.layers.3.mlp.up_proj' -> 'model.layers.3'


def module_path(node: fx.Node) -> str:
    """A placeholder's model-side name, or the innermost module a node was traced in ('' if none)."""
    if node.op == "placeholder":
        return node.meta.get("meshc_name", node.name)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def block_of_path(path: str) -> str | None:
    """The repeated block ('model.layers.3') a module path lies in, if any."""
    m = _BLOCK.match(path)
    return m.group(1) if m else None


def _blocks(program: Program) -> dict[str, list[fx.Node]]:
    """Repeated blocks: contiguous runs of computation nodes traced inside 'prefix.<i>' modules."""
    out: dict[str, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and (b := block_of_path(module_path(node))) is not None:
            out.setdefault(b, []).append(node)
    # a block whose nodes are not contiguous (interleaved with others) is not shared
    order = {v: i for i, v in enumerate(program.graph.nodes)}
    return {b: nodes for b, nodes in out.items() if order[nodes[-1]] - order[nodes[0]] == len(nodes) - 1}


def _fingerprint(b: str, nodes: list[fx.Node], block_of, index, pos) -> tuple:
    """The structure of a block: per node its op, value shape, non-tensor arguments, and where
    each tensor input comes from (this block, a parameter, k blocks back, or a global node)."""
    out = []
    for v in nodes:
        srcs = []
        for u in rules.tensor_inputs(v):
            if block_of.get(u) == b:
                srcs.append(("in", pos[u]))
            elif is_param(u):
                srcs.append(("param", re.sub(r"\.\d+\.", ".*.", u.meta["meshc_name"]), _shape(u)))
            elif block_of.get(u) is not None:
                srcs.append(("blk", index[b] - index[block_of[u]], pos[u]))
            else:
                srcs.append(("glob", u.name))
        consts = fx.node.map_arg((v.args, v.kwargs), lambda _: None)
        out.append((str(v.target), _shape(v), repr(consts), tuple(srcs)))
    return tuple(out)


def _shape(node: fx.Node) -> str:
    v = node.meta.get("val")
    return f"{v.dtype}{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _share(b, blocks, prints, seen, options, pinned) -> list[fx.Node] | None:
    """The nodes of an earlier identical block whose strategies block `b` can reuse, else None
    (then `b` is remembered as the first of its kind)."""
    nodes = blocks[b]
    params = [u for v in nodes for u in rules.tensor_inputs(v) if is_param(u)]
    pins = tuple(pinned.get(p.meta["meshc_name"]) for p in params)
    inside = set(nodes)
    outer = [u for v in nodes for u in rules.tensor_inputs(v) if u not in inside and not is_param(u)]
    context = tuple(tuple(key(s.out) for s in options[u]) for u in outer)
    k = (prints[b], context, pins)
    if k in seen:
        return seen[k]
    seen[k] = nodes
    return None
