"""Region selection: group a Program graph's nodes into fusible regions, each one future kernel.

Entry point: `select_regions(graph) -> Selection`. One pass over the nodes in order; each node
that a kernel can compute (`ops.classify`) joins a region of one of its inputs when it fits, or
starts its own:

- pointwise chains, and reductions over the last dim with their prologue and epilogue, share one
  iteration shape `F = [*lead, N]`: every value in the region has shape F ("full") or F with the
  last dim reduced ("row");
- a matmul starts a region whose epilogue takes pointwise nodes of the matmul's output shape
  (bias, activation, SwiGLU gating `silu(a) * b`, residual add);
- attention (SDPA) is a region of its own; a K/V that is grouped-query attention's repeated copy
  (`repeat_kv_source`) is read un-repeated, and its copy is left out;
- a node that joins one row-wise region and also reads another of the same shape merges the two
  (GPT-2's GELU: `0.5 * x` and `x ** 3 ...` start apart and meet in the final product).

A join never makes the region graph cyclic (checked on the graph of regions), so the lowered
graph can place each region's kernel where all its inputs exist. Collectives, views and anything
else stay ATen nodes. This module never changes the graph; `lowering.py` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from . import ops


def sym_shape(node: fx.Node) -> tuple | None:
    """The node's shape as ints and sympy expressions (comparable without guards), or None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else sympy.sympify(d.node.expr) for d in val.shape)


@dataclass(eq=False)  # identity: regions are dict keys
class Region:
    kind: str  # 'pointwise' | 'reduction' | 'matmul' | 'attention'
    anchor: fx.Node
    shape: tuple  # the iteration shape F
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def row_shape(self) -> tuple:
        return (*self.shape[:-1], 1)

    def inputs(self) -> list[fx.Node]:
        """External tensor inputs, in first-use order."""
        members, seen = set(self.nodes), {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in members:
                    seen.setdefault(a, None)
        return list(seen)

    def outputs(self) -> list[fx.Node]:
        """Members used outside the region (or by the graph output)."""
        members = set(self.nodes)
        return [n for n in self.nodes if any(u not in members for u in n.users)]


@dataclass
class Selection:
    regions: list[Region]
    fallbacks: list[tuple[fx.Node, str]]  # nodes a kernel could take, left to ATen, and why
    region_of: dict[fx.Node, Region]


def value_kind(region: Region, node: fx.Node) -> str:
    """'full' if `node`'s shape (right-aligned) spans F's last dim, else 'row'."""
    shape = sym_shape(node)
    n = region.shape[-1]
    if node.target in ops.REDUCTIONS and len(shape) < len(region.shape) and node in region.nodes:
        return "row"  # a reduction without keepdim
    if n == 1 or (shape and shape[-1] != 1):
        return "full"
    return "row"


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def _shape_fits(region: Region, node: fx.Node, kind: str) -> bool:
    shape = sym_shape(node)
    if shape is None or len(region.shape) == 0:
        return False
    if kind == "reduction":
        src = sym_shape(node.args[0])
        ok_out = shape in (region.shape, region.row_shape, region.shape[:-1])
        return region.kind != "matmul" and src == region.shape and ok_out
    if region.kind == "matmul":
        allowed = (region.shape,)
    else:
        allowed = (region.shape, region.row_shape)
    if shape not in allowed:
        return False
    # an input must broadcast to F; a reduced value without keepdim cannot be used inside
    for a in node.all_input_nodes:
        a_shape = sym_shape(a)
        if a_shape is None or not _broadcasts_to(a_shape, region.shape):
            return False
        if a_shape == region.shape[:-1] and region.shape[:-1] != region.row_shape:
            return False
    return True


class _RegionGraph:
    """Cycle check on the graph whose units are regions and single nodes."""

    def __init__(self, region_of: dict[fx.Node, Region], order: dict[fx.Node, int]):
        self.region_of, self.order = region_of, order

    def depends_on(self, node: fx.Node, region: Region) -> bool:
        """Does `node` (outside `region`) transitively need a member of `region`?"""
        stack, seen = [node], set()
        members = set(region.nodes)
        first = min(self.order[m] for m in members)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in members:
                return True
            unit = self.region_of.get(n)
            if unit is None and self.order[n] < first:
                continue  # a single node before the region's first member cannot need it
            stack.extend(a for m in (unit.nodes if unit else [n]) for a in m.all_input_nodes)
        return False


def _feeds_reduction(node: fx.Node) -> bool:
    return any(ops.classify(u)[0] == "reduction" for u in node.users)


def _can_join(region: Region, node: fx.Node, kind: str, graph: _RegionGraph) -> bool:
    if region.kind == "attention" or not _shape_fits(region, node, kind):
        return False
    if region.kind == "matmul" and _feeds_reduction(node):
        return False  # leave a reduction's prologue (RMSNorm's x*x) to the reduction kernel
    members = set(region.nodes)
    return not any(graph.depends_on(a, region) for a in node.all_input_nodes if a not in members)


def _can_merge(region: Region, other: Region, graph: _RegionGraph) -> bool:
    """Two row-wise regions of one iteration shape merge when neither needs the other through a
    node outside both (that would make the region graph cyclic)."""
    rowwise = ("pointwise", "reduction")
    if region.kind not in rowwise or other.kind not in rowwise or region.shape != other.shape:
        return False
    for a, b in ((region, other), (other, region)):
        members = set(a.nodes) | set(b.nodes)
        if any(graph.depends_on(x, b) for x in a.inputs() if x not in members):
            return False
    return True


def _is_noop_slice(node: fx.Node) -> bool:
    if node.target is not torch.ops.aten.slice.Tensor or len(node.args) < 4:
        return False
    return node.args[2] in (0, None) and isinstance(node.args[3], int) and node.args[3] >= 2**62


def repeat_kv_source(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """If `node` is grouped-query attention's repeated K or V — `x[:, :, None].expand(b, h, g, s, d)`
    copied and viewed as `[b, h*g, s, d]` (Hugging Face's `repeat_kv`) — return `(x, chain)`: the
    attention kernel reads x with head h // g instead, and the copy (chain) is not needed."""
    chain, n = [], node
    steps = [({torch.ops.aten._unsafe_view.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default},),
             ({torch.ops.aten.clone.default},), ({torch.ops.aten.expand.default},)]
    for (targets,) in steps:
        if n.op != "call_function" or n.target not in targets or len(n.users) != 1:
            return None
        chain.append(n)
        n = n.args[0]
        while isinstance(n, fx.Node) and _is_noop_slice(n) and len(n.users) == 1:
            chain.append(n)
            n = n.args[0]
    if not isinstance(n, fx.Node) or n.target is not torch.ops.aten.unsqueeze.default or n.args[1] != 2:
        return None
    chain.append(n)
    base = n.args[0]
    while isinstance(base, fx.Node) and _is_noop_slice(base):
        base = base.args[0]
    shape = sym_shape(base) if isinstance(base, fx.Node) else None
    return (base, chain) if shape is not None and len(shape) == 4 else None


def select_regions(graph: fx.Graph) -> Selection:
    regions: list[Region] = []
    region_of: dict[fx.Node, Region] = {}
    fallbacks: list[tuple[fx.Node, str]] = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    rgraph = _RegionGraph(region_of, order)
    absorbed = {c for n in graph.nodes if n.target in ops.ATTENTION_OPS for kv in n.args[1:3]
                if isinstance(kv, fx.Node) and (found := repeat_kv_source(kv)) for c in found[1]}
    for node in graph.nodes:
        if node in absorbed:
            continue  # a repeated K/V copy the attention kernel does not need
        kind, reason = ops.classify(node)
        if kind is None:
            if reason:
                fallbacks.append((node, reason))
            continue
        shape = sym_shape(node)
        if kind in ("matmul", "attention"):
            region = Region(kind, node, shape)
        else:
            producers = list(dict.fromkeys(region_of[a] for a in node.all_input_nodes if a in region_of))
            region = next((r for r in producers if _can_join(r, node, kind, rgraph)), None)
            for other in producers:  # a node joining two row-wise regions merges them
                if region is not None and other is not region and _can_merge(region, other, rgraph):
                    for n in other.nodes:
                        region_of[n] = region
                    region.nodes = sorted(region.nodes + other.nodes, key=order.__getitem__)
                    region.kind = "reduction" if "reduction" in (region.kind, other.kind) else region.kind
                    regions.remove(other)
            if region is None:
                f = sym_shape(node.args[0]) if kind == "reduction" else shape
                if not f or (kind == "pointwise" and not _shape_fits(Region(kind, node, f), node, kind)):
                    fallbacks.append((node, f"shape {shape} does not fit a generated kernel"))
                    continue
                region = Region(kind, node, f)
            elif kind == "reduction" and region.kind == "pointwise":
                region.kind = "reduction"
        if not region.nodes:
            regions.append(region)
        region.nodes.append(node)
        region_of[node] = region
    return Selection(regions, fallbacks, region_of)
