"""Start an SPMD function on every rank of a mesh: local processes, or the ranks torchrun made.

Entry point: `launch(fn, mesh, *args, backend=None, timeout=60.0, **kwargs) -> list`.
`fn(device_mesh, *args, **kwargs)` runs on every rank with a torch `DeviceMesh` built from the
mesh spec; the list of every rank's return value comes back (under torchrun: this rank's only).

Never hangs: the process group has `timeout`, the parent watches its children, and when one rank
raises or dies every other rank is terminated and a `LaunchError` names the failed rank and why.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from meshc.errors import MeshcError, MeshError
from meshc.mesh import MeshSpec


class LaunchError(MeshcError):
    """A rank raised, died, or the mesh could not be started."""


def launch(fn: Callable[..., Any], mesh: Any, *args: Any, backend: str | None = None,
           timeout: float = 60.0, **kwargs: Any) -> list[Any]:
    spec = MeshSpec.parse(mesh)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        return [_run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), spec, backend,
                          timeout, fn, args, kwargs, init_method="env://")]
    return _spawn(fn, spec, backend, timeout, args, kwargs)


def _spawn(fn, spec: MeshSpec, backend: str, timeout: float, args, kwargs) -> list[Any]:
    world = max(spec.size, 1)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_child, args=(rank, world, spec, backend, timeout, fn, args, kwargs, init, results),
                         daemon=True, name=f"meshc-rank{rank}") for rank in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}  # rank -> what went wrong
    grace_until = None  # after the first failure, collect the others briefly to find the root cause
    try:
        while len(out) + len(errors) < world:
            while not results.empty():
                rank, ok, value = results.get()
                (out if ok else errors)[rank] = value if ok else f"raised {value}"
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and r not in out and r not in errors and results.empty():
                    time.sleep(0.2)  # a rank that raised has put its message; give it time to arrive
                    if results.empty():
                        sig = " (killed by a signal)" if p.exitcode < 0 else ""
                        errors[r] = f"died with exit code {p.exitcode}{sig}"
            if all(p.exitcode == 0 for p in procs) and results.empty() and len(out) < world:
                errors.setdefault(-1, "ranks exited without returning a result")
            if errors:
                grace_until = grace_until or time.monotonic() + 2.0
                if time.monotonic() > grace_until:
                    break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        ranked = sorted(errors.items(), key=lambda kv: (_is_consequence(kv[1]), kv[0]))
        lines = [f"rank {r} {msg}" for r, msg in ranked]
        raise LaunchError(f"mesh '{spec}' failed: {lines[0]}\nEvery other rank was stopped."
                          + "".join(f"\n  then: {line.splitlines()[0]}" for line in lines[1:]))
    return [out[r] for r in range(world)]


def _is_consequence(message: str) -> bool:
    """A rank that failed because a peer vanished (connection reset, timeout) is not the cause."""
    return message.startswith("raised") and any(
        k in message for k in ("Connection reset", "Connection closed", "timed out", "Timeout", "peer"))


def _child(rank, world, spec, backend, timeout, fn, args, kwargs, init, results) -> None:
    try:
        value = _run_rank(rank, world, spec, backend, timeout, fn, args, kwargs, init_method=init)
        results.put((rank, True, value))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops everyone
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"))
        raise SystemExit(1) from None


def _run_rank(rank, world, spec: MeshSpec, backend, timeout, fn, args, kwargs, init_method):
    if spec.size != world:
        raise MeshError(f"mesh '{spec}' has {spec.size} devices but the job has {world} ranks "
                        f"(WORLD_SIZE); start it with {spec.size} processes or change the mesh")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if backend == "nccl" else "cpu"
        device_mesh = init_device_mesh(device, spec.sizes or (1,), mesh_dim_names=spec.names or ("world",))
        return fn(device_mesh, *args, **kwargs)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
