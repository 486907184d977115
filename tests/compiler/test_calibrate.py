"""meshc calibrate (microbenchmarks -> preset file), preset files, and meshc.predict's arithmetic."""

import importlib.util
import json
import math
import operator
from dataclasses import replace
from pathlib import Path

import meshc
import pytest
import torch
import torch.fx as fx
from meshc import calibrate as cal
from meshc import cost_model as cm
from meshc.cli import main
from meshc.predict import PARTS, forward_time, part, peak_memory
from meshc.redistribute import Step, step_time

ROOT = Path(__file__).resolve().parents[2]


def test_fit_line_recovers_a_line_and_weighs_relative_error():
    pts = [(x, 3e-4 + 2e-9 * x) for x in (1e3, 1e4, 1e5, 1e6, 1e7)]
    a, b = cal.fit_line(pts)
    assert a == pytest.approx(3e-4, rel=1e-9) and b == pytest.approx(2e-9, rel=1e-9)
    # one wild point at the large end moves the small-message latency little (relative weights)
    a2, _ = cal.fit_line(pts[:-1] + [(1e7, 10 * pts[-1][1])])
    assert a2 == pytest.approx(3e-4, rel=0.3)


def test_meshc_calibrate_writes_a_preset_that_preset_accepts(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["calibrate", "--out", str(out), "--seconds", "0.2"]) == 0
    assert "wrote" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    p = cm.get_preset(str(out))  # what --preset FILE and preset='FILE' do
    assert p.name == "cpu-calibrated" and p.source == str(out)
    assert set(doc["sources"]) == set(doc["figures"])  # every figure says where it came from
    assert p.peak_flops == max(r for _, r in p.matmul_curve) > 0 and p.mem_bandwidth > 0
    assert p.dispatch_overhead > 0 and p.call_overhead >= 0
    ops = dict(p.op_overheads)
    assert ops["aten.mul.Tensor"] == pytest.approx(p.dispatch_overhead)  # a generic node costs as a pointwise op
    assert len(p.sdpa_curve) == len(cal.SDPA_SEQS) and all(r > 0 for _, r in p.sdpa_curve)
    assert set(dict(p.op_rates)) == set(cal._large_ops()) and all(s >= 0 for _, s in p.op_rates)
    assert p.overhead(torch.ops.aten.linear.default) == ops["aten.linear.default"]
    assert p.overhead(torch.ops.aten.cos.default) == p.dispatch_overhead  # not measured: the generic figure
    assert p.link() == cm.PRESETS["cpu-gloo"].link() and not p.collective_fits  # no mesh: links not measured
    flops = [f for f, _ in p.matmul_curve]
    smallest = flops[0] / p.matmul_curve[0][1]  # below the curve: the smallest size's time (its fixed cost)
    assert flops[0] / 10 / cm.matmul_rate(flops[0] / 10, p) == pytest.approx(smallest)
    assert cm.matmul_rate(flops[-1] * 10, p) == p.matmul_curve[-1][1]  # and above


def test_collective_fits_become_ring_alpha_beta(monkeypatch, tmp_path):
    n = 2
    in_situ = {"all_reduce": [(b, 1e-4 + b * 1e-9) for b in cal.MESSAGE_BYTES],
               "all_gather_into_tensor": [(b, 5e-5 + b * 4e-10) for b in cal.MESSAGE_BYTES]}
    alone = {k: [(b, t / 3) for b, t in rows] for k, rows in in_situ.items()}
    median = {k: [(b, t * 2) for b, t in rows] for k, rows in in_situ.items()}
    mean = {k: [(b, 3e-4 + b * 2e-9) for b, _ in rows] for k, rows in in_situ.items()}
    drift = {"all_reduce": [(1 << 14, 0.05), (1 << 18, 0.15)]}
    monkeypatch.setattr(cal, "measure_collectives", lambda spec: (
        n, {"alone": alone, "in_situ": in_situ, "in_situ_median": median, "in_situ_mean": mean, "drift": drift}))
    monkeypatch.setattr(cal, "measure_matmuls", lambda s: [(1e6, 1e10), (1e8, 2e10)])
    monkeypatch.setattr(cal, "measure_sdpa", lambda s: [(1e6, 5e9)])
    monkeypatch.setattr(cal, "measure_op_rates", lambda s, fixed: {"aten.silu.default": 1e-9})
    monkeypatch.setattr(cal, "measure_bandwidth", lambda s: 5e9)
    mix = {"aten.mul.Tensor": 1, "aten.linear.default": 1}
    monkeypatch.setattr(cal, "measure_dispatch", lambda s: (1e-5, 2e-5, mix))
    monkeypatch.setattr(cal, "measure_ops", lambda s: {"aten.mul.Tensor": 2e-6, "aten.linear.default": 6e-6})
    p2p = {"send": [(b, 2e-5 + b * 1e-10) for b in cal.MESSAGE_BYTES], "recv": [(b, 5e-6) for b in cal.MESSAGE_BYTES]}
    monkeypatch.setattr(cal, "measure_p2p", lambda spec: p2p)
    p, raw = cal.calibrate("tp=2", seconds=0.0)
    # the preset reproduces the in-situ least times (what a forward pays at the machine's own speed, as
    # every other figure is a least time), not their medians, for the group size they were measured on
    for kind, rows in in_situ.items():
        for nbytes, t in rows:
            assert cm.collective_time(kind, nbytes, n, p) == pytest.approx(t, rel=1e-6)
    # the mix's two nodes (a mul and a linear) cost 2 x 1e-5 together: their tight loops (2 and 6 us)
    # plus 6 us of graph cost each
    assert dict(p.op_overheads)["aten.linear.default"] == pytest.approx(1.2e-5)
    assert p.dispatch_overhead == pytest.approx(0.8e-5)
    assert p.link() == p.fit("all_reduce")  # uncalibrated kinds and p2p use the all-reduce link
    assert p.collective_drift == pytest.approx(0.1)  # the mean over the sizes it was measured at
    assert p.fit("reduce_scatter_tensor") is None  # not measured: priced as the backend implements it
    assert raw["collectives"]["group_size"] == 2
    assert raw["collectives"]["seconds_by_bytes_alone"]["all_reduce"][0] == list(alone["all_reduce"][0])
    assert raw["collectives"]["seconds_by_bytes_in_situ_median"]["all_reduce"][0] == list(median["all_reduce"][0])
    # the validation benchmark's second pricing: the same preset with the collectives at their mean in-situ time
    cal.write_preset(p, str(tmp_path / "p.json"), raw)
    bench = importlib.util.spec_from_file_location("cost_model_bench", ROOT / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(module)
    means = module.mean_waits_preset(str(tmp_path / "p.json"))
    for kind, rows in mean.items():
        for nbytes, t in rows:
            assert cm.collective_time(kind, nbytes, n, means) == pytest.approx(t, rel=1e-6)
    assert means.op_overheads == p.op_overheads and means.matmul_curve == p.matmul_curve  # the rest unchanged
    # point-to-point issue costs: the fits reproduce the measured rows, one message at a time
    for kind, rows in p2p.items():
        for nbytes, t in rows:
            assert cm.p2p_issue_time(kind, [nbytes], p) == pytest.approx(t, rel=1e-6)
    assert cm.p2p_issue_time("send", [1e3, 1e3], p) == pytest.approx(2 * (2e-5 + 1e-7))
    assert cm.p2p_issue_time("send", [1e6], cm.PRESETS["h100-nvlink"]) == 0  # not measured: not priced


def test_op_mix_is_the_mix_measure_dispatch_prices():
    gm = cal.op_mix(3)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert len(targets) == 3 * 22
    assert {"aten.linear.default", "aten.mean.dim", "aten.cat.default", "aten.silu.default",
            "aten.transpose.int"} <= set(targets)
    assert gm(*cal._mix_inputs(3))[0].shape == (2, 8, 32)
    assert sum(n.op == "placeholder" for n in gm.graph.nodes) == 3 + 2  # a weight per block, as a forward's layers


def test_preset_files_cite_every_figure():
    for name in ("h100-nvlink", "h200-nvlink", "a100-nvlink", "h100-nvlink-decode"):
        p = cm.PRESETS[name]
        doc = json.loads(open(p.source).read())
        assert set(doc["figures"]) <= set(doc["sources"]) and all(doc["sources"].values())


def test_bad_preset_file_is_a_clear_error(tmp_path):
    with pytest.raises(meshc.SpecError, match="meshc calibrate --out"):
        cm.get_preset(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "figures": {"peak_flops": 1}}')
    with pytest.raises(meshc.SpecError, match="not a meshc preset"):
        cm.get_preset(str(bad))


def _chain_program():
    """x[1024] -> a = x + 1 -> v = a.view -> b = v * v -> out (b, a): known sizes, one view."""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.add.Tensor, (x, 1.0))
    v = g.call_function(torch.ops.aten.view.default, (a, [32, 32]))
    b = g.call_function(torch.ops.aten.mul.Tensor, (v, v))
    c = g.call_function(torch.ops.aten.sum.default, (b,))
    g.output((c,))
    return meshc.capture(fx.GraphModule(torch.nn.Module(), g), (torch.randn(1024),), dynamic_shapes=None)


def test_forward_time_is_roofline_plus_per_op_overheads():
    program = _chain_program()
    p = cm.DevicePreset("t", 1e9, 1e9, 0, 0, 0, 0, 1, dispatch_overhead=1e-6, call_overhead=5e-6,
                        op_overheads=(("aten.sum.default", 4e-6),))
    pr = forward_time(program, p)
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    assert pr.nodes == len(nodes) == 4
    assert pr.dispatch_s == pytest.approx(5e-6 + 3 * 1e-6 + 4e-6)
    assert pr.compute_s == pytest.approx(sum(cm.node_time(n, p) for n in nodes))
    assert pr.comm_s == 0 and pr.total_s == pytest.approx(pr.compute_s + pr.dispatch_s)


def _node(fn, *args):
    """The one ATen node of fn(*args) on FakeTensors, as capture leaves it."""
    gm = fx.symbolic_trace(fn)
    program = meshc.capture(gm, args, dynamic_shapes=None)
    return next(n for n in program.graph.nodes if n.op == "call_function")


def test_node_time_uses_the_measured_attention_curve_and_op_rates():
    q = torch.randn(1, 2, 64, 8)
    sdpa = _node(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), q)
    silu = _node(lambda x: torch.nn.functional.silu(x), torch.randn(4096))
    base = cm.DevicePreset("t", 1e12, 1e12, 0, 0, 0, 0, 1, matmul_curve=((1.0, 1e11),))
    flops, _ = cm.node_flops_and_bytes(sdpa)
    assert cm.node_time(sdpa, base) == pytest.approx(flops / 1e11)  # no attention curve: the matmul rate
    measured = replace(base, sdpa_curve=((1.0, 1e9),), op_rates=(("aten.silu.default", 1e-9),))
    assert cm.node_time(sdpa, measured) == pytest.approx(flops / 1e9)
    assert cm.node_time(silu, base) == pytest.approx(4096 * 8 / 1e12)  # roofline: bytes / bandwidth
    assert cm.node_time(silu, measured) == pytest.approx(4096 * 1e-9)  # slower per element than the roofline


def test_stage_times_price_the_messages_each_stage_emits(mlp):
    from meshc.pipeline import resolve
    from meshc.predict import stage_times

    spec = meshc.MeshSpec.parse("pp=2")
    resolved = resolve(spec, "default", None, "forward", 2, batch=mlp.example_inputs[0].shape[0])
    program = meshc.capture(mlp.model, mlp.example_inputs, dynamic_shapes="auto", mesh=spec)
    program = meshc.PassManager(resolved.pipeline).run(program)
    base = cm.DevicePreset("t", 1e9, 1e9, 0, 0, 0, 0, 1, dispatch_overhead=1e-6)
    measured = replace(base, p2p_fits=(("send", 3e-5, 1e-9), ("recv", 1e-5, 0.0)))
    plain, priced = stage_times(program, base), stage_times(program, measured)
    first, last = program.split.stages
    sent = [cm.size_hint(s) for s in first.send[0].val.shape]
    nbytes = math.prod(sent) * 4  # the float32 activation stage 0 sends to stage 1
    assert len(first.send) == len(last.recv) == 1 and nbytes > 0
    assert priced[0].parts["p2p"] == pytest.approx(3e-5 + nbytes * 1e-9)  # stage 0 sends
    assert priced[1].parts["p2p"] == pytest.approx(1e-5)  # stage 1 posts its receive
    for a, b in zip(plain, priced):  # without measured figures, the stage programs' forward times as before
        assert a.parts["p2p"] == 0 and b.total_s == pytest.approx(a.total_s + b.parts["p2p"])


def test_peak_memory_frees_after_last_reader():
    state, peak = peak_memory(_chain_program())
    assert state == 0
    assert peak == 2 * 4096  # a and b alive together (the view is free); the 4-byte sum comes after b's last read


def test_collectives_priced_as_the_backend_runs_them(mlp):
    from meshc.pipeline import resolve

    spec = meshc.MeshSpec.parse("tp=2")
    program = meshc.capture(mlp.model, mlp.example_inputs, dynamic_shapes=None, mesh=spec)
    program.plan = "megatron"
    program = meshc.PassManager(resolve(spec, "default", "megatron").pipeline).run(program)
    gloo = cm.get_preset("cpu-gloo")
    pr = forward_time(program, gloo)
    colls = [n for n in program.graph.nodes if getattr(n.target, "namespace", "") == "_c10d_functional"
             and "wait" not in str(n.target)]
    assert colls and sum(pr.collectives.values()) == len(colls)
    expected = sum(step_time(Step(str(n.target).split(".")[-2], None, None, nbytes=cm.value_bytes(
        n if "gather" in str(n.target) or "all_reduce" in str(n.target) else n.args[0])), 2, gloo) for n in colls)
    assert pr.comm_s == pytest.approx(expected) and pr.comm_s > 0
    assert math.isfinite(pr.total_s)
    # the parts the validation compares add up to the total (less the per-call overhead)
    assert set(pr.parts) <= set(PARTS) and pr.parts["collectives"] >= pr.comm_s * (1 - 1e-9)
    assert sum(pr.parts.values()) + gloo.call_overhead == pytest.approx(pr.total_s)
    assert {part(n) for n in colls} == {"collectives"}
    # with a drift, each collective also waits drift x the compute its rank ran since the previous one
    drifting = forward_time(program, replace(gloo, collective_drift=0.25))
    since, waits = 0.0, 0.0
    for n in program.graph.nodes:
        if n in colls:
            waits, since = waits + 0.25 * since, 0.0
        elif n.op == "call_function" and part(n) != "collectives":
            since += cm.node_time(n, gloo) + gloo.overhead(n.target) * (n.target is not operator.getitem)
    assert waits > 0 and drifting.comm_s == pytest.approx(pr.comm_s + waits)
    assert drifting.compute_s == pr.compute_s and drifting.dispatch_s == pr.dispatch_s


def test_drift_is_the_wait_per_second_of_phase(monkeypatch):
    """On a one-rank gloo group, with the clock replaced: the short phase takes 1 ms, the long one
    11 ms, and the all-reduce 2 ms plus 0.1 x the phase before it — after the long phase, plus 1 ms
    in every run of 8 but the fifth, so only the least run reads it exactly (the mean: 0.19):
    drift = (3.1 - 2.1) / (11 - 1) = 0.1."""
    import torch.distributed as dist

    clock = [0.0]
    monkeypatch.setattr(cal.time, "perf_counter", lambda: clock[0])
    last, runs = [0.0], []

    def phase(seconds):
        def run():
            clock[0] += seconds
            last[0] = seconds
        return run, ()

    def allreduce(t):
        fifth = len(runs) // (2 * cal.BLOCK_PAIRS) % 8 == 4  # 8 blocks of a short and a long run per size
        clock[0] += 2e-3 + 0.1 * last[0] + (1e-3 if last[0] > 1e-3 and not fifth else 0.0)
        runs.append(None)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows = cal._drift(allreduce, dist.group.WORLD, 8, (phase(1e-3), phase(11e-3)))
    finally:
        dist.destroy_process_group()
    assert [b for b, _ in rows] == [float(b) for b in cal.DRIFT_BYTES]
    assert all(d == pytest.approx(0.1) for _, d in rows)


@pytest.mark.slow  # two gloo ranks, every collective at 8 sizes, alone and after a compute phase (~1 min)
def test_collectives_are_measured_alone_and_in_situ_on_the_mesh():
    n, colls = cal.measure_collectives("tp=2", iters=2, timeout=240)
    assert n == 2 and set(colls) == {"alone", "in_situ", "in_situ_single", "in_situ_median", "in_situ_mean", "drift"}
    assert [b for b, _ in colls["drift"]["all_reduce"]] == [float(b) for b in cal.DRIFT_BYTES]
    assert all(math.isfinite(d) for _, d in colls["drift"]["all_reduce"])
    for how in colls.keys() - {"drift"}:
        rows = colls[how]["all_reduce"]
        assert [b for b, _ in rows] == [float(b) for b in cal.MESSAGE_BYTES]
        assert all(0 < t < 10 for _, t in rows)
    assert set(colls["in_situ"]) == set(colls["alone"]) == set(colls["in_situ_median"]) == set(colls["in_situ_mean"])


@pytest.mark.slow  # two gloo ranks, 8 message sizes (~5 s)
def test_p2p_issue_costs_are_measured_on_the_mesh():
    rows = cal.measure_p2p("tp=2", iters=3, timeout=120)
    assert set(rows) == {"send", "recv"}
    for kind in rows:
        assert [b for b, _ in rows[kind]] == [float(b) for b in cal.MESSAGE_BYTES]
        assert all(0 < t < 1 for _, t in rows[kind])


def test_in_situ_collectives_are_priced_by_the_least_run_of_pairs(monkeypatch):
    """On a one-rank gloo group, with the wall clock replaced: the compute phase takes 1 s; in every
    run of BLOCK_PAIRS pairs, seven take 1.5 s and one 1.0 s + 1 ms x the run's number. The priced
    figure is the least run's mean pair less the phase, (7 x 0.5 + 0.001) / 8 — not the least single
    pair's 1 ms (the figure before runs, kept as in_situ_single) — less the drift's share of the phase
    (a drift of 0.02 s per phase second, 0.02 s; the cost model adds it back per phase)."""
    import torch.distributed as dist

    monkeypatch.setattr(cal, "MESSAGE_BYTES", (1 << 10, 1 << 14))
    runs = []

    def wall_times(fn, n):
        for _ in range(n):
            fn()
        if n != cal.BLOCK_PAIRS:
            return [1.0] * n  # the phase alone (and the collectives after a barrier)
        runs.append(None)
        return [1.5] * (n - 1) + [1.0 + 0.001 * len(runs)]

    monkeypatch.setattr(cal, "wall_times", wall_times)
    monkeypatch.setattr(cal, "_drift", lambda *a: [(1 << 14, 0.01), (1 << 18, 0.03)])

    class OneDimMesh:
        def get_group(self, dim):
            assert dim == "tp"
            return dist.group.WORLD

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = cal._collectives_rank(OneDimMesh(), "tp", 2)
    finally:
        dist.destroy_process_group()
    assert set(out) == {"alone", "in_situ", "in_situ_single", "in_situ_median", "in_situ_mean", "drift"}
    assert {"all_reduce", "all_gather_into_tensor"} <= set(out["in_situ"])
    first = {}
    for kind, rows in out["in_situ"].items():
        assert [b for b, _ in rows] == [1024.0, 16384.0]
        first[kind] = [t for _, t in out["in_situ_single"][kind]]
        for (_, run), single in zip(rows, first[kind]):
            assert run == pytest.approx((7 * 0.5 + single) / 8 - 0.02)  # the first run of each size: the least
            assert 0.0 < single < 0.5
    assert len(runs) >= 12 * 2 * len(out["in_situ"])  # >= 12 runs per size and collective
