"""meshc.launch on local gloo meshes: results come back, and a failing or dead rank ends all."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from meshc.errors import MeshError
from meshc.runtime import LaunchError, launch


def all_reduce_rank(mesh):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    warm = "meshc.capture_warmup" in sys.modules  # the forkserver captured once before forking
    return dist.get_rank(), mesh.mesh_dim_names, tuple(mesh.mesh.shape), float(t), warm


def test_results_from_every_rank():
    out = launch(all_reduce_rank, "dp=2,tp=2", timeout=30)
    assert [r[0] for r in out] == [0, 1, 2, 3]
    assert all(r[1] == ("dp", "tp") and r[2] == (2, 2) and r[3] == 6.0 for r in out)
    assert all(r[4] for r in out) or os.environ.get("MESHC_START_METHOD") == "spawn"


def env_and_args(mesh, t, scale=1.0):
    return os.environ.get("MESHC_TEST_VAR"), float(t.sum()) * scale


def test_ranks_see_the_environment_at_the_call_and_the_arguments(monkeypatch):
    """Ranks fork from a server started at the first launch; they must still see this process's
    environment as it is now (set after that server started), and get tensor arguments by value."""
    launch(all_reduce_rank, "tp=2", timeout=30)  # the forkserver is running from here on
    monkeypatch.setenv("MESHC_TEST_VAR", "set later")
    assert launch(env_and_args, "tp=2", torch.ones(3), scale=2.0, timeout=30) == [("set later", 6.0)] * 2


def raise_on_rank1(mesh):
    if dist.get_rank() == 1:
        raise ValueError("bad shard on purpose")
    dist.barrier()  # the other rank waits on the failed one: launch must not hang here
    return "unreachable"


def test_a_raising_rank_ends_every_rank_with_its_error():
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 raised ValueError: bad shard on purpose"):
        launch(raise_on_rank1, "tp=2", timeout=60)
    assert time.monotonic() - t0 < 60


def chained_on_every_rank(mesh):
    try:
        {}["shard"]
    except KeyError as e:
        raise RuntimeError("cannot load the weights") from e


def test_a_chained_error_is_reported_once_with_the_line_that_caused_it():
    with pytest.raises(LaunchError) as err:
        launch(chained_on_every_rank, "tp=2", timeout=60)
    msg = str(err.value)
    assert msg.startswith("mesh 'tp=2' failed: rank 0 raised RuntimeError: cannot load the weights\n"
                          f"  at {__file__}:"), msg
    assert msg.count("cannot load the weights") == 1 and "(rank 1 failed the same way)" in msg
    assert "in chained_on_every_rank: {}[\"shard\"]" in msg and "Traceback" not in msg
    assert "KeyError: 'shard'" in err.value.tracebacks[0]  # the full chain is kept for whoever debugs


def die_on_rank0(mesh):
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return "unreachable"


def test_a_killed_rank_ends_every_rank():
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="rank 0 died with exit code -9 .killed by a signal."):
        launch(die_on_rank0, "tp=2", timeout=60)
    assert time.monotonic() - t0 < 60


def test_mesh_that_does_not_match_the_world(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(MeshError, match="mesh 'tp=2' has 2 devices but the job has 3 ranks"):
        launch(all_reduce_rank, "tp=2")


def run_killable(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd`; past `timeout` kill it and every process under it (torchrun starts its workers
    in sessions of their own), so a hung rank cannot hang the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return [d for c in children for d in (c, *descendants(c))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMPILE_ON_A_MESH_STRING = """
import torch
import torch.distributed as dist
import meshc
from meshc.models import load_model

torch.set_num_threads(1)
loaded = load_model("mlp")
compiled = meshc.compile(loaded.model, "tp=2", example_inputs=loaded.example_inputs)
with torch.no_grad():
    err = (compiled(*loaded.example_inputs) - loaded.model(*loaded.example_inputs)).abs().max().item()
assert err <= 1e-5, err
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: max abs error {err:.1e}")
"""


@pytest.mark.timeout(240)
def test_compile_on_a_mesh_string_under_torchrun(tmp_path):
    script = tmp_path / "tp2.py"
    script.write_text(COMPILE_ON_A_MESH_STRING)
    torchrun = Path(sys.executable).parent / "torchrun"
    r = run_killable([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), str(script)],
                     timeout=200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rank 0 of 2: max abs error" in r.stdout and "rank 1 of 2: max abs error" in r.stdout


LAUNCH_AT_MODULE_LEVEL = """
import torch.distributed as dist
import meshc

def rank(mesh):
    return dist.get_rank()

print(meshc.launch(rank, "tp=2", timeout=30))
"""


@pytest.mark.timeout(120)
def test_launch_at_module_level_says_to_guard_it_with_main(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    script, guarded = tmp_path / "unguarded.py", tmp_path / "guarded.py"
    script.write_text(LAUNCH_AT_MODULE_LEVEL)
    guarded.write_text(LAUNCH_AT_MODULE_LEVEL.replace("print(", 'if __name__ == "__main__":\n    print('))
    with ThreadPoolExecutor(2) as pool:  # two independent scripts: run them side by side
        runs = [pool.submit(run_killable, [sys.executable, str(f)], 90) for f in (script, guarded)]
        r, fixed = (run.result() for run in runs)
    assert r.returncode == 1
    assert "calls meshc.launch at module level" in r.stderr
    assert 'Put the call under `if __name__ == "__main__":`' in r.stderr
    assert "died with exit code" not in r.stderr and "bootstrapping" not in r.stderr
    assert fixed.returncode == 0 and fixed.stdout.strip() == "[0, 1]", fixed.stderr[-3000:]
