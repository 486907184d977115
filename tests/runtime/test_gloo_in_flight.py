"""Several collectives in flight on one gloo group (issue 14's tp=2 heap corruption): every gloo
group a Program's collectives name runs one collective at a time (`meshc.runtime.mesh.serial_gloo`),
and a graph-shaped pattern — 5 vocabulary all-gathers of varying token counts issued before any is
waited, as Medusa's decode step does — gives every rank's blocks in place."""

from __future__ import annotations

import pytest
from meshc import launch
from meshc.mesh import MeshSpec


def _gathers_in_flight(device_mesh, mesh: str, steps: int):
    import torch.distributed as dist
    import torch.distributed._functional_collectives  # noqa: F401 - registers the ops
    from meshc.runtime.mesh import bind_groups
    from torch._C._distributed_c10d import _resolve_process_group

    spec = MeshSpec.parse(mesh)
    bind_groups(spec, device_mesh)
    c10d, rank = torch.ops._c10d_functional, dist.get_rank()
    threads = [_resolve_process_group(spec.group_name(d))._get_backend(torch.device("cpu")).options._threads
               for d in spec.names]
    wrong = 0
    for step in range(steps):
        t = (1, 4, 16, 64, 23)[step % 5]
        issued = [c10d.all_gather_into_tensor.default(torch.full((1, t, 130), 100.0 * rank + h), 2,
                                                      spec.group_name("tp")) for h in range(5)]
        for h, out in enumerate(issued[1:] + issued[:1]):  # waited in another order than issued
            got = c10d.wait_tensor.default(out)
            peers = [r for r in range(spec.size) if r // 2 == rank // 2]  # this rank's tp group (tp is last)
            want = torch.stack([torch.full((t, 130), 100.0 * p + (h + 1) % 5) for p in peers])
            wrong += not torch.equal(got, want)
    return threads, wrong


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mesh", ["tp=2", pytest.param("dp=2,tp=2", marks=pytest.mark.slow)])  # 4 ranks: sub-groups
def test_gloo_groups_run_one_collective_at_a_time(mesh):
    for threads, wrong in launch(_gathers_in_flight, mesh, mesh, 20, timeout=60):
        assert threads == [1] * len(MeshSpec.parse(mesh).names) and wrong == 0
