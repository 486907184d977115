"""Micro-batches, receive-buffer shapes and point-to-point transfers of the pipeline runtime.

Entry points: `split_microbatches(flat, m, program)`, `shape_binding(program, mb_inputs)`,
`concrete_shape(val, binding)` and `Exchange(model, binding)`, which `PipelineModel` uses for every
activation ('act', s, mb: into stage s, from s-1) and gradient ('grad', s, mb: into stage s, from
s+1). Transfers use `dist.batch_isend_irecv`; each value has its own tag, so any number of
messages between two ranks match exactly. Sends are asynchronous and kept until `finish()`;
receives are posted early (`prefetch`) and waited in `take()`, every wait bounded by the process
group's timeout or the model's `timeout`. Between stages on one rank values are handed over.

Never decides what to send or when (the schedule does), never waits without a timeout.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import sympy
import torch
import torch.distributed as dist
from meshc.errors import InputError, MeshError
from meshc.program import Program
from meshc.schedules import Action
from meshc.stages import Boundary


def microbatch(t: Any, m: int, i: int, what: str, parts: str = "") -> Any:
    """Micro-batch i of m of `t` along dim 0 (non-tensors and scalars as they are)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if t.shape[0] % m:
        into = parts or f"into {m} micro-batches"
        raise InputError(f"{what}: batch of {t.shape[0]} does not divide {into}; use a batch that is a multiple of "
                         f"{m}" + ("" if parts else ", or another micro-batch count"))
    b = t.shape[0] // m
    return t[i * b:(i + 1) * b]


def split_microbatches(flat: list, m: int, program: Program, parts: str = "") -> list[list]:
    """The flat user inputs cut into m micro-batches (or `parts`, e.g. replicas) along dim 0
    (non-tensors repeated)."""
    names = [n.meta["meshc_name"] for n in program.placeholders("user")]
    return [[microbatch(t, m, i, f"input {name}", parts) for t, name in zip(flat, names)] for i in range(m)]


def shape_binding(program: Program, mb_inputs: list) -> dict:
    """Size symbol -> value, from the captured inputs' symbolic shapes and one micro-batch's inputs."""
    binding = {}
    for node, value in zip(program.placeholders("user"), mb_inputs):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                binding[size.node.expr] = value.shape[d]
            elif isinstance(size, int) and size != value.shape[d]:
                raise InputError(f"input {node.meta['meshc_name']} dim {d} was captured static with size {size} "
                                 f"but a micro-batch has {value.shape[d]}; capture with dynamic_shapes='auto' "
                                 f"(meshc.compile's default) or with example inputs of one micro-batch")
    return binding


def concrete_shape(val: torch.Tensor, binding: dict) -> list[int]:
    out = []
    for size in val.shape:
        if isinstance(size, torch.SymInt):
            expr = sympy.sympify(sympy.sympify(size.node.expr).xreplace(binding))
            if expr.free_symbols:
                raise MeshError(f"cannot size a pipeline receive buffer: {size} has unbound symbols "
                                f"{sorted(map(str, expr.free_symbols))}")
            size = int(expr)
        out.append(int(size))
    return out


class Exchange:
    """Activations ('act', s, mb: into stage s) and gradients ('grad', s, mb: into stage s, from s+1).
    Between stages on the same rank, values are handed over (detached) without communication."""

    def __init__(self, model: Any, binding: dict):
        self.model, self.binding = model, binding
        self.me = model.program.rank
        self.m = model.schedule.microbatches
        self.width = 1 + max([len(s.recv) for s in model.split.stages] + [1])
        self.posted: dict[tuple, tuple[list, list]] = {}
        self.box: dict[tuple, list] = {}
        self.sends: list = []
        self.waited = 0.0
        self.timeout = datetime.timedelta(seconds=model.timeout) if model.timeout else None
        on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    def _specs(self, kind: str, stage: int) -> list[Boundary]:
        st = self.model.split.stages[stage]
        return st.recv if kind == "act" else [b for b in st.send if b.requires_grad]

    def _peer(self, kind: str, stage: int) -> int:
        """Global rank of the sender of a value entering `stage`."""
        src = stage - 1 if kind == "act" else stage + 1
        return self._rank_of(self.model.schedule.stage_rank(src))

    def _rank_of(self, pp_rank: int) -> int:
        """Global rank of pipeline rank `pp_rank` with this rank's other coordinates."""
        from meshc.mesh import PP

        mesh = self.model.program.mesh
        return mesh.with_coord(self.me, PP, pp_rank) if mesh.pp > 1 else self.me

    def _tag(self, kind: str, stage: int, mb: int, i: int) -> int:
        return (((stage * self.m + mb) * 2 + (kind == "grad")) * self.width) + i

    def prefetch(self, a: Action) -> None:
        if a.op == "F" and a.stage > 0:
            self._post("act", a.stage, a.mb)
        elif a.op in ("B", "I") and a.stage < self.model.last:
            self._post("grad", a.stage, a.mb)

    def _post(self, kind: str, stage: int, mb: int) -> None:
        key = (kind, stage, mb)
        peer = self._peer(kind, stage)
        if key in self.posted or peer == self.me:
            return
        bufs = [torch.empty(concrete_shape(b.val, self.binding), dtype=b.val.dtype, device=self.device)
                if isinstance(b.val, torch.Tensor) else torch.empty(1, dtype=torch.int64, device=self.device)
                for b in self._specs(kind, stage)]
        ops = [dist.P2POp(dist.irecv, t, peer, tag=self._tag(kind, stage, mb, i)) for i, t in enumerate(bufs)]
        self.posted[key] = (bufs, dist.batch_isend_irecv(ops) if ops else [])

    def take(self, kind: str, stage: int, mb: int) -> list:
        key = (kind, stage, mb)
        if self._peer(kind, stage) == self.me:
            return self.box.pop(key)
        self._post(kind, stage, mb)
        bufs, works = self.posted.pop(key)
        t0 = time.perf_counter()
        for w in works:
            w.wait(self.timeout) if self.timeout else w.wait()
        self.waited += time.perf_counter() - t0
        return [t if isinstance(b.val, torch.Tensor) else int(t.item()) for b, t in zip(self._specs(kind, stage), bufs)]

    def send(self, kind: str, stage: int, mb: int, values: list) -> None:
        """Send the values entering `stage` (activations: all of stage-1's outputs; gradients: one per
        requires-grad boundary value)."""
        dst = self._rank_of(self.model.schedule.stage_rank(stage))
        if dst == self.me:
            self.box[kind, stage, mb] = [v.detach() if isinstance(v, torch.Tensor) else v for v in values]
            return
        tensors = [v.detach().contiguous() if isinstance(v, torch.Tensor)
                   else torch.tensor([int(v)], device=self.device) for v in values]
        ops = [dist.P2POp(dist.isend, t, dst, tag=self._tag(kind, stage, mb, i)) for i, t in enumerate(tensors)]
        if ops:
            self.sends.append((tensors, dist.batch_isend_irecv(ops)))

    def finish(self) -> None:
        for _, works in self.sends:
            for w in works:
                w.wait(self.timeout) if self.timeout else w.wait()
        self.sends.clear()
