"""Pipeline-parallel execution of a staged Program: run a Schedule's actions on the ranks of `pp`.

Entry points: `PipelineModel(program, schedule, device_mesh)` with `forward(*args, **kwargs)`
(inference: the schedule's F actions) and `train_step(inputs, target, loss_fn) -> loss` (every
action: F, B or the split I/W of zero-bubble schedules), `last_trace` (measured start/end of every
action on this rank; `meshc.runtime.pipeline_trace` writes Chrome traces and compares with the
schedule's prediction).

How it runs. The Program arrives split (passes `pipeline_partition`, `split_stages`, and for
training on a tp dim `differentiable_collectives`; `weight_grad_outputs` for zero-bubble): one
Program per virtual stage, each lowered here by `meshc.backends.lower` like any Program; stage s
runs on pp rank `schedule.stage_rank(s)`. The batch (dim 0 of every batched input) is cut into `microbatches`
equal micro-batches. Activations go from stage s to s+1 and gradients back through
`pipeline_p2p.Exchange` (`dist.batch_isend_irecv`, gloo or NCCL): sends are asynchronous, the
receive an action needs is posted one action ahead and waited right before use, each wait bounded
by the process group's timeout (`meshc.launch(timeout=...)`) or `timeout`. Receive buffers are
sized from the graph's symbolic shapes bound to the micro-batch's input sizes (no shape messages).

Training: the last stage applies `loss_fn(output, target)` per micro-batch, scaled by
1/microbatches (and 1/tp: every tp rank seeds its replicated loss), so gradients equal
single-process gradient accumulation over the micro-batches. B is one `autograd.grad` over the
stage's inputs and weights. Zero-bubble's I asks for the input gradients and for the gradient dq
of every weight-reading node's output (graph kept); W is then each reader's local vjp
dq -> dweight (formulas in `pipeline_weight_grads`; where that is not exact, W differentiates
the whole stage w.r.t. the weights again). Gradients of a step are collected,
summed over tp for replicated parameters and over pp ranks for tensors several stages read (tied
weights), then added to `.grad` of the local parameters (`local_parameters()`). `make_optimizer`
gives a torch optimizer over them; compiled with zero=1/2, over this dp rank's flat blocks of them
instead, with the dp reduction and the after-step all-gather of `meshc.runtime.pipeline_zero`.

`pipeline_model(program, device_mesh, schedule)` is what `meshc.compile` returns on a pp mesh; it
keeps in `program.state` only the tensors this rank's stages read, so `meshc.load_checkpoint`
loads only those into a model captured on 'meta'.

Never imports a pass, never builds or rewrites a graph, never builds or changes a schedule (an
invalid one fails in `build_schedule`, before any process waits), never waits without a timeout.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from meshc.errors import MeshcError, MeshError, ScheduleError
from meshc.mesh import DP, PP, TP
from meshc.program import Program, trainable
from meshc.runtime.generate import Generates
from meshc.runtime.pipeline_p2p import Exchange, microbatch, shape_binding, split_microbatches
from meshc.runtime.pipeline_weight_grads import weight_grads
from meshc.schedules import Action, Schedule


class PipelineModel(Generates, torch.nn.Module):
    def __init__(self, program: Program, schedule: Schedule, device_mesh: Any = None, *,
                 backend: str = "aten", timeout: float | None = None, zero: int = 0):
        super().__init__()
        mesh = program.mesh
        extra = [f"{n}={s}" for n, s in zip(mesh.names, mesh.sizes) if n not in (PP, TP, DP) and s > 1]
        if extra:
            raise MeshError(f"the pipeline runtime runs meshes with '{DP}', '{PP}' and '{TP}' dims; mesh '{mesh}' "
                            f"also has {', '.join(extra)}")
        if mesh.dp > 1 and mesh.tp > 1:
            raise MeshError(f"mesh '{mesh}': '{DP}' together with '{PP}' and '{TP}' is not supported yet; use "
                            f"{DP} x {PP} or {PP} x {TP}")
        if schedule.pp != mesh.pp:
            raise ScheduleError(f"{schedule} is for pp={schedule.pp} but mesh '{mesh}' has pp={mesh.pp}")
        if program.split is None:
            raise MeshError("the pipeline runtime runs a split Program: run the passes pipeline_partition and "
                            "split_stages first (meshc.compile's default pipeline on a pp mesh does)")
        if len(program.split.stages) != schedule.num_stages:
            raise MeshError(f"the program has {len(program.split.stages)} stages but {schedule} runs "
                            f"{schedule.num_stages}; partition it for {schedule.num_stages} stages")
        self.program, self.schedule, self.timeout = program, schedule, timeout
        self.split = program.split
        self.pp_rank, self.dp_rank = mesh.coord(program.rank, PP), mesh.coord(program.rank, DP)
        self.tp, self.dp = mesh.tp, mesh.dp
        self.last = schedule.num_stages - 1
        self.local = {s: self.split.stages[s] for s in schedule.rank_stages(self.pp_rank)}
        self.requested_backend, self.zero_stage = backend, zero  # zero=1/2 on dp: `meshc.runtime.pipeline_zero`
        self.rebind()
        self.pp_group = device_mesh.get_group(PP) if device_mesh is not None and schedule.pp > 1 else None
        self.tp_group = device_mesh.get_group(TP) if device_mesh is not None and self.tp > 1 else None
        self.dp_group = device_mesh.get_group(DP) if device_mesh is not None and self.dp > 1 else None
        self.last_trace: list[dict] = []
        self.report = ""

    # ---- state ----------------------------------------------------------------------------------
    def _local_state(self):
        """placeholder name -> tensor for what the local stages read; trainable floats are leaves
        (the model's own Parameters where possible, so `.grad` lands on them)."""
        nodes = {n.name: n for n in self.program.placeholders()}
        by_id: dict[int, torch.Tensor] = {}
        state, params = {}, {}
        for st in self.local.values():
            for name in st.state:
                t = self.program.state[name]
                if id(t) not in by_id:
                    if trainable(nodes[name]) and not (isinstance(t, torch.nn.Parameter) and t.requires_grad):
                        t = torch.nn.Parameter(t.detach(), requires_grad=True)
                    by_id[id(self.program.state[name])] = t
                state[name] = by_id[id(self.program.state[name])]
                if trainable(nodes[name]):
                    params[name] = state[name]
        return state, params

    def rebind(self) -> None:
        """Take the tensors from `program.state` (again after `meshc.load_checkpoint`) and lower
        every local stage's Program with the backend (trainable tensors bound as leaves)."""
        from meshc.backends import lower

        self._state, self.params = self._local_state()
        self._zero = None  # made on first use, over these parameters
        self._run: dict[int, Any] = {}
        for s, st in self.local.items():
            st.program.state.update({n: self._state[n] for n in st.state})
            self._run[s], self.backend = lower(st.program, self.requested_backend)

    def local_parameters(self) -> dict[str, torch.Tensor]:
        """This rank's trainable tensors by the model's FQN (tied weights under each name)."""
        return {self.program.fqn(name): t for name, t in self.params.items()}

    def make_optimizer(self, cls: type, **options: Any) -> torch.optim.Optimizer:
        """A `cls` optimizer over this rank's parameters (zero=1/2: its flat dp blocks; the step
        all-gathers the updated blocks)."""
        if self.zero_stage:
            return self.zero.make_optimizer(cls, **options)
        return cls(list({id(p): p for p in self.params.values()}.values()), **options)

    @property
    def zero(self):
        if self._zero is None:
            from meshc.runtime.pipeline_zero import PipelineZero

            unique = list({id(p): p for p in self.params.values()}.values())
            self._zero = PipelineZero(unique, self.zero_stage, self.program.mesh, self.program.rank)
        return self._zero

    def _stage_params(self, s: int) -> list[torch.Tensor]:
        return list({id(t): t for n in self.local[s].state if (t := self.params.get(n)) is not None}.values())

    # ---- calls ----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Inference: the outputs of the whole batch, in the model's structure, on every rank."""
        flat = self.program.bind_inputs(args, kwargs)
        with torch.no_grad():
            return self._step(flat, None, None)

    def run_flat(self, flat: list) -> Any:
        """Inference on the flat user inputs (what the generation loop calls every step)."""
        with torch.no_grad():
            return self._step(flat, None, None)

    def user_inputs_read(self) -> set[int]:
        """Indices of the flat user inputs this rank's stages read (a stage's KV cache, say)."""
        return {i for st in self.local.values() for i in st.user}

    def train_step(self, inputs: Any, target: Any, loss_fn, kwargs: dict | None = None) -> torch.Tensor:
        """One step: every micro-batch forward and backward per the schedule. Returns the mean
        micro-batch loss (on every rank) and adds this step's gradients to `.grad`."""
        if self.backend != "aten":
            raise MeshcError(f"train_step runs on the aten backend only: the {self.backend} backend has no backward "
                             f"kernels. Compile with backend='aten' (or 'auto' on a CPU) to train.")
        if not self.schedule.training:
            raise ScheduleError(f"{self.schedule} has no backward; build a training schedule "
                                f"(gpipe, 1f1b, interleaved-1f1b, zb-h1) for train_step")
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return self._step(self.program.bind_inputs(args, kwargs or {}), target, loss_fn)

    # ---- one step -------------------------------------------------------------------------------
    def _step(self, flat: list, target: Any, loss_fn) -> Any:
        m, training = self.schedule.microbatches, loss_fn is not None
        if self.dp > 1:  # data parallel: each pipeline replica takes its share of the batch
            replicas = f"over dp={self.dp} replicas"
            flat = split_microbatches(flat, self.dp, self.program, replicas)[self.dp_rank]
            if training:
                target = pytree.tree_map(lambda t: microbatch(t, self.dp, self.dp_rank, "target", replicas), target)
        self._mbs = split_microbatches(flat, m, self.program)
        self._targets = [pytree.tree_map(lambda t, i=i: microbatch(t, m, i, "target"), target) for i in range(m)] \
            if training else None
        self._loss_fn, self._ctx, self._outs, self._losses, self._grads = loss_fn, {}, {}, [], {}
        self._ex = Exchange(self, shape_binding(self.program, self._mbs[0]))
        actions = [a for a in self.schedule.actions[self.pp_rank] if training or a.op == "F"]
        trace = []
        for i, a in enumerate(actions):
            if i + 1 < len(actions):
                self._ex.prefetch(actions[i + 1])  # post the next receive before computing this action
            t0, self._ex.waited = time.perf_counter(), 0.0
            getattr(self, f"_run_{a.op}")(a)
            trace.append({"op": a.op, "stage": a.stage, "mb": a.mb, "start": t0, "end": time.perf_counter(),
                          "wait": self._ex.waited, "rank": self.program.rank, "pp_rank": self.pp_rank})
        self._ex.finish()
        self.last_trace = trace
        if not training:
            return self._merged_outputs()
        self._reduce_gradients()
        loss = torch.stack(self._losses).sum() / m if self._losses else torch.zeros(())
        if self.pp_group is not None:
            dist.all_reduce(loss, group=self.pp_group)  # only the last stage's rank holds a non-zero loss
        if self.dp_group is not None:
            dist.all_reduce(loss, group=self.dp_group)
            loss = loss / self.dp
        return loss

    def _run_F(self, a: Action) -> None:
        st, training = self.local[a.stage], self._loss_fn is not None
        recv = self._ex.take("act", a.stage, a.mb) if a.stage > 0 else []
        if training:
            recv = [t.requires_grad_(True) if b.requires_grad else t for b, t in zip(st.recv, recv)]
        readers = st.readers
        with torch.set_grad_enabled(training):
            out = list(self._run[a.stage]([*recv, *(self._mbs[a.mb][i] for i in st.user)]))
            qs = []  # with weight readers: their outputs, then their arguments (saved for W)
            if readers:
                cut = len(out) - len(readers.readers) - readers.num_argvals
                qs = [*out[cut:cut + len(readers.readers)],
                      [v.detach() if isinstance(v, torch.Tensor) else v for v in out[cut + len(readers.readers):]]]
                out = out[:cut]
            if a.stage < self.last:
                self._ex.send("act", a.stage + 1, a.mb, out)
                if training:
                    rg = [o for b, o in zip(st.send, out) if b.requires_grad]
                    self._ctx[a.stage, a.mb] = (recv, rg, qs)
                return
            self._outs[a.mb] = out
            if training:
                loss = self._loss_fn(self._unflatten(out), self._targets[a.mb])
                self._losses.append(loss.detach())
                self._ctx[a.stage, a.mb] = (recv, [loss / (self.schedule.microbatches * self.tp)], qs)

    def _backward_args(self, a: Action):
        recv, outs, qs = self._ctx[a.stage, a.mb]
        st = self.local[a.stage]
        inputs = [t for b, t in zip(st.recv, recv) if b.requires_grad]
        grads = self._ex.take("grad", a.stage, a.mb) if a.stage < self.last else [None]
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        return inputs, [o for o, _ in pairs], [g for _, g in pairs], qs

    def _run_B(self, a: Action) -> None:
        inputs, outs, grads, _ = self._backward_args(a)
        params = self._stage_params(a.stage)
        got = _grad(outs, inputs + params, grads, retain=False)
        self._send_input_grads(a, inputs, got[:len(inputs)])
        self._accumulate(params, got[len(inputs):])
        del self._ctx[a.stage, a.mb]

    def _run_I(self, a: Action) -> None:
        """Input gradients (sent at once) and, with weight readers, their outputs' gradients dq."""
        inputs, outs, grads, saved = self._backward_args(a)
        qs = saved[:-1]
        got = _grad(outs, inputs + qs, grads, retain=True)
        self._send_input_grads(a, inputs, got[:len(inputs)])
        self._ctx[a.stage, a.mb] = (saved, got[len(inputs):]) if saved else (outs, grads)

    def _run_W(self, a: Action) -> None:
        """Weight gradients: per reader the formula dq -> dweight (autograd on that reader if there is
        none), or, without readers, the whole stage again."""
        outs, grads = self._ctx.pop((a.stage, a.mb))
        readers = self.local[a.stage].readers
        if readers is None:
            params = self._stage_params(a.stage)
            self._accumulate(params, _grad(outs, params, grads, retain=False))
            return
        argvals = outs[-1]
        for reader, q, dq in zip(readers.readers, outs[:-1], grads):
            if dq is None:
                continue
            by_name = weight_grads(reader, argvals, dq)
            if by_name is None:
                names = [n for _, n in reader.weights]
                by_name = dict(zip(names, _grad([q], [self.params[n] for n in names], [dq], retain=True)))
            for name, g in by_name.items():
                self._accumulate([self.params[name]], [g])

    def _send_input_grads(self, a: Action, inputs: list, got: list) -> None:
        if a.stage > 0:
            self._ex.send("grad", a.stage - 1, a.mb, [g if g is not None else torch.zeros_like(t)
                                                      for t, g in zip(inputs, got)])

    def _accumulate(self, params: list, grads: list) -> None:
        for p, g in zip(params, grads):
            if g is not None:
                self._grads[id(p)] = self._grads[id(p)] + g if id(p) in self._grads else g

    def _reduce_gradients(self) -> None:
        """Sum this step's gradients over tp (replicated parameters) and over the pp ranks that
        share a tensor, then add them to `.grad`. Every rank runs the same collectives in order."""
        nodes = {n.name: n for n in self.program.placeholders()}
        if self.tp_group is not None:
            tp_axis = self.program.mesh.index(TP)
            for name, p in self.params.items():
                pls = nodes[name].meta.get("meshc_placement")
                if id(p) in self._grads and (pls is None or pls[tp_axis].is_replicate()):
                    dist.all_reduce(self._grads[id(p)], group=self.tp_group)
        if self.pp_group is not None:
            for group in self.split.shared_state:
                if not trainable(nodes[group[0]]):
                    continue
                mine = next((self.params[n] for n in group if n in self.params), None)
                g = self._grads.get(id(mine)) if mine is not None else None
                if g is None:
                    g = torch.zeros_like(self.program.state[group[0]] if mine is None else mine)
                dist.all_reduce(g, group=self.pp_group)  # ranks that do not read it contribute zeros
                if mine is not None:
                    self._grads[id(mine)] = g
        if self.zero_stage == 2:  # the mean over replicas, only this rank's block of it kept
            self.zero.reduce_scatter(self._grads)
        elif self.dp_group is not None:  # the mean over replicas = accumulation over the whole batch
            for p in {id(p): p for p in self.params.values()}.values():
                g = self._grads.get(id(p), torch.zeros_like(p))
                dist.all_reduce(g, group=self.dp_group)
                self._grads[id(p)] = g / self.dp
        for p in {id(p): p for p in self.params.values()}.values():
            if id(p) in self._grads:
                p.grad = self._grads[id(p)].detach() if p.grad is None else p.grad + self._grads[id(p)]

    # ---- outputs --------------------------------------------------------------------------------
    def _unflatten(self, out: list) -> Any:
        it = iter(out)
        return self.program.unflatten_outputs([next(it) if t is None else t for t in self.split.output_template])

    def _merged_outputs(self) -> Any:
        merged = None
        if self.last in self.local:
            m = self.schedule.microbatches
            leaves = [[self._outs[i][k] for i in range(m)] for k in range(len(self._outs[0]))]
            merged = [torch.cat(v) if isinstance(v[0], torch.Tensor) and v[0].dim() else v[0] for v in leaves]
        if self.pp_group is not None:
            box = [merged]
            last_rank = self.program.mesh.with_coord(self.program.rank, PP, self.schedule.stage_rank(self.last))
            dist.broadcast_object_list(box, src=last_rank,
                                       group=self.pp_group)
            merged = box[0]
        if self.dp_group is not None:  # every replica's share of the batch, in order
            merged = [self._gather_dp(t) for t in merged]
        return self._unflatten(merged)

    def _gather_dp(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        parts = [torch.empty_like(t) for _ in range(self.dp)]
        dist.all_gather(parts, t.contiguous(), group=self.dp_group)
        return torch.cat(parts)

def _grad(outputs: list, inputs: list, grads: list, retain: bool) -> list:
    if not outputs or not inputs:
        return [None] * len(inputs)
    return list(torch.autograd.grad(outputs, inputs, grads, retain_graph=retain, allow_unused=True))


def pipeline_model(program: Program, device_mesh: Any, schedule: Schedule, backend: str = "aten",
                   timeout: float | None = None, zero: int = 0) -> PipelineModel:
    """What `meshc.compile` returns for a mesh with a `pp` dim: ranks check they compiled the same
    program and the mesh's process groups are bound (`meshc.runtime.mesh.bind`), then this rank's
    stages are lowered."""
    from meshc.runtime.mesh import bind

    bind(program, device_mesh)
    pipe = PipelineModel(program, schedule, device_mesh, backend=backend, timeout=timeout, zero=zero)
    # keep only what this rank's stages read (and shared weights, whose gradients it sums): the
    # rest is released here, and `meshc.load_checkpoint(pipe, folder)` reads only these tensors
    keep = set(pipe._state) | {n for group in pipe.split.shared_state for n in group}
    pipe.program = dataclasses.replace(program, state={k: v for k, v in program.state.items() if k in keep})
    return pipe
