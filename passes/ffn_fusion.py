"""ffn_fusion: a run of consecutive FFN sub-layers becomes one wide FFN computed in parallel.

Entry point: the pass `ffn_fusion(runs=..., threshold=0.1, calibration="")` (not
semantics-preserving; FFN Fusion, NVIDIA 2025). A run of FFN sub-layers with no attention
between them (made by `attention_removal`) changes from sequential to parallel:

    sequential:  x <- x + FFN_i(Norm_i(x))   for i = 1..k, one after another
    parallel:    x <- x + sum_i FFN_i(Norm_i(x))

computed as ONE wide FFN: the in-projections (gate/up, or GPT-2's c_fc) concatenated on the
intermediate dim, the out-projections stacked on it, each block's pre-norm gain folded into its
columns (W diag(g); LayerNorm's shift b becomes the bias W b), the out-biases summed. The run then
has one norm and three matmuls (SwiGLU) or two (plain activation), and under tensor parallelism
one all-reduce instead of k. `runs` names decoder layers as `layer_select` does, each comma item a
run (`runs=1-2`, `runs='1-3,5-6'`); `runs=auto` picks runs whose every pair has dependency
M[i, j] < `threshold` (`meshc.ffn_deps`), measured on `calibration` (a text or token-id file) or,
without it, on the Program's example inputs.

Structure comes from the graph: FFN sub-layers from the residual stream, in- and out-projections
as the linears of the body (ins read the norm, the one out reads the ins), the gain as the norm's
last multiply by a 1-d parameter (RMSNorm) or `aten.layer_norm`'s weight and bias. FFNs of a run
must have the same form (same ops; widths may differ only through the weights); the first one
is the template of the wide FFN. Fused weights are named after the first block's with the layer
segment spanning the run (`model.layers.1-2.mlp.gate_proj.weight`), so a checkpoint of a fused
model loads by name into the same pipeline run on the original config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from meshc.errors import MeshcError, NodeError
from meshc.passes.attention_removal import stamp_layers
from meshc.passes.dce import dce
from meshc.passes.graph_params import add_parameter, drop_unused_state, erase_unused, refresh_values
from meshc.passes.layer_select import select_runs
from meshc.passes.residual_stream import SHAPE_ONLY, ResidualStream, _unshaped, find_residual_stream
from meshc.pipeline import register_pass
from meshc.plan import LINEAR_OPS, linear_weight
from meshc.program import Program

aten = torch.ops.aten


@dataclass
class FFN:
    """One FFN sub-layer found in the graph."""

    k: int  # sub-layer index in the residual stream (1-based)
    order: list[fx.Node]  # its body in graph order (h_k last)
    gain_node: fx.Node  # RMSNorm's `g * n(x)` or the aten.layer_norm node
    gain: fx.Node  # the gain parameter placeholder
    shift: fx.Node | None  # LayerNorm's bias placeholder
    ins: list[fx.Node]  # in-projections (read the norm), graph order
    out: fx.Node  # the out-projection


def analyse_ffn(program: Program, stream: ResidualStream, k: int) -> FFN:
    """The parts of FFN sub-layer k, or a NodeError saying which part is missing."""
    body = stream.body(k)
    order = [n for n in program.graph.nodes if n in body]
    h = stream.hs[k - 1]
    linears = [n for n in order if linear_weight(n) is not None]
    ancestors = {n: _reachable(n, body, forward=False) for n in linears}
    ins = [n for n in linears if not any(m in ancestors[n] for m in linears)]
    outs = [n for n in linears if n not in ins]
    if not ins or len(outs) != 1 or any(m not in ancestors[outs[0]] for m in ins):
        raise NodeError(h, f"sub-layer {k} is not an FFN of in-projections -> activation -> one out-projection: "
                           f"its linears are {[n.name for n in linears]}; ffn_fusion fuses only such FFNs")
    reads = {_unshaped(n.args[LINEAR_OPS[n.target][0]]) for n in ins}
    if len(reads) != 1:
        raise NodeError(ins[-1], f"the in-projections of sub-layer {k} read different values "
                                 f"({sorted(r.name for r in reads)}), not one normalized stream")
    norm = reads.pop()
    if norm.target is aten.layer_norm.default and isinstance(norm.args[2], fx.Node):
        shift = norm.args[3] if len(norm.args) > 3 and isinstance(norm.args[3], fx.Node) else None
        return FFN(k, order, norm, norm.args[2], shift, ins, outs[0])
    if norm.target is aten.mul.Tensor:
        gains = [a for a in norm.args if isinstance(a, fx.Node) and a.op == "placeholder"
                 and a.meta.get("meshc_input") == "parameter" and a.meta["val"].dim() == 1]
        if len(gains) == 1:
            return FFN(k, order, norm, gains[0], None, ins, outs[0])
    raise NodeError(norm, f"the norm of FFN sub-layer {k} does not end in a gain ffn_fusion can fold: RMSNorm's "
                          f"`weight * normalized` (a 1-d parameter) or aten.layer_norm with a weight")


def _reachable(node: fx.Node, within: set[fx.Node], forward: bool) -> set[fx.Node]:
    """Nodes of `within` reached from `node` through inputs (forward=False) or users, by paths
    that stay inside `within`."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in (n.users if forward else n.all_input_nodes):
            if a in within and a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def ffn_sublayers(stream: ResidualStream, grouped: list[list[int]], layer: int) -> list[int]:
    return [k for k in grouped[layer] if not stream.attends(k)]


def resolve_runs(stream: ResidualStream, grouped: list[list[int]], runs: str) -> list[list[int]]:
    """Layer runs -> runs of consecutive FFN sub-layer indices; errors say what is in the way."""
    out = []
    for run in select_runs(runs, len(grouped), option="runs"):
        if len(run) < 2:
            raise MeshcError(f"ffn_fusion: runs={runs!r}: the run of layer {run[0]} alone has nothing to fuse; "
                             f"a run names two or more consecutive layers (i-j)")
        ks = []
        for layer in run:
            ffns = ffn_sublayers(stream, grouped, layer)
            if len(ffns) != 1:
                raise MeshcError(f"ffn_fusion: decoder layer {layer} has {len(ffns)} FFN sub-layers "
                                 f"({ffns or 'none: it was fused into an earlier run or is one parallel block'}); "
                                 f"a run takes one FFN from each of its layers")
            ks.append(ffns[0])
        for a, b in zip(ks, ks[1:]):
            if b != a + 1:
                between = [layer for layer, subs in enumerate(grouped) if set(subs) & set(range(a + 1, b))]
                raise MeshcError(f"ffn_fusion: runs={runs!r}: sub-layers {list(range(a + 1, b))} (the attention of "
                                 f"layer(s) {between}) lie between the FFNs of the run; remove them first with "
                                 f"attention_removal(layers={','.join(map(str, between))})")
        out.append(ks)
    return out


def _signature(ffn: FFN, stream: ResidualStream) -> list[tuple]:
    """The FFN's ops with their non-weight arguments, positions instead of node names."""
    pos = {n: i for i, n in enumerate(ffn.order)}
    x = stream.xs[ffn.k - 1]

    def norm(a):
        if isinstance(a, fx.Node):
            if a in pos:
                return ("#", pos[a])
            if a is x:
                return "x"
            return "param" if a.op == "placeholder" and a.meta.get("meshc_input") == "parameter" else a.name
        if isinstance(a, (list, tuple)):
            return tuple(norm(b) for b in a)
        return a

    return [(n.target, norm(n.args), norm(tuple(sorted(n.kwargs.items())))) for n in ffn.order]


def _fused_name(fqns: list[str]) -> str:
    """'model.layers.1.mlp.up_proj.weight' .. 'model.layers.3...' -> 'model.layers.1-3.mlp.up_proj.weight'."""
    first, last = fqns[0].split("."), fqns[-1].split(".")
    if len(first) != len(last) or first == last:
        return f"ffn_fusion.{len(fqns)}." + fqns[0]
    return ".".join(a if a == b else f"{a}-{b}" for a, b in zip(first, last))


def _bias_of(node: fx.Node) -> fx.Node | None:
    if node.target is aten.addmm.default:
        return node.args[0]
    if node.target is aten.linear.default:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return None


def _folded(program: Program, lin: fx.Node, ffn: FFN) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An in-projection's weight with the norm gain folded into its input columns, and its bias
    (plus W @ shift for LayerNorm)."""
    _, w_idx, out_dim = LINEAR_OPS[lin.target]
    w = program.state[lin.args[w_idx].name]
    g = program.state[ffn.gain.name]
    in_dim = 1 - out_dim
    folded = w * (g[None, :] if in_dim == 1 else g[:, None])
    bias = _bias_of(lin)
    b = program.state[bias.name] if isinstance(bias, fx.Node) else None
    if ffn.shift is not None:
        s = program.state[ffn.shift.name]
        extra = w @ s if in_dim == 1 else s @ w
        b = extra if b is None else b + extra
    return folded, b


def check_same_form(stream: ResidualStream, ffns: list[FFN]) -> None:
    """A NodeError at the first op where an FFN of the run differs from the first one."""
    t = ffns[0]
    sig = _signature(t, stream)
    for f in ffns[1:]:
        other = _signature(f, stream)
        if other != sig:
            at = next((i for i, (a, b) in enumerate(zip(sig, other)) if a != b), min(len(sig), len(other)) - 1)
            raise NodeError(f.order[at], f"FFN sub-layer {f.k} differs in form from sub-layer {t.k} here (ops or "
                                         f"sizes); ffn_fusion fuses only FFNs of the same form")
    if t.out.target is aten.mm.default or any(i.target is aten.mm.default for i in t.ins):
        if t.shift is not None or any(_bias_of(i) is not None for f in ffns for i in f.ins):
            raise NodeError(t.out, "ffn_fusion: a bias-free aten.mm projection cannot take a folded bias")


def fuse_run(program: Program, stream: ResidualStream, ffns: list[FFN], layers: tuple[int, ...],
             x_in: fx.Node) -> fx.Node:
    """Replace the run `ffns` (reading the stream value `x_in`) by one wide FFN; returns the new
    residual add."""
    graph, t = program.graph, ffns[0]
    width = [f.ins[0].meta["val"].shape[-1] for f in ffns]
    total = sum(width)
    env: dict[fx.Node, fx.Node] = {stream.xs[t.k - 1]: x_in}
    new_params: dict[fx.Node, fx.Node] = {}  # template placeholder -> fused placeholder
    new_bias: dict[fx.Node, fx.Node] = {}  # template linear -> its fused bias placeholder (linear without one)

    def param(tensor, fqns, like):
        return add_parameter(program, _fused_name(fqns), tensor.contiguous(), like)

    for p, lin in enumerate(t.ins):
        _, w_idx, out_dim = LINEAR_OPS[lin.target]
        parts = [_folded(program, f.ins[p], f) for f in ffns]
        fqns = [f.ins[p].args[w_idx].meta["meshc_name"] for f in ffns]
        new_params[lin.args[w_idx]] = param(torch.cat([w for w, _ in parts], dim=out_dim), fqns, lin.args[w_idx])
        if any(b is not None for _, b in parts):
            b = torch.cat([b if b is not None else w.new_zeros(w.shape[out_dim]) for w, b in parts])
            bias = _bias_of(lin)
            names = [n.replace(".weight", ".bias") if n.endswith(".weight") else n + ".bias" for n in fqns]
            fused = param(b, names, bias if isinstance(bias, fx.Node) else lin.args[w_idx])
            if isinstance(bias, fx.Node):
                new_params[bias] = fused
            else:
                new_bias[lin] = fused
    _, w_idx, out_dim = LINEAR_OPS[t.out.target]
    ws = [program.state[f.out.args[w_idx].name] for f in ffns]
    fqns = [f.out.args[w_idx].meta["meshc_name"] for f in ffns]
    new_params[t.out.args[w_idx]] = param(torch.cat(ws, dim=1 - out_dim), fqns, t.out.args[w_idx])
    if isinstance(_bias_of(t.out), fx.Node):
        bs = [program.state[_bias_of(f.out).name] for f in ffns]
        new_params[_bias_of(t.out)] = param(sum(bs[1:], bs[0].clone()), [_bias_of(f.out).meta["meshc_name"]
                                                                         for f in ffns], _bias_of(t.out))
    order = set(t.order)
    inner = set().union(*(_reachable(i, order, forward=True) for i in t.ins)) - {t.out}
    last_add = stream.adds[ffns[-1].k - 1]
    with graph.inserting_before(last_add):
        for node in t.order:
            if node is t.gain_node and node.target is aten.mul.Tensor:
                env[node] = env.get(_other(node, t.gain), _other(node, t.gain))  # drop the gain: folded
                continue

            def arg(a, node=node):
                if a in env:
                    return env[a]
                if a in new_params:
                    return new_params[a]
                if node in inner and node.target in SHAPE_ONLY and a == width[0] and not isinstance(a, bool):
                    return total  # a view to the intermediate width: the run's width now
                return a

            new = graph.node_copy(node, lambda a: arg(a))
            new.args = tuple(_map_ints(a, arg) for a in new.args)
            if node is t.gain_node:  # aten.layer_norm: weight and bias folded into the projections
                new.args = (*new.args[:2], None, None, *new.args[4:])
            if node in new_bias:
                new.args = (*new.args[:2], new_bias[node])
            new.meta["meshc_pass"] = "ffn_fusion"
            new.meta.pop("val", None)
            env[node] = new
        fused_add = graph.call_function(aten.add.Tensor, (x_in, env[stream.hs[t.k - 1]]))
    fused_add.meta.update({k: v for k, v in last_add.meta.items() if k != "val"})
    fused_add.meta.update(meshc_pass="ffn_fusion", meshc_layer=layers)
    last_add.replace_all_uses_with(fused_add)
    return fused_add


def _other(mul: fx.Node, gain: fx.Node):
    return next(a for a in mul.args if a is not gain)


def _map_ints(a, fn):
    if isinstance(a, (list, tuple)):
        return type(a)(_map_ints(b, fn) for b in a)
    return fn(a) if isinstance(a, int) else a



@register_pass("ffn_fusion", preserves_semantics=False,
               description="runs of consecutive FFNs become one wide FFN computed in parallel (x + sum_i FFN_i(x))")
def ffn_fusion(program: Program, *, runs: str = "auto", threshold: float = 0.1, calibration: str = "") -> Program:
    program = dce(program)  # export's asserts would keep removed nodes alive
    stream = find_residual_stream(program)
    grouped = stamp_layers(stream)
    if runs.strip() == "auto":
        from meshc.ffn_deps import auto_runs

        chosen_layers, why = auto_runs(program, stream, grouped, threshold, calibration or None)
        program.notes.append(f"ffn_fusion: runs=auto (threshold {threshold}): {why}")
    else:
        chosen_layers = None
    sub_runs = resolve_runs(stream, grouped, runs) if chosen_layers is None else [
        [ffn_sublayers(stream, grouped, layer)[0] for layer in run] for run in chosen_layers]
    layer_of = {k: layer for layer, subs in enumerate(grouped) for k in subs}
    analysed = [[analyse_ffn(program, stream, k) for k in ks] for ks in sub_runs]
    n_ffn = sum(1 for subs in grouped for k in subs if not stream.attends(k))
    for ffns in analysed:
        check_same_form(stream, ffns)
    replaced: dict[fx.Node, fx.Node] = {}  # a fused run's old last add -> its new add (the next run's input)
    with torch.no_grad():
        for ffns in analysed:
            x_in = stream.xs[ffns[0].k - 1]
            new = fuse_run(program, stream, ffns, tuple(layer_of[f.k] for f in ffns), replaced.get(x_in, x_in))
            replaced[stream.adds[ffns[-1].k - 1]] = new
    erase_unused(program, set().union(*(f.order for ffns in analysed for f in ffns))
                 | {stream.adds[f.k - 1] for ffns in analysed for f in ffns})
    program.graph.eliminate_dead_code()
    dropped = drop_unused_state(program)
    refresh_values(program)
    program.gm.recompile()
    desc = ", ".join(f"layers {[layer_of[f.k] for f in ffns]}" for ffns in analysed) or "nothing"
    program.notes.append(f"ffn_fusion: fused {desc} into {len(analysed)} wide FFN(s); FFNs {n_ffn} -> "
                         f"{n_ffn - sum(len(r) - 1 for r in analysed)}; {len(dropped)} weights replaced")
    return program
