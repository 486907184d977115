"""Capture: nn.Module + example inputs → Program.

Entry point: `capture(model, example_inputs, example_kwargs=None, dynamic_shapes=None)`.

The main path is `torch.export` (non-strict) lowered to the ATen inference IR with no extra
decompositions (`aten.linear` and `aten.scaled_dot_product_attention` stay whole, which is the
level auto-sharding reasons at); `meshc.inference_ir` lowers by a local rewrite where that is exact
and takes torch's `run_decompositions({})` elsewhere. Modules torch.export cannot take for reasons other than the
user's own code fall back to `make_fx` over a functional call, with a warning naming the reason.
Data-dependent control flow and KV-cache outputs get a `CaptureError` that says what to do.
A model built on 'meta' gets its non-persistent buffers recomputed on CPU (`meta_buffers.py`), so
`meshc.load_checkpoint` has to read only what checkpoints hold. Capture never mutates the model.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from meshc.errors import CaptureError
from meshc.inference_ir import to_inference_ir
from meshc.mesh import MeshSpec
from meshc.meta_buffers import rebuild_meta_buffers
from meshc.program import Program
from torch.export import Dim
from torch.export.graph_signature import InputKind

_KIND = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
    InputKind.USER_INPUT: "user",
}


def capture(
    model: torch.nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    dynamic_shapes: Any = None,
    mesh: Any = None,
    input_writes: bool = False,
    reuse_blocks: Any = "auto",
) -> Program:
    """Trace `model` on the example inputs into a Program.

    dynamic_shapes: None (all sizes static), "auto" (every dim of every tensor input may vary;
    torch.export keeps static what the model forces static), or torch.export's own format.
    input_writes: the model may write its tensor inputs in place (a KV cache given as inputs); the
    writes stay in the graph as in-place ops on those placeholders (`_inplace_input_writes`).
    reuse_blocks: "auto" (default), True or False: trace two of a run of identical decoder blocks
    and copy the second for the others (`meshc.capture_blocks`; same graph, much faster at depth).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"meshc captures torch.nn.Module instances; got {type(model).__name__}")
    if example_inputs is None and not example_kwargs:
        raise CaptureError(
            f"no example inputs for {type(model).__name__}: meshc traces the model by running it "
            f"once. Pass example_inputs=(tensor, ...) (e.g. token ids of shape [batch, seq])."
        )
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    args = () if example_inputs is None else args
    kwargs = dict(example_kwargs or {})
    if not input_writes:
        _reject_kv_cache(model, kwargs)
    if reuse_blocks and not input_writes:
        from meshc.capture_blocks import capture_reusing_blocks

        reused = capture_reusing_blocks(model, args, kwargs, dynamic_shapes, mesh, force=reuse_blocks is True)
        if reused is not None:
            return reused
    shapes = _auto_dynamic(model, args, kwargs) if dynamic_shapes == "auto" else dynamic_shapes
    try:
        gm, state, kinds, names, out_spec = _export(model, args, kwargs, shapes, input_writes)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - classified below
        if _is_user_code_error(e):
            raise _data_dependent_error(model, e) from e
        warnings.warn(
            f"torch.export could not capture {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); falling back to make_fx with static shapes.",
            stacklevel=2,
        )
        gm, state, kinds, names, out_spec = _make_fx(model, args, kwargs)
    flat_paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path((args, kwargs))[0]]
    user_names = [_pretty_path(p) for p in flat_paths]
    user_iter = iter(user_names)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        node.meta["meshc_input"] = kinds[node.name]
        node.meta["meshc_name"] = names.get(node.name) or next(user_iter)
    if any(t.is_meta for t in state.values()):
        _retarget_meta_factories(gm, args, kwargs)
        rebuild_meta_buffers(model, state, names)  # what no checkpoint holds (rotary inv_freq, ...)
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    return Program(
        gm=gm,
        state=state,
        in_spec=pytree.tree_flatten((args, kwargs))[1],
        out_spec=out_spec,
        mesh=MeshSpec.parse(mesh),
        signature=signature,
        example_inputs=(args, kwargs),
        model_name=type(model).__name__,
    )


def _retarget_meta_factories(gm, args, kwargs) -> None:
    """A model built on 'meta' (weights loaded later, e.g. by meshc.load_checkpoint) bakes
    device='meta' into factory calls such as position-id aranges. Retarget them, and the state's
    recorded values, to the device of the inputs, then recompute every node's value."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    meta = torch.device("meta")
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.kwargs.get("device") == meta:
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    for node, val in zip(placeholders, vals):
        if isinstance(val, torch.Tensor) and val.device == meta:
            with mode:
                node.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)
    with enable_python_dispatcher():  # as torch.export traces (see passes/propagate_shapes.py)
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*[n.meta.get("val") for n in placeholders])


def _export(model, args, kwargs, shapes, input_writes=False):
    with warnings.catch_warnings():  # torch-internal deprecation noise from pytree, not the user's
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)
        ep = to_inference_ir(ep)  # run_decompositions({}) without its second trace where that is exact
    sig = ep.graph_signature
    originals = dict(model.named_parameters(remove_duplicate=False))
    originals.update(model.named_buffers(remove_duplicate=False))
    state, kinds, names = {}, {}, {}
    for spec in sig.input_specs:
        name = spec.arg.name if hasattr(spec.arg, "name") else str(spec.arg)
        kinds[name] = _KIND.get(spec.kind, "user")
        if spec.kind == InputKind.USER_INPUT:
            continue
        names[name] = spec.target
        if spec.kind == InputKind.CONSTANT_TENSOR:
            state[name] = ep.constants[spec.target]
        else:  # the model's own tensor object, so tied weights stay one tensor
            state[name] = originals.get(spec.target, ep.state_dict.get(spec.target))
    gm = ep.graph_module
    if any(isinstance(m, fx.GraphModule) for m in gm.children()):
        raise CaptureError(
            f"{type(model).__name__} captured with control-flow submodules "
            f"({[n for n, _ in gm.named_children()]}); meshc needs a flat graph. Remove "
            f"torch.cond / while_loop from forward, or file the model as an example."
        )
    if input_writes:
        _inplace_input_writes(gm, sig)
    else:
        _check_outputs(gm, sig)
    return gm, state, kinds, names, ep.call_spec.out_spec


def _check_outputs(gm: fx.GraphModule, sig) -> None:
    mutations = [s for s in sig.output_specs if s.kind.name not in ("USER_OUTPUT",)]
    if mutations:
        raise CaptureError(
            "the model mutates its buffers or inputs in forward "
            f"({[s.target for s in mutations]}); meshc compiles pure forwards. Move the update "
            "out of forward (e.g. KV-cache writes) or run the model without it."
        )


def _inplace_input_writes(gm: fx.GraphModule, sig) -> None:
    """torch.export returns a user input's in-place update as an extra output (the functional
    `index_copy` of it). Put the write back in place: `index_copy` of the placeholder becomes
    `index_copy_` (no copy of the whole tensor), anything else a final `copy_`; the extra outputs go."""
    writes = {s.arg.name: s.target for s in sig.output_specs if s.kind.name == "USER_INPUT_MUTATION"}
    others = [s for s in sig.output_specs if s.kind.name not in ("USER_OUTPUT", "USER_INPUT_MUTATION")]
    if others:
        raise CaptureError(f"the model mutates its buffers in forward ({[s.target for s in others]}); "
                           f"meshc keeps only writes to tensor inputs (a KV cache passed as inputs).")
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    kept = []
    for value in output.args[0]:
        if not isinstance(value, fx.Node) or value.name not in writes:
            kept.append(value)
            continue
        target = placeholders[writes[value.name]]
        if value.target is torch.ops.aten.index_copy.default and value.args[0] is target:
            readers = [u for u in target.users if order[u] > order[value] and u.op != "output"]
            if readers:
                raise CaptureError(f"input {target.name} is read ({readers[0].name}) besides being written "
                                   f"in place by {value.name}; meshc cannot keep that write in place.")
            value.target = torch.ops.aten.index_copy_.default
        else:
            with gm.graph.inserting_before(output):
                copy = gm.graph.call_function(torch.ops.aten.copy_.default, (target, value))
            copy.meta = dict(value.meta)
    output.args = (tuple(kept),)
    gm.recompile()


def _make_fx(model, args, kwargs):
    """Fallback: trace a functional call with parameters and buffers as explicit inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    named = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    names = list(named) + list(buffers)
    tensors = [*named.values(), *buffers.values()]
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    out_spec_box = []

    def fn(*flat_all):
        state = dict(zip(names, flat_all[: len(names)]))
        a, k = pytree.tree_unflatten(list(flat_all[len(names):]), in_spec)
        out = torch.func.functional_call(model, state, a, k)
        leaves, spec = pytree.tree_flatten(out)
        out_spec_box.append(spec)
        return tuple(leaves)

    with torch.no_grad():
        gm = make_fx(fn, tracing_mode="fake", pre_dispatch=False)(*tensors, *flat)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state, kinds, fqns = {}, {}, {}
    for node, fqn, t in zip(placeholders, names, tensors):
        state[node.name] = t
        kinds[node.name] = "parameter" if fqn in named else "buffer"
        fqns[node.name] = fqn
    for node in placeholders[len(names):]:
        kinds[node.name] = "user"
    return gm, state, kinds, fqns, out_spec_box[-1]


def _auto_dynamic(model, args, kwargs):
    """dynamic_shapes='auto': every dim of every tensor input is Dim.AUTO, others None."""

    def spec(x):
        return {d: Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) and x.dim() else None

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    arg_specs = [pytree.tree_map(spec, a) for a in args]
    if len(params) >= len(args) and not any(inspect.Parameter.VAR_POSITIONAL == p.kind
                                            for p in inspect.signature(model.forward).parameters.values()):
        out = dict(zip(params, arg_specs))
        out.update({k: pytree.tree_map(spec, v) for k, v in kwargs.items()})
        return out
    return (tuple(arg_specs), {k: pytree.tree_map(spec, v) for k, v in kwargs.items()})


def _reject_kv_cache(model, kwargs) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) and "use_cache" not in kwargs and "past_key_values" not in kwargs:
        raise CaptureError(
            f"{type(model).__name__} is a Hugging Face model with use_cache=True (the default), so "
            f"its forward returns a KV cache object that meshc does not compile. Pass "
            f"example_kwargs={{'use_cache': False}} (compile(..., example_kwargs={{'use_cache': False}})); "
            f"the compiled model then returns the logits and may be called as model(ids)."
        )


def _is_user_code_error(e: Exception) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"GuardOnDataDependentSymNode", "UserError", "ConstraintViolationError"}) or (
        "data-dependent" in str(e)
    )


_CALL_SITE = re.compile(r'The following call raised this error:\n\s*File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)')


def _data_dependent_error(model, e: Exception) -> CaptureError:
    text = str(e)
    m = _CALL_SITE.search(text)
    where = f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}" if m else "unknown line"
    first = text.strip().splitlines()[0][:300]
    if "data-dependent" in text or "DataDependent" in type(e).__name__:
        hint = (
            "Python control flow on a tensor's value (e.g. `if x.sum() > 0:`) cannot be captured "
            "into one graph. Rewrite it with torch.where / torch.cond, or make the condition "
            "depend on shapes or Python values only."
        )
    else:
        hint = "Check the dynamic_shapes you passed, or pass dynamic_shapes=None for static sizes."
    return CaptureError(f"cannot capture {type(model).__name__}: {first}\n  at {where}\n  {hint}")


def _pretty_path(keystr: str) -> str:
    # pytree key paths of (args, kwargs) look like "[0][0]" / "[1]['use_cache']"
    m = re.match(r"\[(0|1)\](.*)", keystr)
    if not m:
        return keystr
    return ("args" if m.group(1) == "0" else "kwargs") + m.group(2)
