"""meshc.launch on local gloo meshes: results come back, and a failing or dead rank ends all."""

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from meshc.errors import MeshError
from meshc.runtime import LaunchError, launch


def all_reduce_rank(mesh):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), mesh.mesh_dim_names, tuple(mesh.mesh.shape), float(t)


def test_results_from_every_rank():
    out = launch(all_reduce_rank, "dp=2,tp=2", timeout=30)
    assert [r[0] for r in out] == [0, 1, 2, 3]
    assert all(r[1] == ("dp", "tp") and r[2] == (2, 2) and r[3] == 6.0 for r in out)


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
