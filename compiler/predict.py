"""What a compiled Program costs: predicted per-rank forward time and peak memory.

Entry points: `forward_time(program, preset) -> Prediction` (one rank's local Program, as the
ATen backend runs it), `stage_times(program, preset) -> list[Prediction]` (a pipelined Program:
one per stage), `peak_memory(program) -> (state bytes, peak activation bytes)`.

The time of a local Program is the sum over its nodes, in order (the ATen backend runs one node
after the other; a collective's wait is where its time is spent):

    call_overhead + Σ_nodes [overhead(op) + node_time]  + Σ_collectives [step_time + drift · since]

(`Prediction.parts` splits it by `part(node)`: matmul, attention, other ops, views,
collectives), where overhead(op) is the fixed time the preset measured for that ATen op in a
mixed graph (`op_overheads`: linear, attention, reductions, ...), else its generic
`dispatch_overhead`. `node_time` is the cost model's roofline at the measured rates (matmuls and
attention by size, per-element rates of the slower non-matmul ops);
collectives are read from the graph (`_c10d_functional.*`: what runs, with the bytes the graph
moves) and priced by `meshc.redistribute.step_time`, as the preset's process-group backend
implements them, plus the preset's `collective_drift` times `since`, the time the rank computed
since its previous collective: the ranks drift apart over a phase, and the first to arrive waits
(calibrated on a CPU mesh; the solver's per-edge prices leave it out). A pipeline stage adds
the point-to-point messages it emits (`stage_times`).
Peak memory: the state tensors (each storage once) plus the most bytes of
non-view node outputs alive at once, each freed after its last reader or its views' last reader
(outputs live to the end).
Arithmetic on the graph's metadata only: never runs a model or touches a process group.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from meshc.cost_model import DevicePreset, get_preset, node_time, p2p_issue_time, tensor_bytes, value_bytes
from meshc.placement import Replicate
from meshc.redistribute import Step, step_time

_C10D = "_c10d_functional"
_NOT_DISPATCHED = {operator.getitem}


@dataclass
class Prediction:
    compute_s: float = 0.0  # roofline of every node
    dispatch_s: float = 0.0  # per-node and per-call overhead of the backend
    comm_s: float = 0.0  # collectives
    nodes: int = 0
    collectives: dict[str, int] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)  # part(node) -> seconds (its nodes' compute + overhead)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.dispatch_s + self.comm_s

    def as_dict(self) -> dict:
        return {"total_ms": self.total_s * 1e3, "compute_ms": self.compute_s * 1e3,
                "dispatch_ms": self.dispatch_s * 1e3, "comm_ms": self.comm_s * 1e3, "nodes": self.nodes,
                "collectives": dict(self.collectives), "parts_ms": {k: v * 1e3 for k, v in self.parts.items()}}


_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul"}
PARTS = ("matmul", "attention", "other ops", "views", "collectives", "p2p")


def part(node: fx.Node) -> str:
    """Which part of a forward a call_function node is (PARTS): what the validation compares
    predicted with measured time by."""
    name = getattr(node.target, "_opname", getattr(node.target, "__name__", ""))
    if getattr(node.target, "namespace", "") == _C10D:
        return "collectives"
    if name in _MATMULS:
        return "matmul"
    if name == "scaled_dot_product_attention":
        return "attention"
    if getattr(node.target, "is_view", False) or node.target in _NOT_DISPATCHED or name.startswith("sym_"):
        return "views"
    return "other ops"


def _group_size(program, node: fx.Node) -> int:
    """Ranks in the process group a collective node names ('tp@tp=2' -> the mesh's tp size)."""
    group = next((a for a in node.args if isinstance(a, str) and "@" in a), None)
    mesh = program.mesh
    if group is not None and group.split("@")[0] in mesh.names:
        return mesh.sizes[mesh.names.index(group.split("@")[0])]
    ints = [a for a in node.args[1:] if isinstance(a, int)]
    return ints[0] if ints else mesh.size


def _collective_step(program, node: fx.Node) -> tuple[Step, int] | None:
    """(the step the redistribution table would price, group size) of a collective node."""
    op = getattr(node.target, "_opname", str(node.target).split(".")[-2])
    if op == "wait_tensor":
        return None
    src = node.args[0] if isinstance(node.args[0], fx.Node) else None
    moved = {"all_reduce": node, "all_gather_into_tensor": node, "reduce_scatter_tensor": src,
             "all_to_all_single": src}.get(op)
    if moved is None:
        return None
    return Step(op, Replicate(), Replicate(), nbytes=value_bytes(moved)), _group_size(program, node)


def forward_time(program, preset: DevicePreset | str) -> Prediction:
    """Predicted seconds of one call of `program`'s graph on one rank (see the module docstring)."""
    p = get_preset(preset)
    out = Prediction(dispatch_s=p.call_overhead)
    since = 0.0  # seconds this rank computed since its previous collective (the ranks drift apart)
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        where, before = part(node), out.total_s
        if node.target not in _NOT_DISPATCHED:
            out.dispatch_s += p.overhead(node.target)
            out.nodes += 1
        if where == "collectives":
            found = _collective_step(program, node)
            if found is not None:
                step, n = found
                out.comm_s += step_time(step, n, p) + p.collective_drift * since
                out.collectives[step.op] = out.collectives.get(step.op, 0) + 1
                since = 0.0
        else:
            out.compute_s += node_time(node, p)
            since += out.total_s - before
        out.parts[where] = out.parts.get(where, 0.0) + out.total_s - before
    return out


def stage_times(program, preset: DevicePreset | str) -> list[Prediction]:
    """One Prediction per pipeline stage of a split Program (its forward, one micro-batch as
    captured), with the point-to-point messages the stage emits on a pp mesh: posting the receives
    of its inputs from the previous stage and issuing the sends of its outputs to the next
    (`cost_model.p2p_issue_time`; part "p2p"). A message's wait for the other rank is not the stage's."""
    if program.split is None:
        return [forward_time(program, preset)]
    p, stages = get_preset(preset), program.split.stages
    out = []
    for stage in stages:
        pr = forward_time(stage.program, p)
        if program.mesh.pp > 1:
            p2p = (p2p_issue_time("recv", [_message_bytes(b.val) for b in stage.recv], p)
                   + p2p_issue_time("send", [_message_bytes(b.val) for b in stage.send], p))
            pr.comm_s += p2p
            pr.parts["p2p"] = p2p
        out.append(pr)
    return out


def _message_bytes(val) -> int:
    """Bytes of one stage-boundary message: a tensor's, or an int sent as a one-element int64 tensor."""
    return tensor_bytes(val) if isinstance(val, torch.Tensor) else 8


def _aliases(node: fx.Node) -> bool:
    """A node whose value shares its input's storage (a view, or tuple indexing)."""
    return node.op == "call_function" and (getattr(node.target, "is_view", False) or node.target in _NOT_DISPATCHED)


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr() if not t.is_meta else id(t)
    except (RuntimeError, NotImplementedError):
        return id(t)


def peak_memory(program) -> tuple[int, int]:
    """(bytes of the state tensors, each storage once; peak bytes of live intermediate values)."""
    seen, state = set(), 0
    for t in program.state.values():
        k = _storage_key(t)
        if k not in seen:
            seen.add(k)
            state += t.untyped_storage().nbytes() if not t.is_meta else t.numel() * t.element_size()
    order = list(program.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    last: dict[fx.Node, int] = {}
    for n in reversed(order):  # a view keeps its base alive: a value lives until its views' last reader
        ends = [index[u] if not _aliases(u) else max(index[u], last.get(u, index[u])) for u in n.users]
        if ends:
            last[n] = max(ends)
    output = order[-1]
    live = peak = 0
    frees: dict[int, list[int]] = {}
    for i, n in enumerate(order):
        if n.op == "call_function" and not _aliases(n) \
                and not str(n.target).endswith("_.default") and "wait_tensor" not in str(n.target):
            b = value_bytes(n)
            live += b
            end = len(order) if any(u is output for u in n.users) else last.get(n, i)
            frees.setdefault(end, []).append(b)
        peak = max(peak, live)
        live -= sum(frees.pop(i, []))
    return state, peak


__all__ = ["PARTS", "Prediction", "forward_time", "part", "peak_memory", "stage_times"]
