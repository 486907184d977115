
import meshc
import pytest
import torch
import torch.nn.functional as F
from meshc import cost_model as cm
from meshc.collectives import COLLECTIVES

H100 = cm.PRESETS["h100-nvlink"]


def _node(program, target):
    (node,) = [n for n in program.graph.nodes if n.target == target]
    return node


def test_all_reduce_matches_hand_computed():
    # 8 GPUs, 1 GiB: 2*7/8 * 2^30 / 450e9 + 14 * 5e-6
    expected = 2 * 7 / 8 * 2**30 / 450e9 + 14 * 5e-6
    assert cm.all_reduce_time(2**30, 8, H100) == pytest.approx(expected)
    assert cm.all_reduce_time(2**30, 8, "h100-nvlink") == pytest.approx(4.2457e-3, rel=1e-4)


def test_all_gather_reduce_scatter_all_to_all_are_one_ring_pass():
    expected = 3 / 4 * 1e6 / 450e9 + 3 * 5e-6  # 4 GPUs, 1 MB (full tensor)
    for fn in (cm.all_gather_time, cm.reduce_scatter_time, cm.all_to_all_time):
        assert fn(1e6, 4, H100) == pytest.approx(expected)
    assert cm.all_reduce_time(1e6, 4, H100) == pytest.approx(2 * expected)


def test_group_of_one_costs_nothing():
    for kind in COLLECTIVES:
        assert cm.collective_time(kind, 1e9, 1, H100) == 0.0
        assert cm.collective_time(kind, 1e9, 1, H100, inter_node=True) == 0.0


def test_inter_node_uses_the_inter_node_link():
    expected = 2 * 15 / 16 * 1e8 / 50e9 + 30 * 10e-6
    assert cm.all_reduce_time(1e8, 16, H100, inter_node=True) == pytest.approx(expected)
    assert cm.all_reduce_time(1e8, 16, H100, inter_node=True) > 5 * cm.all_reduce_time(1e8, 16, H100)


def test_collective_time_dispatches_every_meshc_collective():
    assert set(cm.COLLECTIVE_TIME) == COLLECTIVES
    assert cm.collective_time("all_reduce", 1e6, 4, H100) == cm.all_reduce_time(1e6, 4, H100)
    assert cm.collective_time("all_gather_into_tensor", 1e6, 4, H100) == cm.all_gather_time(1e6, 4, H100)
    with pytest.raises(ValueError, match="unknown collective 'allreduce'.*all_reduce"):
        cm.collective_time("allreduce", 1e6, 4, H100)
    with pytest.raises(ValueError, match="n >= 1"):
        cm.all_reduce_time(1e6, 0, H100)


def test_roofline_picks_the_slower_bound():
    compute_bound = cm.compute_time(989e12, 1.0, H100)
    assert compute_bound == pytest.approx(1.0)
    memory_bound = cm.compute_time(1.0, 3.35e12 * 2, H100)
    assert memory_bound == pytest.approx(2.0)
    h200 = cm.get_preset("h200-nvlink")
    assert cm.compute_time(0, 4.8e12, h200) == pytest.approx(1.0)


def test_linear_node_flops_on_a_captured_mlp():
    p = meshc.capture(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), (torch.randn(4, 8),))
    linear = _node(p, torch.ops.aten.linear.default)
    flops, nbytes = cm.node_flops_and_bytes(linear)
    assert flops == 2 * 4 * 16 * 8
    assert nbytes == 4 * (4 * 8 + 16 * 8 + 16 + 4 * 16)  # x, weight, bias in; y out
    assert cm.node_flops_and_bytes(_node(p, torch.ops.aten.relu.default)) == (4 * 16, 4 * (2 * 4 * 16))
    for n in p.graph.nodes:
        if n.op in ("placeholder", "output"):
            assert cm.node_flops_and_bytes(n) == (0, 0)
    assert cm.node_time(linear, H100) == pytest.approx(nbytes / 3.35e12)  # tiny: memory bound


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)

    def forward(self, ids):
        x = self.emb(ids)  # [2, S, 16]
        q = x.view(ids.shape[0], ids.shape[1], 2, 8).transpose(1, 2)  # [B=2, H=2, S, D=8]
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).sum(-1)


def test_sdpa_embedding_view_and_reduction_nodes_with_symbolic_sizes():
    ids = torch.randint(0, 32, (2, 6))
    p = meshc.capture(_Attention(), (ids,), dynamic_shapes={"ids": {1: torch.export.Dim("seq", min=2, max=64)}})
    sdpa = _node(p, torch.ops.aten.scaled_dot_product_attention.default)
    assert not isinstance(sdpa.meta["val"].shape[2], int)  # the sequence length is a SymInt
    assert cm.node_flops_and_bytes(sdpa)[0] == 4 * 2 * 2 * 6 * 6 * 8
    assert cm.node_flops_and_bytes(_node(p, torch.ops.aten.embedding.default)) == (0, 2 * 6 * 16 * 4)
    assert cm.node_flops_and_bytes(_node(p, torch.ops.aten.sum.dim_IntList))[0] == 2 * 2 * 6 * 8
    views = [n for n in p.graph.nodes if getattr(n.target, "is_view", False)]
    assert views and all(cm.node_flops_and_bytes(n) == (0, 0) for n in views)


def test_get_preset_names_the_valid_presets_on_a_typo():
    assert cm.get_preset("cpu-gloo") is cm.PRESETS["cpu-gloo"]
    assert cm.get_preset(H100) is H100
    with pytest.raises(ValueError) as err:
        cm.get_preset("h100-nvlnk")
    msg = str(err.value)
    assert "'h100-nvlnk'" in msg and "did you mean 'h100-nvlink'" in msg
    assert "a100-nvlink, cpu-gloo, h100-nvlink, h100-nvlink-decode, h200-nvlink" in msg  # built-in + preset files
    with pytest.raises(TypeError, match="preset name or a DevicePreset"):
        cm.get_preset(3)


def test_presets_are_positive_and_frozen():
    for p in cm.PRESETS.values():
        assert min(p.peak_flops, p.mem_bandwidth, p.intra_alpha, p.intra_beta, p.inter_alpha, p.inter_beta) > 0
    with pytest.raises(AttributeError):
        H100.peak_flops = 1.0
