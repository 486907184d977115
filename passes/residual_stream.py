"""Find the residual stream of a pre-norm decoder from the graph alone (no module names).

Entry point: `find_residual_stream(program) -> ResidualStream`. A *residual add* is an
`aten.add.Tensor(x, h)` whose output has x's shape and where `x` is an ancestor of `h` (the
sub-layer h = F(Norm(x)) reads the stream it is added to). Residual adds chained through their
`x` argument form streams; the longest is the model's residual stream:

    x_0 -> add_1 = x_0 + h_1(x_0) -> add_2 = add_1 + h_2(add_1) -> ... -> x_2L

Sub-layer k (1-based) is `h_k`; its *body* is every node between the stream value it reads and
`h_k`. Sub-layers group into transformer layers (`layers()`): a layer starts at each sub-layer
that attends (SDPA, or a softmax over a product of two activations) and takes the sub-layers after
it that do not, unless a pass stamped the adds with their original layers (`meshc_layer`). A
sequential block is (attention, MLP); a parallel block (GPT-J, GPT-NeoX, Falcon: attention and MLP
read the same stream, one residual add) is one sub-layer. Used by
ladder_residual and pipeline_partition (and by FFN fusion to find consecutive sub-layers).

A post-norm decoder (x_k = Norm(x_{k-1} + F(x_{k-1}))) has no residual stream: each add feeds a
norm, not the next add. The error names that norm node and its source line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from meshc.errors import MeshcError, NodeError
from meshc.program import Program

aten = torch.ops.aten


@dataclass
class ResidualStream:
    xs: list[fx.Node]  # x_0..x_n: x_k (k < n) is what sub-layer k+1 reads and adds to; x_n = adds[-1]
    adds: list[fx.Node]  # the residual add of each sub-layer
    hs: list[fx.Node]  # the sub-layer outputs h_1..h_n added into the stream

    def __len__(self) -> int:
        return len(self.adds)

    def body(self, k: int) -> set[fx.Node]:
        """Nodes of sub-layer k (1-based) that depend on x_{k-1} and feed h_k (h_k included)."""
        return _between(self.xs[k - 1], self.hs[k - 1])

    def attends(self, k: int) -> bool:
        """Whether sub-layer k mixes positions (attention) rather than acting on each one (MLP)."""
        return any(_is_attention(n) for n in self.body(k))

    def layers(self) -> list[list[int]]:
        """Sub-layers (1-based) grouped into transformer layers, e.g. [[1, 2], [3, 4]] for two
        sequential blocks, [[1], [2]] for two parallel ones. Without any attention (a residual MLP
        stack) every sub-layer is a layer. A residual add a pass stamped with `meshc_layer` (the
        original model's layer, or a tuple of layers for a fused run) keeps that number, so a
        layer whose attention was removed keeps its place; a layer fused into the one before it
        is an empty list."""
        out: list[list[int]] = []
        for k in range(1, len(self) + 1):
            tag = self.adds[k - 1].meta.get("meshc_layer")
            tags = tag if isinstance(tag, tuple) else (tag,)
            if tag is not None:
                while len(out) <= max(tags):
                    out.append([])
                out[tags[0]].append(k)
            elif not out or self.attends(k):
                out.append([k])
            else:
                out[-1].append(k)
        return out


_ATTENTION = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default}
_SOFTMAX = {aten._softmax.default, aten.softmax.int}
_PRODUCTS = {aten.bmm.default, aten.baddbmm.default, aten.matmul.default}


def _is_attention(node: fx.Node) -> bool:
    """SDPA, or a softmax with a product of two activations (q @ k^T) among its close inputs."""
    if node.target in _ATTENTION:
        return True
    if node.target not in _SOFTMAX:
        return False
    frontier, seen = [node], set()
    for _ in range(6):  # softmax(scale * (q @ k^T) + bias): a few ops back at most
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen and a.op == "call_function"]
        seen.update(frontier)
        if any(a.target in _PRODUCTS and not any(x.op == "placeholder" for x in a.all_input_nodes)
               for a in frontier):
            return True
    return False


def _ancestors(node: fx.Node, stop: set[fx.Node] | None = None) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                if not stop or a not in stop:
                    stack.append(a)
    return seen


def _between(src: fx.Node, dst: fx.Node) -> set[fx.Node]:
    """Nodes on some path src -> dst (excluding src, including dst)."""
    up = _ancestors(dst) | {dst}
    out, stack = set(), [src]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in up and u not in out:
                out.add(u)
                stack.append(u)
    return out


def _residual_pair(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, h) if `node` is x + h with x an ancestor of h and the output shaped like x."""
    if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    for x, h in ((a, b), (b, a)):
        xv, ov = x.meta.get("val"), node.meta.get("val")
        if not (isinstance(xv, torch.Tensor) and isinstance(ov, torch.Tensor)):
            continue
        if str(xv.shape) == str(ov.shape) and x in _ancestors(h):
            return x, h
    return None


def find_residual_stream(program: Program, min_length: int = 2) -> ResidualStream:
    """The longest chain of residual adds. Raises a NodeError naming where the longest chain
    broke if it has fewer than `min_length` sub-layers."""
    pairs = {n: p for n in program.graph.nodes if (p := _residual_pair(n)) is not None}
    best: list[fx.Node] = []
    for start in pairs:
        if _unshaped(pairs[start][0]) in pairs:  # not the head of a chain
            continue
        chain = [start]
        while True:
            reach = _reshaped(chain[-1])
            nxt = [u for r in reach for u in r.users if u in pairs and pairs[u][0] in reach]
            if len(nxt) > 1:  # a block whose inner adds (x + attn) feed its own final sum: continue there
                nxt = [u for u in nxt if all(v is u or v in _ancestors(u) for v in nxt)]
            if len(nxt) != 1:
                break
            chain.append(nxt[0])
        if len(chain) > len(best):
            best = chain
    if len(best) < min_length:
        if not best:
            raise MeshcError("no residual add (x + F(x) with matching shapes) in the graph: this is not a "
                             "residual network, so there is no residual stream to rewire")
        last = best[-1]
        if (between := _post_norm(last, pairs)) is not None:
            raise NodeError(between, f"post-norm block: the residual add %{last.name} feeds this node, and its "
                                     f"output (not the sum) is what the next sub-layer reads and adds to "
                                     f"(x_k = Norm(x_(k-1) + F(x_(k-1)))), so no un-normalized residual stream runs "
                                     f"through the model. Rewrites of the residual stream need pre-norm blocks "
                                     f"(x_k = x_(k-1) + F(Norm(x_(k-1)))).")
        users = ", ".join(f"%{u.name}" for u in last.users) or "nothing"
        raise NodeError(last, f"the residual stream has only {len(best)} sub-layer(s): after this add the "
                              f"stream goes to {users}, and none of them is `stream + F(stream)`")
    xs = [pairs[a][0] for a in best] + [best[-1]]
    return ResidualStream(xs=xs, adds=best, hs=[pairs[a][1] for a in best])


#: Ops that only change how the stream is shaped (OPT flattens it to [tokens, hidden] for its MLP):
#: the stream passes through them between residual adds.
SHAPE_ONLY = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _reshaped(node: fx.Node) -> set[fx.Node]:
    """`node` and every node reached from it through shape-only ops."""
    out, stack = {node}, [node]
    while stack:
        for u in stack.pop().users:
            if u.target in SHAPE_ONLY and u not in out:
                out.add(u)
                stack.append(u)
    return out


def _unshaped(node: fx.Node) -> fx.Node:
    """The value `node` is a (chain of) shape-only op(s) of, or `node` itself."""
    while node.target in SHAPE_ONLY and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _post_norm(add: fx.Node, pairs: dict[fx.Node, tuple[fx.Node, fx.Node]], depth: int = 12) -> fx.Node | None:
    """The node after residual `add` that the next residual add reads as its stream (x), if the
    stream passes through other nodes (a norm) between the two adds; None otherwise."""
    stream_inputs = {x for x, _ in pairs.values()}
    frontier, seen = [add], {add}
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u not in seen and u not in pairs]
        seen.update(frontier)
        hit = next((u for u in frontier if u in stream_inputs), None)
        if hit is not None:
            return _unshaped(hit)
    return None
