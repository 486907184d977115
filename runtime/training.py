"""Training a compiled model on any mesh meshc runs (one device, dp, tp, dp x tp), with ZeRO 0-3.

Entry point: `Trainer(compiled)`, which `CompiledModel`'s methods from the mixin `Trains`
(`train_step`, `make_optimizer`, `clip_grad_norm_`) create on first use:

    model = meshc.compile(model, mesh, example_inputs=(ids,), training=True, zero=3)
    opt = model.make_optimizer(torch.optim.AdamW, lr=1e-3)   # a torch optimizer over this rank's shards
    loss = model.train_step((ids,), target, loss_fn)         # the whole batch on every rank
    opt.step(); opt.zero_grad()

How it runs. The Program arrives with its collectives differentiable (`differentiable_collectives`)
and every trainable parameter read through a `zero_param` node (the `zero` pass, which records in
`meta['meshc_zero']` what each placeholder holds). Here the trained tensors (`meshc.training_step.
trained_groups`) become the slots' leaves. On first use per input shapes, target shapes and
loss_fn (`_function_key`: a function's code, defaults and closure values), the compiler traces
the step into one per-rank training-step Program (`meshc.training_step.training_step_program`:
forward, loss, backward with the collectives' adjoints, the dp gradient reductions bucketed by
the `bucket_gradients` pass; what `meshc show --training` prints); `train_step` runs it through
the aten backend without autograd (the graph holds the backward) and adds each returned gradient
to `.grad` of its slot's leaf, so calling it N times before `opt.step()` is gradient accumulation.

The optimizer is the given torch class over what this rank updates: the parameters (zero=0), a
flat dp block of each (zero=1: a view into the parameter, its gradient sliced from the
all-reduced one before the step; zero=2/3: the leaves themselves, at zero=2 views into the full
copy). After the step, zero=1/2 all-gather the updated blocks in one bucket into the full
parameters the next forward reads. `clip_grad_norm_` uses the global norm: squares summed over
every rank, each counted once however many ranks hold it.

Never rewrites a graph; every collective names a group the runtime bound (`MeshSpec.group_name`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from meshc.backends import lower
from meshc.errors import MeshcError
from meshc.mesh import DP
from meshc.placement import Replicate
from meshc.redistribute import c10d, flat_block, flat_shard, pad_flat
from meshc.training_step import trained_groups, training_step_program


def _signature(values: list) -> tuple:
    """What a traced step specializes on: tensor shapes and dtypes, other values themselves."""
    return tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in values)


def _function_key(fn) -> Any:
    """What a traced loss_fn specializes on: a Python function's code, defaults and closure values
    (a closure made anew each step with the same values is the same step), else the object."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn
    cells = tuple(c.cell_contents for c in fn.__closure__ or ())
    key = (code, fn.__defaults__, tuple(sorted((fn.__kwdefaults__ or {}).items())), cells)
    try:
        hash(key)
    except TypeError:
        return fn
    return key


@torch.no_grad()
def gather_blocks(pairs: list[tuple[torch.Tensor, torch.Tensor]], n: int, group) -> None:
    """(this rank's updated flat block, the full tensor) pairs: one all-gather over the `n` dp
    ranks of `group` (a bucket laid out n x padded blocks) writes every full tensor."""
    sizes = [flat_shard(full.numel(), n)[1] for _, full in pairs]
    bucket = torch.cat([pad_flat(block.detach(), size) for (block, _), size in zip(pairs, sizes)])
    c = c10d()
    gathered = c.wait_tensor(c.all_gather_into_tensor(bucket, n, group)).view(n, -1)
    offset = 0
    for (_, full), size in zip(pairs, sizes):
        full.copy_(gathered[:, offset:offset + size].reshape(-1)[:full.numel()].view(full.shape))
        offset += size


def zero_held(program, node, local: torch.Tensor, blocks: dict) -> dict[str, torch.Tensor]:
    """Placeholder -> tensor for a trainable placeholder whose full (tp-local) value `local` was
    just loaded, held as the zero pass holds it (`meta['meshc_zero']`): zero=0/1 the tensor
    itself; zero=2 this rank's flat dp block, a view into the full copy ('<name>_full'); zero=3
    the padded block alone. `blocks` (key -> block) keeps tied placeholders on one tensor."""
    info = node.meta.get("meshc_zero")
    if not info or info["stage"] < 2:
        return {node.name: local}
    key = id(local)
    if key not in blocks:
        blocks[key] = flat_block(local, info["dp"], program.mesh.coord(program.rank, DP), view=info["stage"] == 2)
    return {node.name: blocks[key], **({info["full"]: local} if info["stage"] == 2 else {})}


class Trains:
    """CompiledModel's training methods (compile with training=True, zero=N); they delegate to a
    `Trainer` made on first use."""

    @property
    def trainer(self) -> Trainer:
        if getattr(self, "_trainer", None) is None:
            self._trainer = Trainer(self)
        return self._trainer

    def train_step(self, inputs: Any, target: Any, loss_fn, kwargs: dict | None = None) -> torch.Tensor:
        """Forward + backward of `loss_fn(output, target)` on the whole batch (every rank passes
        it); returns the loss, accumulates this rank's gradient shards (like `loss.backward()`)."""
        return self.trainer.train_step(inputs, target, loss_fn, kwargs)

    def make_optimizer(self, cls: type, **options: Any) -> torch.optim.Optimizer:
        """A `cls` optimizer over this rank's shards; its step includes the stage's all-gathers."""
        return self.trainer.make_optimizer(cls, **options)

    def training_program(self, inputs: Any, target: Any, loss_fn, kwargs: dict | None = None):
        """The per-rank training-step Program (forward + loss + backward, collectives included) that
        train_step runs for inputs and a target of these shapes; print its `.code()`."""
        return self.trainer.training_program(inputs, target, loss_fn, kwargs)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm over every shard; returns the norm before clipping."""
        return self.trainer.clip_grad_norm_(max_norm)

    def save_sharded(self, folder, optimizer=None) -> None:
        """Every rank writes its shards (and `optimizer`'s); see `meshc.runtime.train_checkpoint`."""
        from meshc.runtime.train_checkpoint import save_sharded

        save_sharded(self, optimizer, folder)

    def load_sharded(self, folder, optimizer=None) -> None:
        """Resume from `save_sharded` files written on any dp size or ZeRO stage."""
        from meshc.runtime.train_checkpoint import load_sharded

        load_sharded(self, optimizer, folder)


@dataclass
class Slot:
    """One trainable tensor (tied placeholders share one): what autograd fills (`leaf`), what the
    optimizer updates (`shard`), what the forward reads after a step (`full`, zero=1/2)."""

    fqn: str
    leaf: torch.Tensor
    shard: torch.Tensor
    full: torch.Tensor | None
    shape: tuple
    replicas: int  # ranks holding the same gradient values (Replicate dims, dp below stage 2)


class Trainer:
    def __init__(self, compiled):
        program = compiled.program
        state_nodes = program.state_placeholders()
        groups = [[state_nodes[i] for i in g] for g in trained_groups(program)]
        infos = [g[0].meta.get("meshc_zero") for g in groups]
        if not infos or any(i is None for i in infos):
            raise MeshcError(f"{program.model_name} was compiled for inference; compile with "
                             f"meshc.compile(..., training=True[, zero=N]) to call train_step or make_optimizer")
        if compiled.backend != "aten":
            raise MeshcError(f"train_step runs on the aten backend only: the {compiled.backend} backend has no "
                             f"backward kernels. Compile with backend='aten' (or 'auto' on a CPU) to train.")
        self.compiled, self.program, mesh = compiled, program, program.mesh
        self.stage, self.dp = infos[0]["stage"], mesh.dp
        self._programs: dict = {}  # (input, target signatures, loss_fn) -> the step Program
        self._runs: dict = {}  # id(step Program) -> (ids of the state it binds, the lowered callable)
        self.dp_coord = mesh.coord(program.rank, DP)
        self.dp_group = mesh.group_name(DP) if self.dp > 1 else None
        self.slots: list[Slot] = []
        for group in groups:  # a tied group: one leaf for every placeholder
            leaf = torch.nn.Parameter(program.state[group[0].name].detach(), requires_grad=True)
            self.slots.append(self._slot(group[0], leaf, mesh))
            for ph in group:
                program.state[ph.name] = leaf
        compiled.rebind()

    def _slot(self, ph, leaf, mesh) -> Slot:
        info = ph.meta["meshc_zero"]
        pls = ph.meta.get("meshc_placement") or ()
        dp_i = mesh.index(DP)
        replicas = math.prod(n for i, (p, n) in enumerate(zip(pls, mesh.sizes))
                             if isinstance(p, Replicate) and (i != dp_i or self.stage < 2))
        shard, full = leaf, None
        if self.stage == 1:  # a view into the parameter: the update lands in it, no second copy
            shard = torch.nn.Parameter(self._flat_slice(leaf.detach()))
            full = leaf
        elif self.stage == 2:
            full = self.program.state[info["full"]]
        return Slot(self.program.fqn(ph.name), leaf, shard, full, tuple(info["shape"]), replicas)

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, inputs: Any, target: Any, loss_fn, kwargs: dict | None = None) -> torch.Tensor:
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        flat = self.program.bind_inputs(args, kwargs or {})  # checks a batch dp splits divides
        run = self._lowered(self._step_program(flat, target, loss_fn))
        with torch.no_grad():  # the graph holds the backward: no autograd around it
            loss, *grads = run([*flat, *torch.utils._pytree.tree_leaves(target)])
        for s, g in zip(self.slots, grads):
            s.leaf.grad = g if s.leaf.grad is None else s.leaf.grad + g
        return loss

    def training_program(self, inputs: Any, target: Any, loss_fn, kwargs: dict | None = None):
        """The training-step Program train_step runs for inputs and a target of these shapes."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return self._step_program(self.program.bind_inputs(args, kwargs or {}), target, loss_fn)

    def _step_program(self, flat: list, target: Any, loss_fn):
        """Made by the compiler once per input shapes, target shapes and loss_fn."""
        key = (_signature(flat), _signature(torch.utils._pytree.tree_leaves(target)), _function_key(loss_fn))
        if key not in self._programs:
            self._programs[key] = training_step_program(self.program, flat, target, loss_fn)
        return self._programs[key]

    def _lowered(self, step):
        """The step Program through the aten backend, its state bound; lowered again when the
        model's state tensors were replaced (a checkpoint load), as `CompiledModel.rebind` does."""
        ids = [id(t) for t in self.program.state_args()]
        bound = self._runs.get(id(step))
        if bound is None or bound[0] != ids:
            step.state = dict(self.program.state)
            bound = self._runs[id(step)] = (ids, lower(step, "aten")[0])
        return bound[1]

    # ---- optimizer ------------------------------------------------------------------------------
    def make_optimizer(self, cls: type, **options: Any) -> torch.optim.Optimizer:
        """An instance of (a subclass of) `cls` over this rank's shards; its step includes what the
        stage needs after the update, its zero_grad clears the full gradients too."""
        trainer = self

        def zero_grad(opt, set_to_none: bool = True) -> None:
            cls.zero_grad(opt, set_to_none)
            for s in trainer.slots:
                if s.leaf is not s.shard:
                    s.leaf.grad = None

        sharded = type(f"ZeRO{self.stage}{cls.__name__}", (cls,), {"zero_grad": zero_grad})
        opt = sharded([s.shard for s in self.slots], **options)
        opt.register_step_pre_hook(lambda *_: self._before_step())
        opt.register_step_post_hook(lambda *_: self._after_step())
        return opt

    def _before_step(self) -> None:
        if self.stage != 1:
            return
        for s in self.slots:  # zero=1: this rank's slice of the all-reduced gradient
            if s.leaf.grad is not None:
                s.shard.grad = self._flat_slice(s.leaf.grad.contiguous()).clone()
                s.leaf.grad = None

    def _flat_slice(self, t: torch.Tensor) -> torch.Tensor:
        return flat_block(t, self.dp, self.dp_coord, view=True)

    def _after_step(self) -> None:
        """zero=1/2: all-gather every updated shard (one bucket) into the full parameters."""
        if self.stage in (1, 2):
            gather_blocks([(s.shard, s.full) for s in self.slots], self.dp, self.dp_group)

    # ---- gradient clipping ----------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient so the global 2-norm over all shards is at most `max_norm` (as
        `torch.nn.utils.clip_grad_norm_` on the whole model); returns the norm before clipping."""
        slots = [s for s in self.slots if self._grad(s) is not None]
        grads = [self._grad(s) for s in slots]
        if not grads:
            return torch.zeros(())
        norms = torch._foreach_norm(grads, 2)  # per tensor, in its dtype, as torch's clip_grad_norm_
        if dist.is_initialized() and self.program.mesh.size > 1:
            sq = torch.stack([n.float() ** 2 / s.replicas for n, s in zip(norms, slots)]).sum()
            dist.all_reduce(sq)
            total = sq.sqrt()
        else:
            total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    def _grad(self, s: Slot) -> torch.Tensor | None:
        return s.leaf.grad if self.stage < 2 else s.shard.grad

    def local_parameters(self) -> dict[str, torch.Tensor]:
        """FQN -> the tensor the optimizer updates on this rank (a flat dp shard under zero>=1)."""
        return {s.fqn: s.shard for s in self.slots}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """FQN -> this rank's local (tp-sharded) parameter, all-gathered over dp where it is
        sharded there (a collective: every rank must call it)."""
        out = {}
        c = c10d()
        for s in self.slots:
            if self.stage < 2:
                out[s.fqn] = (s.full if s.full is not None else s.leaf).detach()
                continue
            g = c.wait_tensor(c.all_gather_into_tensor(s.shard.detach().contiguous(), self.dp, self.dp_group))
            out[s.fqn] = g[:math.prod(s.shape)].view(s.shape)
        return out
