"""Start an SPMD function on every rank of a mesh: local processes, or the ranks torchrun made.

Entry point: `launch(fn, mesh, *args, backend=None, timeout=60.0, **kwargs) -> list`.
`fn(device_mesh, *args, **kwargs)` runs on every rank with a torch `DeviceMesh` built from the
mesh spec; the list of every rank's return value comes back (under torchrun: this rank's only).

Never hangs: the process group has `timeout`, the parent watches its children, and when one rank
raises or dies every other rank is terminated and a `LaunchError` names the root cause once: the
rank, the error and the line of user code it came from (`MESHC_TRACEBACK=1` adds the full traceback).
Spawned ranks re-import the user's script; one that finds `launch` at its top level (no
`if __name__ == "__main__":`) stops at once, and the error says so.

Ranks start from multiprocessing's forkserver, which has imported torch, meshc and (when installed)
transformers, with the modelling base every Hugging Face model imports (`transformers.modeling_utils`,
~0.7 s), once: a 2-rank launch after the first costs about 0.6 s instead of about 4 s of imports per
rank on a 2-core CPU. The server also makes one tiny capture on 'meta'
(`meshc.capture_warmup`), so no rank pays torch.export's first-call set-up (about 1.5 s each).
Each rank gets this process's environment as it is at the launch
(not the server's), set before anything of the job is unpickled. `MESHC_START_METHOD=spawn` starts
every rank from a fresh interpreter instead.

`init_from_torchrun(timeout)` starts the default process group from torchrun's environment, with a
timeout, for code that compiles on a mesh string under torchrun without calling `launch`.
"""

from __future__ import annotations

import atexit
import datetime
import importlib.util
import multiprocessing
import os
import pickle
import socket
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from meshc.errors import MeshcError, MeshError
from meshc.mesh import MeshSpec

#: Seconds a collective may wait before it fails (every process group meshc starts has a timeout).
DEFAULT_TIMEOUT_S = 60.0
#: What torchrun sets for every process that the default group's env:// rendezvous needs.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Exit status of a spawned rank that found `launch` at the top level of the script it re-imports.
_IMPORTED_MAIN_STATUS = 93


class LaunchError(MeshcError):
    """A rank raised, died, or the mesh could not be started. `tracebacks`: rank -> full traceback
    of the ranks that raised (the message shows only the root cause)."""

    def __init__(self, message: str, tracebacks: dict[int, str] | None = None):
        super().__init__(message)
        self.tracebacks = tracebacks or {}


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_torchrun(timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Start the default process group from torchrun's environment (as `init_device_mesh` would,
    but with `timeout`): gloo on CPU, nccl with CUDA. Returns the device type ('cpu' or 'cuda')."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise MeshError(f"cannot start the process group from torchrun's environment: {', '.join(missing)} "
                        f"not set. Start the script with `torchrun --nproc-per-node N script.py`")
    backend = default_backend()
    _init_default_group(backend, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timeout, "env://")
    atexit.register(_destroy_default_group)  # started here, so ended here (NCCL warns otherwise)
    return "cuda" if backend == "nccl" else "cpu"


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def started_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(fn: Callable[..., Any], mesh: Any, *args: Any, backend: str | None = None,
           timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
    _stop_if_importing_main()
    spec = MeshSpec.parse(mesh)
    backend = backend or default_backend()
    if started_by_torchrun():
        return [_run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), spec, backend,
                          timeout, fn, args, kwargs, init_method="env://")]
    return _spawn(fn, spec, backend, timeout, args, kwargs)


def _start_context():
    """The forkserver (preloading what every rank imports), or spawn where asked or unavailable."""
    method = os.environ.get("MESHC_START_METHOD", "forkserver")
    if method not in multiprocessing.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([m for m in ("torch", "torch.distributed", "meshc", "transformers",
                                                "transformers.modeling_utils", "meshc.capture_warmup")
                                    if importlib.util.find_spec(m.split(".")[0]) is not None])
    return ctx


def _spawn(fn, spec: MeshSpec, backend: str, timeout: float, args, kwargs) -> list[Any]:
    world = max(spec.size, 1)
    ctx = _start_context()
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    job = pickle.dumps((world, spec, backend, timeout, fn, args, kwargs, init))  # by value: tensors copied
    procs = [ctx.Process(target=_child, args=(rank, env, job, results), daemon=True, name=f"meshc-rank{rank}")
             for rank in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}  # rank -> what went wrong
    tracebacks: dict[int, str] = {}  # rank -> full traceback, for ranks that raised
    bugs: set[int] = set()  # ranks whose root cause is not an error meshc raised on purpose
    grace_until = None  # after the first failure, collect the others briefly to find the root cause
    try:
        while len(out) + len(errors) < world:
            while not results.empty():
                rank, ok, value = results.get()
                if ok:
                    out[rank] = value
                else:
                    summary, tracebacks[rank], is_bug = value
                    errors[rank] = f"raised {summary}"
                    bugs.update([rank] if is_bug else [])
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and r not in out and r not in errors and results.empty():
                    time.sleep(0.2)  # a rank that raised has put its message; give it time to arrive
                    if results.empty():
                        errors[r] = _death(p.exitcode)
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
        raise LaunchError(_failure_report(spec, errors, tracebacks, bugs), tracebacks)
    return [out[r] for r in range(world)]


def _death(exitcode: int) -> str:
    if exitcode == _IMPORTED_MAIN_STATUS:
        script = getattr(sys.modules.get("__main__"), "__file__", None) or "your script"
        return (f"stopped while importing {script}: it calls meshc.launch at module level, and every rank "
                f"re-imports the script (multiprocessing's spawn), so each rank would start the mesh again. "
                f"Put the call under `if __name__ == \"__main__\":`.")
    sig = " (killed by a signal)" if exitcode < 0 else ""
    return f"died with exit code {exitcode}{sig}"


def _failure_report(spec: MeshSpec, errors: dict[int, str], tracebacks: dict[int, str], bugs: set[int]) -> str:
    """The root cause once (the first rank that failed on its own), ranks that failed the same way
    by number, then the first line of every other failure."""
    (root, why), *rest = sorted(errors.items(), key=lambda kv: (_is_consequence(kv[1]), kv[0]))
    same = [r for r, m in rest if m == why]
    lines = [f"mesh '{spec}' failed: rank {root} {why}"]
    if same:
        lines.append(f"  (rank{'s' if len(same) > 1 else ''} {', '.join(map(str, same))} failed the same way)")
    if root in tracebacks and os.environ.get("MESHC_TRACEBACK"):
        lines.append(f"rank {root}'s traceback:\n{tracebacks[root].rstrip()}")
    elif root in bugs:  # not an error raised on purpose: say how to see all of it
        lines.append(f"  (MESHC_TRACEBACK=1 prints rank {root}'s full traceback)")
    lines.append("Every other rank was stopped.")
    lines += [f"  then: rank {r} {m.splitlines()[0]}" for r, m in rest if m != why]
    return "\n".join(lines)


def _is_consequence(message: str) -> bool:
    """A rank that failed because a peer vanished (connection reset, timeout) is not the cause."""
    return message.startswith("raised") and any(
        k in message for k in ("Connection reset", "Connection closed", "timed out", "Timeout", "peer"))


def _child(rank: int, env: dict[str, str], job: bytes, results) -> None:
    """A spawned rank: take the launching process's environment, then unpickle the job and run it."""
    os.environ.clear()
    os.environ.update(env)
    try:
        world, spec, backend, timeout, fn, args, kwargs, init = pickle.loads(job)
        value = _run_rank(rank, world, spec, backend, timeout, fn, args, kwargs, init_method=init)
        results.put((rank, True, value))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops everyone
        where = _user_line(e)  # None for an error meshc raised on purpose: its message says it all
        summary = f"{type(e).__name__}: {e}" + (f"\n  at {where}" if where else "")
        results.put((rank, False, (summary, traceback.format_exc(), where is not None)))
        raise SystemExit(1) from None


def _user_line(e: BaseException) -> str | None:
    """The innermost frame of the root cause outside installed packages, the standard library and
    this file: where the user's code (or a source checkout of meshc) went wrong. None for errors
    meshc raised on purpose."""
    root = e
    while (nxt := root.__cause__ or (None if root.__suppress_context__ else root.__context__)) is not None:
        root = nxt
    if isinstance(root, MeshcError):
        return None  # raised on purpose: its message names the cause and what to do
    frames = traceback.extract_tb(root.__traceback__)
    if not frames:
        return None
    f = ([f for f in frames if not _is_library(f.filename)] or frames)[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


#: Where frames are not the user's: the standard library and installed packages (torch among them).
_LIBRARY_DIRS = tuple({os.path.dirname(torch.__file__) + os.sep,
                       *(sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib"))})


def _is_library(filename: str) -> bool:
    return filename == __file__ or filename.startswith(_LIBRARY_DIRS) or filename.startswith("<")


def _stop_if_importing_main() -> None:
    """A spawned rank re-imports the user's script as `__mp_main__` before it runs its function.
    If that import reaches `launch` (a call at module level), stop the rank with a status the
    parent explains, instead of multiprocessing's bootstrapping RuntimeError. (`os._exit`: the
    forkserver turns any exception, SystemExit included, into status 1.)"""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_IMPORTED_MAIN_STATUS)


def _run_rank(rank, world, spec: MeshSpec, backend, timeout, fn, args, kwargs, init_method):
    if spec.size != world:
        raise MeshError(f"mesh '{spec}' has {spec.size} devices but the job has {world} ranks "
                        f"(WORLD_SIZE); start it with {spec.size} processes or change the mesh")
    _init_default_group(backend, rank, world, timeout, init_method)
    try:
        from meshc.runtime.mesh import device_mesh_for

        return fn(device_mesh_for(spec), *args, **kwargs)
    finally:
        dist.destroy_process_group()


def _init_default_group(backend: str, rank: int, world: int, timeout: float, init_method: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
