"""The per-rank training-step Program: forward, loss, backward and gradient reductions in one graph.

Entry point: `training_step_program(program, flat_inputs, target, loss_fn, instruments=()) ->
Program`. `program` is a trainable Program (`meshc.compile(..., training=True, zero=N)`: its
collectives differentiable, its parameters read through the zero pass's nodes). The step is traced
ahead of time (AOT autograd: `make_fx` on fake tensors, no process group needed) into one graph

    (state..., flat inputs..., target leaves...) -> (loss, gradient of every trained tensor...)

whose backward is the adjoint of the forward's collectives (`meshc.redistribute`), then the step
pipeline (`step_pipeline`: `bucket_gradients`, `lint`) runs on it through the PassManager, so
instruments, timings and `meshc show --training --after NAME` see it. `CompiledModel.train_step`
runs exactly this Program (`meshc.runtime.training`); `meshc show --training` prints it with
`causal_lm_loss`.

The loss is `loss_fn(output, target) / mesh.size` seeded for backward (the outputs' all-gather over
dp sums the dp copies; every tp rank seeds 1/tp); the returned loss is `loss_fn`'s. Forward and
loss run under autocast to the zero pass's `compute_dtype` (the backward outside it, as torch
advises). With the zero pass's `recompute` policy, saved-tensor hooks replace each saved gathered
parameter by how to gather it again (`_pack` / `_unpack`), so the backward gathers it anew.
The trained tensors (`trained_groups`) are the read trainable placeholders, a tied group once.
Never touches a process group; never runs the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from meshc.errors import MeshcError
from meshc.pass_manager import PassManager
from meshc.program import Program, trainable


def causal_lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits at position t against token t+1 of `target` (the input ids), as
    a Hugging Face causal LM computes it from `labels`; `meshc show --training` prints this loss."""
    logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
    if target.dtype.is_floating_point or logits.dim() != 3:
        raise MeshcError(f"the causal-LM loss needs logits [batch, seq, vocab] and token ids; got logits "
                         f"{list(logits.shape)} and a {target.dtype} target: the model is no causal LM. Call "
                         f"train_step with its own loss_fn (meshc show --training prints causal LMs only)")
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             target[:, 1:].reshape(-1))


def trained_groups(program: Program) -> list[list[int]]:
    """Indices into `program.state_args()` of each trained tensor: the read trainable placeholders,
    tied ones (one tensor object) in one group, in placeholder order."""
    groups: dict[int, list[int]] = {}
    for i, ph in enumerate(program.state_placeholders()):
        if trainable(ph) and ph.users:
            groups.setdefault(id(program.state[ph.name]), []).append(i)
    return list(groups.values())


def step_pipeline(program: Program) -> str:
    """The passes run on the step graph, options from the zero pass's record (`meta['meshc_zero']`)."""
    info = next((p.meta["meshc_zero"] for p in program.placeholders() if p.meta.get("meshc_zero")), {})
    mb = info.get("bucket_mb", 0)
    return (f"bucket_gradients(bucket_mb={mb:g})," if mb else "") + "lint"


def training_step_program(program: Program, flat_inputs: Sequence[Any], target: Any, loss_fn: Callable,
                          instruments: Sequence = ()) -> Program:
    """Trace the training step for inputs and a target of these shapes (values are not read) and
    run the step pipeline on it; the result's graph takes (state, flat inputs, target leaves)."""
    step = trace_training_step(program, flat_inputs, target, loss_fn)
    return PassManager(step_pipeline(program), instruments=instruments).run(step)


def trace_training_step(program: Program, flat_inputs: Sequence[Any], target: Any, loss_fn: Callable) -> Program:
    """The step graph as traced (before the step pipeline), as a Program sharing `program`'s state."""
    from torch.fx.experimental.proxy_tensor import make_fx

    if program.split is not None:
        raise MeshcError(f"mesh '{program.mesh}' has a pp dim: the pipeline runtime trains it stage by stage "
                         f"(PipelineModel.train_step), with no one training-step graph; show its stages with "
                         f"`meshc show MODEL --mesh {program.mesh} --after split_stages`")
    infos = [p.meta["meshc_zero"] for p in program.placeholders() if p.meta.get("meshc_zero")]
    if not infos:
        raise MeshcError(f"{program.model_name} was compiled for inference; compile with "
                         f"meshc.compile(..., training=True[, zero=N]) to trace its training step")
    dtype = getattr(torch, infos[0].get("compute_dtype", "float32"))
    recompute = infos[0].get("recompute", False)
    groups = trained_groups(program)
    state = program.state_args()
    target_leaves, target_spec = pytree.tree_flatten(target)
    n_state, n_in = len(state), len(flat_inputs)
    device = state[0].device.type if state else "cpu"

    def step(*args):
        state, flat = list(args[:n_state]), list(args[n_state:n_state + n_in])
        tgt = pytree.tree_unflatten(list(args[n_state + n_in:]), target_spec)
        hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack) if recompute else contextlib.nullcontext()
        mixed = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with torch.enable_grad(), hooks:
            leaves = []
            for group in groups:  # a tied group: one leaf read by every placeholder of the group
                leaves.append(state[group[0]].detach().requires_grad_(True))
                for i in group:
                    state[i] = leaves[-1]
            with mixed:
                out = program.unflatten_outputs(program.gm(*state, *flat))
                loss = loss_fn(out, tgt)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
                raise MeshcError(f"loss_fn must return a scalar tensor that depends on the output; got "
                                 f"{type(loss).__name__}{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
            grads = torch.autograd.grad(loss / program.mesh.size, leaves, allow_unused=True)
        return (loss.detach(), *[torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)])

    gm = make_fx(step, tracing_mode="fake")(*state, *flat_inputs, *target_leaves)
    _name_placeholders(gm, program, len(target_leaves))
    gm.recompile()
    step_program = replace(program, gm=gm, state=dict(program.state), history=list(program.history),
                           notes=list(program.notes), split=None,
                           out_spec=pytree.tree_flatten((0, [0] * len(groups)))[1])
    step_program.notes.append(f"training step: forward, {getattr(loss_fn, '__name__', 'loss_fn')}, backward of "
                              f"{len(groups)} trained tensors (AOT autograd)")
    return step_program


def _name_placeholders(gm: torch.fx.GraphModule, program: Program, n_target: int) -> None:
    """Give the traced placeholders the forward's names and meta; the target's are 'user' inputs."""
    forward = program.placeholders()
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if i < len(forward):
            node._rename(forward[i].name)
            node.target = forward[i].name
            val = node.meta.get("val")
            node.meta.update({k: v for k, v in forward[i].meta.items() if k.startswith("meshc_")})
            node.meta["val"] = val
        else:
            j = i - len(forward)
            node._rename(f"target_{j}" if n_target > 1 else "target")
            node.target = node.name
            node.meta.update(meshc_input="user", meshc_name=f"target[{j}]")


def _pack(t: torch.Tensor):
    """Saved for backward: a gathered parameter (or a view of one) becomes how to gather it again."""
    src = t._base if t._base is not None else t
    if not hasattr(src, "meshc_regather"):
        return t
    fn, args = src.meshc_regather
    return fn, args, t.size(), t.stride(), t.storage_offset() - src.storage_offset()


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    fn, args, size, stride, offset = packed
    return fn(*args).as_strided(size, stride, offset)
