"""Lower a Program to generated Triton kernels: regions -> source -> kernels -> a new FX graph.

Entry point: `lower_program(program, interpret) -> LoweredProgram`, a callable on the flat user
inputs (like every backend's result) that also carries the kernels (`.kernels`, each with its
name, FX nodes, source lines and source text), the ATen fallbacks with reasons (`.fallbacks`)
and the lowered graph (`.gm`, printable: each region is one `call_function` to its kernel's
launcher). A region whose kernel cannot be generated stays ATen and its reason is recorded;
collectives, views and other ops are copied as they are, except that `view` becomes `reshape`
(a kernel writes contiguous outputs where eager's layout may differ, e.g. SDPA's; the graph is
functional, so a copy instead of an alias changes nothing). The input Program is never mutated.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from meshc.program import Program, source_line

from . import attention, matmul, rowwise
from .codegen import kernel_name
from .loader import load_kernel
from .regions import Region, select_regions

#: region kind -> template: generate(region, name, interpret) -> (source, launcher factory, input nodes)
TEMPLATES = {"pointwise": rowwise.generate, "reduction": rowwise.generate,
             "matmul": matmul.generate, "attention": attention.generate}

#: side-effect-free ATen ops removed when a kernel no longer needs their result
DEAD_IF_UNUSED = {torch.ops.aten.clone.default, torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default,
                  torch.ops.aten.slice.Tensor, torch.ops.aten.reshape.default}

#: views are lowered as reshapes: a kernel's output is contiguous where eager's may be strided
RESHAPE_FOR = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


@dataclass
class Kernel:
    name: str
    kind: str
    nodes: list[str]
    source_lines: list[str]
    reads: list[str]
    writes: list[str]
    source: str


@dataclass
class LoweredProgram:
    gm: fx.GraphModule
    state: list[torch.Tensor]
    kernels: list[Kernel] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    interpret: bool = False

    def __call__(self, flat_inputs: list) -> tuple:
        return self.gm(*self.state, *flat_inputs)

    def summary(self) -> str:
        mode = "Triton interpreter (TRITON_INTERPRET=1, CPU)" if self.interpret else "Triton JIT (GPU)"
        return (f"triton backend: {len(self.kernels)} generated kernels, {len(self.fallbacks)} ops left to ATen "
                f"with a reason; running on the {mode}")


def _launcher_fn(name: str, launch: Callable, interpret: bool) -> Callable:
    def fn(*args):
        if not interpret:
            return launch(*args)
        import numpy  # the interpreter's array library

        with numpy.errstate(all="ignore"):  # masked-off lanes compute garbage (exp overflow, 0/0), never stored
            return launch(*args)

    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = "kernels"
    return fn


def _region_io(region: Region, inputs: list[fx.Node]) -> tuple[list[str], list[str]]:
    def show(n: fx.Node) -> str:
        val = n.meta.get("val")
        shape = f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}" if isinstance(val, torch.Tensor) else ""
        return f"%{n.name} {shape}"

    return [show(n) for n in inputs], [show(n) for n in region.outputs()]


def lower_program(program: Program, interpret: bool, load: Callable = load_kernel) -> LoweredProgram:
    """`load(name, source, interpret)` makes the kernel object (tests may wrap it)."""
    prog = program.clone()
    graph = prog.graph
    selection = select_regions(graph)
    fallbacks = [(n.name, reason) for n, reason in selection.fallbacks]
    built: dict[int, tuple[Region, Callable, list[fx.Node]]] = {}
    kernels: list[Kernel] = []
    for region in selection.regions:
        name = kernel_name(region, len(kernels))
        try:
            source, make_launcher, inputs = TEMPLATES[region.kind](region, name, interpret)
            kernel = load(name, source, interpret)
        except Exception as e:  # noqa: BLE001 - the region stays ATen; the reason is reported
            for n in region.nodes:
                fallbacks.append((n.name, f"{region.kind} kernel not generated: {type(e).__name__}: {e}"))
            continue
        built[id(region)] = (region, _launcher_fn(name, make_launcher(kernel, interpret), interpret), inputs)
        reads, writes = _region_io(region, inputs)
        kernels.append(Kernel(name, region.kind, [n.name for n in region.nodes],
                              list(dict.fromkeys(s for s in map(source_line, region.nodes) if s)),
                              reads, writes, source))
    gm = fx.GraphModule(prog.gm, _rebuild(graph, selection.region_of, built))
    return LoweredProgram(gm, program.state_args(), kernels, fallbacks, interpret)


def _rebuild(graph: fx.Graph, region_of: dict, built: dict) -> fx.Graph:
    """A new graph in which each built region is one call; units are ordered topologically,
    ties broken by original position (so ATen nodes keep their order around the kernels)."""
    order = {n: i for i, n in enumerate(graph.nodes)}

    def unit(n: fx.Node):
        r = region_of.get(n)
        return id(r) if r is not None and id(r) in built else n

    members: dict = {}
    for n in graph.nodes:
        members.setdefault(unit(n), []).append(n)
    deps = {u: {unit(a) for m in ns for a in m.all_input_nodes} - {u} for u, ns in members.items()}
    users: dict = {u: [] for u in members}
    for u, ds in deps.items():
        for d in ds:
            users[d].append(u)
    pending = {u: len(ds) for u, ds in deps.items()}
    key = {u: min(order[m] for m in ns) for u, ns in members.items()}
    heap = [(key[u], i, u) for i, u in enumerate(members) if pending[u] == 0]
    heapq.heapify(heap)
    tie = len(members)
    new, env, done = fx.Graph(), {}, 0
    while heap:
        _, _, u = heapq.heappop(heap)
        done += 1
        if isinstance(u, fx.Node):
            env[u] = new.node_copy(u, lambda a: env[a])
            if u.target in RESHAPE_FOR:
                env[u].target = torch.ops.aten.reshape.default
        else:
            region, fn, inputs = built[u]
            call = new.call_function(fn, tuple(env[a] for a in inputs))
            outs = region.outputs()
            call.meta = {"stack_trace": region.anchor.meta.get("stack_trace"), "meshc_pass": "lower_triton"}
            if len(outs) == 1:
                call.meta["val"] = outs[0].meta.get("val")
                env[outs[0]] = call
            else:
                for j, o in enumerate(outs):
                    env[o] = new.call_function(operator.getitem, (call, j))
                    env[o].meta = {"val": o.meta.get("val")}
        for v in users[u]:
            pending[v] -= 1
            if pending[v] == 0:
                tie += 1
                heapq.heappush(heap, (key[v], tie, v))
    if done < len(members):
        raise RuntimeError("internal error: the region graph has a cycle")
    for node in reversed(list(new.nodes)):  # copies a kernel made unnecessary (GQA's repeated K/V)
        if not node.users and node.op == "call_function" and node.target in DEAD_IF_UNUSED:
            new.erase_node(node)
    return new
