"""The Program: meshc's IR, a torch.fx GraphModule plus what FX lacks.

Entry point: `Program` (built by `meshc.capture`). Its graph is an ATen-level FX graph in
*lifted* form: parameters, buffers and constants are placeholders, followed by the flattened user
inputs, so a pass sees every tensor as a node and a rank can feed in its own shards. `state` maps
each state placeholder to its tensor; tied weights are two placeholders fed by one tensor object.

All meshc metadata keys are defined here and nowhere else (`META`). Keys torch already sets and
meshc relies on: `val` (FakeTensor or SymInt; sympy size symbols when dims are dynamic),
`tensor_meta`, `stack_trace`, `nn_module_stack`.

A Program is never mutated by a pass: the PassManager hands each pass a `clone()`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from meshc.errors import InputError
from meshc.mesh import MeshSpec
from meshc.placement import Shard

#: Every meshc node.meta key, with its meaning. Passes read and write only these (plus torch's).
META: dict[str, str] = {
    "meshc_input": "placeholders only: 'parameter' | 'buffer' | 'constant' | 'user' | 'recv' (a pipeline "
    "stage's input from the previous stage)",
    "meshc_name": "placeholders only: parameter/buffer FQN ('model.layers.0.mlp.up_proj.weight') "
    "or the user input's pytree path (\"args[0]\", \"kwargs['attention_mask']\")",
    "meshc_held": "user placeholders only: (batch dim, heads dim) of a tensor the runtime holds in its local "
    "shape and the graph writes in place (the KV cache); `meshc.plan.held_placements` places it",
    "meshc_unbatched": "user placeholders only: True for an input with no batch dim (decode's cache_position); "
    "a dp mesh dim replicates it instead of splitting its dim 0",
    "meshc_pass": "name of the pass that created or last rewrote this node",
    "meshc_placement": "tuple of DTensor placements (Shard(d) | Replicate() | Partial()), one per mesh dim",
    "meshc_stage": "pipeline stage index (int) this node runs in",
    "meshc_cost": "predicted cost of this node in seconds, from meshc's cost model",
    "meshc_layer": "residual adds only: the original model's 0-based decoder layer this sub-layer belongs to (a "
    "tuple for a fused run), stamped by passes that remove or fuse sub-layers so layers keep their numbers",
    "meshc_zero": "trainable placeholders only, set by the zero pass: {'stage', 'dp', 'shape' (the local "
    "parameter's), 'full' (stage 2: the placeholder of its full copy)}; stage >= 2: it holds a flat dp shard",
}

_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)')


def source_line(node: fx.Node) -> str | None:
    """The innermost user source line of `node` ('file.py:12 in forward: code'), skipping torch."""
    trace = node.meta.get("stack_trace") or ""
    frames = [f for f in _USER_FRAME.findall(trace) if "/torch/" not in f[0]]
    if not frames:
        return None
    path, line, fn, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} in {fn}: {code.strip()}"


def trainable(node: fx.Node) -> bool:
    """A floating-point parameter placeholder: what training updates."""
    val = node.meta.get("val")
    return (node.op == "placeholder" and node.meta.get("meshc_input") == "parameter"
            and isinstance(val, torch.Tensor) and val.is_floating_point())


def describe_node(node: fx.Node) -> str:
    """One line naming a node for an error: name, op, target, shape and user source line."""
    val = node.meta.get("val")
    shape = f" {_short_val(val)}" if val is not None else ""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    where = source_line(node)
    module = next(reversed(node.meta["nn_module_stack"].values()))[0] if node.meta.get("nn_module_stack") else None
    parts = [f"%{node.name} = {node.op}[{target}]{shape}"]
    if module:
        parts.append(f"module {module!r}")
    parts.append(f"source {where}" if where else "no source line recorded")
    return "; ".join(parts)


def _short_val(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
    return str(val)


@dataclass
class Program:
    """A captured model: graph, state, calling convention, mesh, and the example inputs."""

    gm: fx.GraphModule
    state: dict[str, torch.Tensor]  # placeholder name -> parameter/buffer/constant tensor
    in_spec: pytree.TreeSpec  # of (args, kwargs) as captured
    out_spec: pytree.TreeSpec  # of the model's output (e.g. CausalLMOutputWithPast)
    mesh: MeshSpec
    signature: inspect.Signature | None = None  # the model's forward signature, to bind calls
    example_inputs: tuple[tuple, dict] = ((), {})
    history: list[str] = field(default_factory=list)  # names of the passes applied, in order
    model_name: str = "model"
    rank: int = 0  # the global rank whose local program this is (meshes larger than one device)
    plan: Any = None  # sharding plan spec from compile(plan=...); a meshc.plan.Plan once partitioned
    notes: list[str] = field(default_factory=list)  # what passes report to the user (one line each)
    split: Any = None  # a pipelined Program's stages (meshc.stages.Split), set by the split_stages pass

    # ---- structure -------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def placeholders(self, kind: str | None = None) -> list[fx.Node]:
        """Placeholders in order, optionally only those of one `meshc_input` kind."""
        return [n for n in self.graph.nodes if n.op == "placeholder" and kind in (None, n.meta["meshc_input"])]

    def state_placeholders(self) -> list[fx.Node]:
        """The placeholders the Program's state feeds (not user inputs, not received values), in order."""
        return [n for n in self.placeholders() if n.meta["meshc_input"] not in ("user", "recv")]

    def fqn(self, placeholder_name: str) -> str:
        """The model-side name (`meshc_name`) of a placeholder, e.g. 'lm_head.weight'."""
        return next(n.meta["meshc_name"] for n in self.placeholders() if n.name == placeholder_name)

    def num_nodes(self) -> int:
        return len(self.graph.nodes)

    def tied_groups(self) -> list[list[str]]:
        """Groups of state placeholders fed by the same tensor (tied weights), e.g. GPT-2's
        embedding and lm_head."""
        by_id: dict[int, list[str]] = {}
        for name, t in self.state.items():
            by_id.setdefault(id(t), []).append(name)
        return [names for names in by_id.values() if len(names) > 1]

    def clone(self) -> Program:
        """A copy with its own graph (nodes and meta dicts copied); tensors are shared."""
        graph = fx.Graph()
        out = graph.graph_copy(self.graph, {})
        graph.output(out)
        for old, new in zip(self.graph.nodes, graph.nodes):
            new.meta = dict(old.meta)
        gm = fx.GraphModule(self.gm, graph)
        return replace(self, gm=gm, state=dict(self.state), history=list(self.history), notes=list(self.notes),
                       split=self.split.clone() if self.split is not None else None)

    def code(self) -> str:
        """The graph as runnable Python, annotated with shapes and user source lines; a pipelined
        Program prints each stage's graph (what each stage runs)."""
        if self.split is not None:
            return "\n".join(stage_code(self, st) for st in self.split.stages)
        return self.gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)

    def state_args(self) -> list[torch.Tensor]:
        """The state tensors in placeholder order: a graph takes them first, then its flat inputs."""
        return [self.state[n.name] for n in self.state_placeholders()]

    # ---- calling convention ----------------------------------------------------------------
    def bind_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        """Map a call's (args, kwargs) onto the flat user-input list the graph expects.

        Arguments are bound to the model's signature, so positional vs keyword does not matter;
        a captured non-tensor constant (e.g. `use_cache=False`) may be omitted, and is then the
        captured value. Anything else that differs from the capture is an `InputError`.
        """
        args, kwargs = self._normalize_call(args, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise InputError(
                f"the inputs' structure differs from the captured one.\n  captured: {self.in_spec}\n"
                f"  called with: {spec}\n  Call the compiled model the way the example inputs were "
                f"given, or compile again with example inputs of the new structure."
            )
        for node, value in zip(self.placeholders("user"), flat):
            _check_input(node, value)
            self._check_split(node, value)
        return flat

    def _check_split(self, node: fx.Node, value: Any) -> None:
        """An input this rank's graph splits over a mesh dim (a batch over dp: the plan's placement of
        the input) must divide evenly. A held input (the KV cache) comes as this rank's block already."""
        for_input = getattr(self.plan, "for_input", None)  # a meshc.plan.Plan once spmd_partition ran
        if for_input is None or "meshc_held" in node.meta:
            return
        for dim_name, n, p in zip(self.mesh.names, self.mesh.sizes, for_input(node.meta["meshc_name"])):
            if isinstance(p, Shard) and isinstance(value, torch.Tensor) and value.shape[p.dim] % n:
                d = p.dim
                raise InputError(f"input {node.meta['meshc_name']}: dim {d} of size {value.shape[d]} is split over "
                                 f"mesh dim '{dim_name}'={n} (mesh '{self.mesh}'), which does not divide it; pass a "
                                 f"size that is a multiple of {n}")

    def _normalize_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ex_args, ex_kwargs = self.example_inputs
        if self.signature is None:
            return tuple(args), dict(kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"cannot bind the call to {self.model_name}.forward{self.signature}: {e}") from None
        values, extra_args = {}, ()
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)  # forward(**kwargs): its keys are ordinary keyword inputs
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                extra_args = tuple(value)
            else:
                values[name] = value
        names = list(self.signature.parameters)
        new_args = tuple(values.pop(n) for n in names[: len(ex_args)] if n in values) + extra_args
        for key, captured in ex_kwargs.items():
            if key not in values and not isinstance(captured, torch.Tensor):
                values[key] = captured  # baked into the graph at capture; omitting it is fine
        extra = sorted(set(values) - set(ex_kwargs))
        if extra:
            raise InputError(
                f"argument(s) {extra} were not given at capture, so the compiled program has no "
                f"input for them. Pass them in example_kwargs when compiling."
            )
        return new_args, {k: values[k] for k in ex_kwargs if k in values}

    def unflatten_outputs(self, flat: Any) -> Any:
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Execute the graph eagerly (ATen, this process) with `state`; the reference semantics."""
        flat = self.bind_inputs(args, kwargs)
        return self.unflatten_outputs(self.gm(*self.state_args(), *flat))

    def run_example(self) -> Any:
        args, kwargs = self.example_inputs
        return self.run(*args, **kwargs)

    def to_module(self) -> ProgramModule:
        """An nn.Module running this Program whose parameters are the Program's parameter tensors
        (trainable, tied weights one Parameter): for fine-tuning a rewritten model ("healing")."""
        return ProgramModule(self)


def stage_code(program: Program, stage) -> str:
    """One stage's graph with a header saying where it runs and what crosses its boundaries."""
    rank = f" on pipeline rank {stage.index % program.mesh.pp}" if program.mesh.pp > 1 else ""
    recv = ", ".join(b.name for b in stage.recv) or "-"
    send = ", ".join(b.name for b in stage.send) or "the model outputs"
    head = f"# ---- stage {stage.index}{rank}: receives {recv}; sends {send}"
    return head + "\n" + stage.program.gm.print_readable(print_output=False, include_stride=False,
                                                          include_device=False, colored=False)


class ProgramModule(torch.nn.Module):
    """A Program as a trainable module: `state_dict()` keys are the model's own FQNs."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.tensors = torch.nn.ParameterDict()
        self._order: list[tuple[str, str]] = []  # (placeholder name, key in self.tensors)
        by_id: dict[int, str] = {}
        for node in program.placeholders():
            if node.meta["meshc_input"] == "user":
                continue
            t = program.state[node.name]
            key = by_id.setdefault(id(t), node.meta["meshc_name"].replace(".", "/"))
            if key not in self.tensors:
                trainable = node.meta["meshc_input"] == "parameter" and t.is_floating_point()
                self.tensors[key] = torch.nn.Parameter(t.detach().clone(), requires_grad=trainable)
            self._order.append((node.name, key))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.program.bind_inputs(args, kwargs)
        state = [self.tensors[key] for _, key in self._order]
        return self.program.unflatten_outputs(self.program.gm(*state, *flat))

    def export_state(self) -> dict[str, torch.Tensor]:
        """The current parameters under the model's FQNs (tied weights under each name); buffers,
        which training does not change, are left out (as in a Hugging Face checkpoint)."""
        kinds = {n.name: (n.meta["meshc_name"], n.meta["meshc_input"]) for n in self.program.placeholders()}
        return {kinds[ph][0]: self.tensors[key].detach() for ph, key in self._order if kinds[ph][1] == "parameter"}


def _check_input(node: fx.Node, value: Any) -> None:
    """Raise an InputError if `value` cannot be fed to placeholder `node` (dtype, rank, static dims)."""
    val = node.meta.get("val")
    where = node.meta["meshc_name"]
    if not isinstance(val, torch.Tensor):
        if isinstance(value, torch.Tensor) or (val is not None and value != val):
            raise InputError(f"input {where} was captured as the constant {val!r}; got {_short_val(value)}. "
                             f"Compile again with this value in the example inputs.")
        return
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input {where} must be a tensor like {_short_val(val)}; got {type(value).__name__}")
    if value.dtype != val.dtype or value.dim() != val.dim():
        raise InputError(f"input {where}: expected {_short_val(val)}, got {_short_val(value)}")
    for d, (want, got) in enumerate(zip(val.shape, value.shape)):
        if isinstance(want, int) and want != got:
            raise InputError(
                f"input {where}: dim {d} was captured static with size {want}, got {got}. Compile "
                f"with dynamic_shapes='auto' (the default of meshc.compile) or example inputs of this size."
            )
