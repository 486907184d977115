"""Training on dp=2 (gloo, CPU): meshc ZeRO stages 0-3 vs PyTorch DDP, DDP + ZeroRedundancyOptimizer
(PyTorch's ZeRO-1) and FSDP2 `fully_shard`, on the same model, batch and mesh; step time and memory.

    .venv/bin/python benchmarks/train.py                  # llama-tiny, dp=2, batch 8 x 32 tokens
    .venv/bin/python benchmarks/train.py --quick          # fewer steps, no dp=4 (a smoke run; prints, writes no file)

One step = forward + backward + AdamW step + zero_grad, torch.set_num_threads(1) per rank; the
median of the timed steps (after warm-up) with min and max, each rank's time the max over ranks.
Memory per rank (rank 0): `state_bytes` = parameters + optimizer state held between steps + the
gradients at the step's end (model state, against the ZeRO formula for fp32 AdamW: (4+4+8)Psi at
stage 0; stage 1 divides the 8, stage 2 also the gradients' 4, stage 3 all; Psi = parameter count),
and `peak_bytes` = what is held at the step's start + the peak of what the step allocates, from a
dispatch hook that counts every storage an op creates while a tensor still refers to it (transient
all-gathers included). meshc's stages also on dp=4, memory only (one step; 4 ranks on 2 cores).
Writes benchmarks/results_train_cpu.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BATCH, SEQ, LR = 8, 32, 1e-3
MESH = "dp=2"


class LiveBytes(TorchDispatchMode):
    """Bytes of storages created by ops and still referenced by a tensor; `peak` is the maximum."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            key = t.untyped_storage().data_ptr()
        except RuntimeError:  # a storage FSDP resized to nothing: it holds no bytes
            return
        if key not in self.refs:
            self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
            self.now += self.size[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.size.pop(key)
            del self.refs[key]


def tensors_bytes(ts) -> int:
    seen = {}
    for t in ts:
        if isinstance(t, torch.Tensor):
            try:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            except RuntimeError:  # a storage FSDP resized to nothing
                continue
    return sum(seen.values())


def opt_state_tensors(opt) -> list:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]


def loss_fn(out, target):
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 512, (BATCH, SEQ), generator=g), torch.randint(0, 512, (BATCH, SEQ), generator=g)


def measure(step_fn, held_fn, grads_fn, warmup: int, steps: int) -> dict:
    import torch.distributed as dist

    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        step_fn(i)
        times.append(time.perf_counter() - t0)
    held = held_fn()
    mode = LiveBytes()
    with mode:
        grads = step_fn(warmup + steps, keep_grads=True)
    t = torch.tensor(times[warmup:])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
    tl = t.tolist()
    return {"median_s": statistics.median(tl), "min_s": min(tl), "max_s": max(tl),
            "held_bytes": held, "grad_bytes": grads_fn(grads), "peak_bytes": held + mode.peak}


def _meshc(device_mesh, zero: int, warmup: int, steps: int) -> dict:
    import meshc
    from meshc.models import load_model

    loaded = load_model("llama-tiny", batch=BATCH, seq=SEQ)
    ids, _ = data(0)
    model = meshc.compile(loaded.model, device_mesh, example_inputs=(ids,), example_kwargs={"use_cache": False},
                          training=True, zero=zero)
    opt = model.make_optimizer(torch.optim.AdamW, lr=LR)
    tr = model.trainer

    def step(i, keep_grads=False):
        ids, target = data(i)
        model.train_step((ids,), target, loss_fn, {"use_cache": False})
        grads = [tr._grad(s) for s in tr.slots]
        opt.step()
        opt.zero_grad()
        return grads if keep_grads else None

    def held():
        ts = [s.leaf for s in tr.slots] + [s.shard for s in tr.slots] + [s.full for s in tr.slots]
        return tensors_bytes(ts + opt_state_tensors(opt))

    return measure(step, held, tensors_bytes, warmup, steps)


def _torch(device_mesh, kind: str, warmup: int, steps: int) -> dict:
    from meshc.models import load_model

    model = load_model("llama-tiny", batch=BATCH, seq=SEQ).model
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=device_mesh)
        fully_shard(model, mesh=device_mesh)
        run = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        run = DistributedDataParallel(model)
    if kind == "ddp+zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(run.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
    else:
        opt = torch.optim.AdamW(run.parameters(), lr=LR)
    rank, n = device_mesh.get_rank(), device_mesh.size()

    def step(i, keep_grads=False):
        ids, target = data(i)
        b = BATCH // n
        loss_fn(run(ids[rank * b:(rank + 1) * b], use_cache=False), target[rank * b:(rank + 1) * b]).backward()
        grads = [p.grad for p in run.parameters()]
        opt.step()
        opt.zero_grad()
        return grads if keep_grads else None

    def held():
        ps = [getattr(p, "_local_tensor", p) for p in run.parameters()]
        states = [getattr(v, "_local_tensor", v) for v in opt_state_tensors(opt if kind != "ddp+zero1" else opt.optim)]
        return tensors_bytes(ps + states)

    return measure(step, held, lambda gs: tensors_bytes([getattr(g, "_local_tensor", g) for g in gs]), warmup, steps)


def _rank(device_mesh, runs: list, warmup: int, steps: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name in runs:
        try:
            out[name] = _meshc(device_mesh, int(name[-1]), warmup, steps) if name.startswith("meshc") \
                else _torch(device_mesh, name, warmup, steps)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run on gloo CPU is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(device_mesh.get_rank(), name, out[name], flush=True)
    return out


def main(quick: bool = False) -> dict:
    import meshc
    from meshc.models import load_model

    warmup, steps = (1, 3) if quick else (3, 10)
    runs = ["ddp", "ddp+zero1", "fsdp2", "meshc zero=0", "meshc zero=1", "meshc zero=2", "meshc zero=3"]
    res = meshc.launch(_rank, MESH, runs, warmup, steps, timeout=900)[0]
    psi = sum(p.numel() for p in load_model("llama-tiny").model.parameters())
    memory4 = {} if quick else meshc.launch(_rank, "dp=4", runs[3:], 0, 1, timeout=900)[0]  # memory only
    for results, n in ((res, 2), (memory4, 4)):
        formula = {0: 16 * psi, 1: (8 + 8 / n) * psi, 2: (4 + 12 / n) * psi, 3: 16 * psi / n}
        for z in range(4):
            r = results.get(f"meshc zero={z}", {})
            if "held_bytes" in r:
                r["state_bytes"] = r["held_bytes"] + r["grad_bytes"]
                r["formula_bytes"] = formula[z]
                r["state_over_formula"] = round(r["state_bytes"] / formula[z], 3)
    for r in memory4.values():
        for k in ("median_s", "min_s", "max_s"):
            r.pop(k, None)  # dp=4 on 2 cores: memory only
    ratios = {}
    for ours, theirs in (("meshc zero=0", "ddp"), ("meshc zero=1", "ddp+zero1"), ("meshc zero=3", "fsdp2")):
        if "median_s" in res[ours] and "median_s" in res.get(theirs, {}):
            ratios[f"{ours} / {theirs}"] = round(res[ours]["median_s"] / res[theirs]["median_s"], 3)
    result = {"benchmark": "train", "model": "llama-tiny", "params": psi, "mesh": MESH, "batch": BATCH,
              "seq": SEQ, "optimizer": "AdamW fp32", "warmup_steps": warmup, "timed_steps": steps,
              "runs": res, "dp4_memory_only": memory4, "step_time_ratios": ratios, "torch": torch.__version__,
              "machine": f"{platform.machine()}, CPU, gloo; torch.set_num_threads(1) per rank",
              "load_average_after": os.getloadavg(),
              "command": "python benchmarks/train.py" + (" --quick" if quick else ""),
              "meshc_step": "the training-step Program (traced ahead of time, gradients bucketed by a pass)"}
    print(json.dumps(ratios, indent=1))
    if quick:  # a smoke run: the results files keep the full runs' figures
        print(json.dumps(result, indent=1))
        return result
    out = Path(__file__).with_name("results_train_cpu.json")
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
