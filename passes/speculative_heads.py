"""speculative_heads: Medusa heads beside lm_head, each predicting one more token ahead.

Entry point: the pass `speculative_heads(heads=4, layers=1, weights="")`. It finds the final
norm → lm_head in the graph (a linear whose weight is a parameter, whose output reaches a model
output through shape-only ops, and whose input is a normalised hidden state x — never by class or
module name) and adds `heads` heads reading the same x:

    head i:   h_0 = x;   h_{j+1} = h_j + SiLU(W_ij h_j)   (j < layers, W_ij zero-initialised)
              medusa_logits[i] = P_i h_layers              (P_i initialised as a copy of lm_head)

so at initialisation every head predicts what lm_head predicts (Medusa-1; head i is trained to
predict the token i+2 positions past x's, one past lm_head's). `weights` names a safetensors file
of trained heads (`MedusaHeads.state_dict()` keys; `examples/train_medusa.py` writes one).
The output gains `medusa_logits` [heads, batch, seq, vocab] (a Hugging Face output gets a subclass
with that field; a single-tensor output becomes {"logits", "medusa_logits"}); the base logits are
untouched — the pass declares `preserves_outputs=("logits",)` and `NumericCheck` compares exactly
those. On a mesh it runs after auto_shard and before spmd_partition (`pipeline_with_heads`): the
plan is resolved without the heads, then each head's projection gets lm_head's placement (the
blocks stay replicated), so spmd_partition shards it like lm_head.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from meshc.errors import MeshcError, NodeError
from meshc.pipeline import register_pass
from meshc.program import Program

aten = torch.ops.aten
PREFIX = "medusa_heads."  # placeholder FQNs: PREFIX + MedusaHeads.state_dict() key
_PASS = "speculative_heads"
_LINEAR = {aten.linear.default, aten.mm.default, aten.matmul.default}
_THROUGH = {aten.slice.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.alias.default, aten.clone.default, aten.contiguous.default}
_NORM_OPS = {aten.rsqrt.default, aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}


class MedusaHeads(torch.nn.ModuleList):
    """The heads as an eager module (training, reference): `forward(x [.., H]) -> [heads, .., V]`.
    The pass inserts exactly these ops; state_dict keys are '{i}.blocks.{j}.weight', '{i}.proj.weight'."""

    def __init__(self, lm_head_weight: torch.Tensor, heads: int = 4, layers: int = 1):
        vocab, hidden = lm_head_weight.shape
        super().__init__()
        for _ in range(heads):
            head = torch.nn.Module()
            head.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
            head.proj = torch.nn.Linear(hidden, vocab, bias=False)
            self.append(head)
        with torch.no_grad():
            for head in self:
                for block in head.blocks:
                    block.weight.zero_()
                head.proj.weight.copy_(lm_head_weight)
        self.to(lm_head_weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for head in self:
            h = x
            for block in head.blocks:
                h = h + torch.nn.functional.silu(block(h))
            out.append(head.proj(h))
        return torch.stack(out, 0)


def head_keys(heads: int, layers: int) -> list[str]:
    """MedusaHeads.state_dict() keys in the order the pass adds their placeholders."""
    return [k for i in range(heads) for k in [*(f"{i}.blocks.{j}.weight" for j in range(layers)), f"{i}.proj.weight"]]


@register_pass(_PASS, preserves_semantics=False, preserves_outputs=("logits",),
               description="Medusa heads beside lm_head: output medusa_logits [heads, batch, seq, vocab]")
def speculative_heads(program: Program, *, heads: int = 4, layers: int = 1, weights: str = "") -> Program:
    if heads < 1 or layers < 0:
        raise MeshcError(f"speculative_heads: heads must be >= 1 and layers >= 0; got heads={heads}, layers={layers}")
    if any(n.meta["meshc_name"].startswith(PREFIX) for n in program.placeholders("parameter")):
        raise MeshcError("speculative_heads: the program already has Medusa heads (the pass ran twice?)")
    lm_head, weight, _ = find_lm_head(program)
    plan = _resolved_plan(program)  # before the heads exist: they must not change the model's own plan
    x = lm_head.args[0]
    tensors = _head_tensors(program.state[weight.name], heads, layers, weights)
    graph = program.graph
    mode = weight.meta["val"].fake_mode
    last_state = program.state_placeholders()[-1]
    params: dict[str, fx.Node] = {}
    with graph.inserting_before(last_state.next):  # state placeholders come before the user inputs
        for key in head_keys(heads, layers):
            node = graph.placeholder("p_medusa_" + key.replace(".", "_"))
            node.meta.update(meshc_input="parameter", meshc_name=PREFIX + key, meshc_pass=_PASS,
                             val=mode.from_tensor(tensors[key]))
            program.state[node.name] = tensors[key]
            params[key] = node
    meta = {k: lm_head.meta[k] for k in ("stack_trace", "nn_module_stack") if k in lm_head.meta}

    def op(target, *args):
        node = graph.call_function(target, args)
        node.meta.update(meta, meshc_pass=_PASS)
        return node

    with graph.inserting_before(lm_head.next):
        outs = []
        for i in range(heads):
            h = x
            for j in range(layers):
                w = params[f"{i}.blocks.{j}.weight"]
                h = op(aten.add.Tensor, h, op(aten.silu.default, op(lm_head.target, h, w)))
            outs.append(op(lm_head.target, h, params[f"{i}.proj.weight"]))
        stacked = op(aten.stack.default, outs, 0)
    output = next(n for n in graph.nodes if n.op == "output")
    flat = list(output.args[0])
    output.args = ((*flat, stacked),)
    program.out_spec = _with_medusa_field(program.out_spec)
    if plan is not None:  # each head's projection placed like lm_head; the blocks replicated
        lm = plan.for_param(weight.meta["meshc_name"])
        plan.params.update({PREFIX + f"{i}.proj.weight": lm for i in range(heads)})
        program.plan = plan
    program.gm.recompile()
    _fill_vals(program)
    program.notes.append(f"speculative_heads: {heads} Medusa head(s) of {layers} residual block(s) beside "
                         f"%{lm_head.name} ({weight.meta['meshc_name']}), "
                         f"{'weights from ' + weights if weights else 'initialised from lm_head'}")
    return program


def _resolved_plan(program: Program):
    """A copy of the sharding Plan of a Program on a mesh (None on one device or without a plan)."""
    if program.mesh.size <= 1 or program.plan is None:
        return None
    if program.plan == "auto":
        raise MeshcError(f"{_PASS} runs after auto_shard on a mesh (auto_shard sizes the plan for the model; the "
                         f"heads then take lm_head's placement): put it between auto_shard and spmd_partition, "
                         f"e.g. 'dce,auto_shard,{_PASS},spmd_partition,lint' (see pipeline_with_heads)")
    from meshc.plan import make_plan

    plan = make_plan(program.plan, program, program.mesh)
    return dataclasses.replace(plan, params=dict(plan.params), inputs=dict(plan.inputs))


def pipeline_with_heads(pipeline: str, options: str = "") -> str:
    """`pipeline` (e.g. `meshc.pipeline.resolve(...).pipeline`) with the pass added where it belongs:
    right before spmd_partition on a mesh (after auto_shard), else right after dce (or first)."""
    call = f"{_PASS}({options})" if options else _PASS
    parts = [p.strip() for p in pipeline.split(",") if p.strip()] if "(" not in pipeline else None
    if parts is None:
        raise MeshcError(f"pipeline_with_heads takes a pipeline of pass names without options; got {pipeline!r}")
    if "spmd_partition" in parts:
        at = parts.index("spmd_partition")
    else:
        at = parts.index("dce") + 1 if "dce" in parts else 0
    return ",".join([*parts[:at], call, *parts[at:]])


def trained_heads_file(model: str) -> Path:
    """The shipped Medusa heads of a built-in model (only reference-lm has trained heads)."""
    if model != "reference-lm":
        raise MeshcError(f"{model} has no trained Medusa heads, so it cannot speculate; meshc ships heads for "
                         f"reference-lm (examples/train_medusa.py trains them)")
    from meshc.reference_lm import PACKAGE_DIR

    return PACKAGE_DIR / "medusa_heads.safetensors"


def heads_pipeline(weights: str | Path, mesh: object = None, plan: object = "auto") -> str:
    """The pipeline that compiles a model with the trained heads in `weights` on `mesh`: meshc's
    default pipeline for (mesh, plan) with this pass, its heads/layers read from the file."""
    from meshc.pipeline import resolve

    path = Path(weights)
    if not path.is_file():
        raise MeshcError(f"no trained Medusa heads at {path}: speculative decoding needs heads trained for this "
                         f"model (examples/train_medusa.py writes them for reference-lm)")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    heads = sum(k.endswith(".proj.weight") for k in keys)
    layers = sum(k.startswith("0.blocks.") for k in keys)
    return pipeline_with_heads(resolve(mesh, "default", plan).pipeline, f"heads={heads},layers={layers},weights={path}")


def find_lm_head(program: Program) -> tuple[fx.Node, fx.Node, int]:
    """(lm_head linear node, its weight placeholder, index of the flat output it produces): a linear
    with a parameter weight [vocab, hidden] reaching an output through shape-only ops, whose input
    is a normalised hidden state. Raises a NodeError naming what was found instead."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    found, why = [], None
    for index, leaf in enumerate(output.args[0]):
        node = leaf
        while isinstance(node, fx.Node) and node.target in _THROUGH:
            node = node.args[0]
        if not isinstance(node, fx.Node) or node.target not in _LINEAR:
            continue
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "placeholder"
                and weight.meta.get("meshc_input") == "parameter" and weight.meta["val"].dim() == 2):
            why = why or NodeError(node, f"{_PASS}: this linear produces output {index}, but its weight is not a "
                                         f"[vocab, hidden] parameter, so it is not an lm_head the pass can copy")
            continue
        if not _is_normalised(node.args[0]):
            why = why or NodeError(node, f"{_PASS}: this linear produces output {index}, but its input is not a "
                                         f"normalised hidden state (no norm within a few ops): no final norm → "
                                         f"lm_head to attach Medusa heads to")
            continue
        found.append((node, weight, index))
    if len(found) == 1:
        return found[0]
    if found:
        raise NodeError(found[1][0], f"{_PASS}: more than one final norm → lm_head reaches the outputs "
                                     f"({', '.join('%' + f[0].name for f in found)}); cannot tell which to extend")
    if why is not None:
        raise why
    raise MeshcError(f"{_PASS}: no output of {program.model_name} is produced by a linear layer (an lm_head); "
                     f"Medusa heads need a causal LM whose output logits come from final norm → linear")


def _is_normalised(node: fx.Node, depth: int = 4) -> bool:
    while node.target in _THROUGH:  # logits_to_keep slices the normalised state
        node = node.args[0]
    frontier = [node]
    for _ in range(depth):
        if any(n.target in _NORM_OPS or (n.target is operator.getitem and n.args[0].target in _NORM_OPS)
               for n in frontier if n.op == "call_function"):
            return True
        frontier = [a for n in frontier if n.target not in _LINEAR for a in n.all_input_nodes]
    return False


def _head_tensors(lm_head: torch.Tensor, heads: int, layers: int, weights: str) -> dict[str, torch.Tensor]:
    """Initial head tensors (W = 0, P = lm_head), or the trained ones from `weights`, checked."""
    keys = head_keys(heads, layers)
    if not weights:
        module = MedusaHeads(lm_head.detach(), heads, layers)
        return {k: v.detach() for k, v in module.state_dict().items()}
    path = Path(weights)
    if not path.is_file():
        raise MeshcError(f"{_PASS}: weights file {path} does not exist; train heads with "
                         f"examples/train_medusa.py or leave weights empty for untrained heads")
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    if sorted(loaded) != sorted(keys):
        raise MeshcError(f"{_PASS}: {path} holds heads {sorted(loaded)[:3]}..., not heads={heads}, layers={layers} "
                         f"({len(keys)} tensors); pass the heads/layers the file was trained with")
    vocab, hidden = lm_head.shape
    for k in keys:
        want = (hidden, hidden) if ".blocks." in k else (vocab, hidden)
        if tuple(loaded[k].shape) != want:
            raise MeshcError(f"{_PASS}: {path}: {k} has shape {list(loaded[k].shape)}, but this model's lm_head "
                             f"needs {list(want)}; the heads were trained for another model")
    return {k: loaded[k].to(lm_head.dtype) for k in keys}


def _fill_vals(program: Program) -> None:
    from meshc.passes.propagate_shapes import fake_values

    values = fake_values(program)
    for node in program.graph.nodes:
        if node.meta.get("meshc_pass") == _PASS and node.op == "call_function":
            node.meta["val"] = values[node.name]


def _with_medusa_field(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """The output spec with `medusa_logits` added as the last flat output."""
    if spec.is_leaf():
        return pytree.tree_structure({"logits": 0, "medusa_logits": 0})
    out = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    from transformers.utils import ModelOutput

    if isinstance(out, ModelOutput):
        return pytree.tree_structure(_output_type(type(out))(**dict(out), medusa_logits=spec.num_leaves))
    if isinstance(out, dict) and "medusa_logits" not in out:
        return pytree.tree_structure({**out, "medusa_logits": spec.num_leaves})
    raise MeshcError(f"{_PASS}: the model returns {spec.type.__name__}; Medusa heads add a field to a Hugging "
                     f"Face output, a dict or a single logits tensor")


@functools.cache
def _output_type(base: type) -> type:
    """`base` (a ModelOutput dataclass) with a `medusa_logits` field after its own."""
    ns = {"__annotations__": {"medusa_logits": "torch.FloatTensor | None"}, "medusa_logits": None,
          "__module__": __name__, "__qualname__": f"Medusa{base.__name__}"}
    cls = dataclasses.dataclass(type(f"Medusa{base.__name__}", (base,), ns))
    globals()[cls.__qualname__] = cls  # importable by name (pickling, repr)
    return cls
