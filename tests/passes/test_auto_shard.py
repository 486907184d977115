"""auto_shard: at least as good as Megatron under the same memory, pure data parallel when memory
allows, deterministic, explainable, clear about infeasible constraints, and correct end to end."""

import pytest
from meshc import MeshSpec, PassManager, capture
from meshc.collectives import count_collectives
from meshc.cost_model import value_bytes as _nbytes
from meshc.errors import MeshcError
from meshc.passes.auto_shard import explain, solve_sharding
from meshc.placement import Shard, describe
from meshc.plan import make_plan
from meshc.runtime.run_on_mesh import run_on_mesh

from ..capture_once import captured


def _program(loaded, mesh, fresh=False):
    """The model captured (once per session unless `fresh`: tests/capture_once.py) and dce'd."""
    return PassManager("dce").run((capture if fresh else captured)(
        loaded.model, loaded.example_inputs, loaded.example_kwargs, mesh=MeshSpec.parse(mesh), dynamic_shapes="auto"))


def _per_rank_bytes(program, plan):
    n = program.mesh.sizes[-1]
    return sum(_nbytes(p) / (n if any(isinstance(x, Shard) for x in plan.for_param(p.meta["meshc_name"])) else 1)
               for p in program.placeholders("parameter"))


def _collective_bytes(program, plan):
    q = program.clone()
    q.plan = plan
    out = PassManager("spmd_partition").run(q)
    total = 0
    for node in out.graph.nodes:
        name = getattr(node.target, "_opname", "")
        if name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
            # the full tensor: a gather's result, a reduce-scatter's input, an all-reduce's either
            full = _nbytes(node.args[0] if name == "reduce_scatter_tensor" else node)
            total += 2 * full if name == "all_reduce" else full  # ring all-reduce moves twice the bytes
    return total


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_at_least_as_good_as_megatron_under_its_memory(model, request):
    program = _program(request.getfixturevalue(model), "tp=4")
    megatron = make_plan("megatron", program, program.mesh)
    budget = _per_rank_bytes(program, megatron)  # Megatron's per-rank parameter bytes (≈ 1/4 of the layers)
    base = solve_sharding(program, preset="h100-nvlink", fixed_plan=megatron)
    auto = solve_sharding(program, budget=budget, preset="h100-nvlink")
    assert auto.status == "optimal"
    assert auto.cost <= base.cost + 1e-12
    assert _per_rank_bytes(program, auto.plan) <= budget
    assert _collective_bytes(program, auto.plan) <= _collective_bytes(program, megatron)
    assert auto.shared_nodes > 0  # repeated layers reuse the first layer's variables


def test_data_parallel_without_budget_needs_no_collectives_inside_the_forward(mlp):
    program = _program(mlp, "dp=4")
    sol = solve_sharding(program)
    assert sol.plan.params == {}  # every parameter replicated
    q = program.clone()
    q.plan = sol.plan
    counts = count_collectives(PassManager("spmd_partition").run(q))
    assert counts == {"all_gather_into_tensor@dp": 1}  # only the outputs, gathered back once


def test_plan_is_deterministic(gpt2):
    program = _program(gpt2, "tp=2")
    a = solve_sharding(program, budget=0.6, preset="h100-nvlink")
    b = solve_sharding(_program(gpt2, "tp=2", fresh=True), budget=0.6, preset="h100-nvlink")  # a second capture
    assert a.plan.to_json() == b.plan.to_json()


def test_infeasible_constraints_name_a_minimal_conflict(mlp):
    program = _program(mlp, "tp=2")
    pins = {"up.weight": "R", "mid.weight": "R", "down.bias": "R"}  # only mid.weight's cannot fit the budget
    conflict = r"no plan satisfies .*Conflicting constraints: mid.weight \(node %p_mid_weight\) pinned R\. These pins"
    with pytest.raises(MeshcError, match=conflict + " need 0.25 MiB") as e:
        solve_sharding(program, budget=0.6, pin=pins)
    assert "up.weight" not in str(e.value) and "down.bias" not in str(e.value)
    with pytest.raises(MeshcError, match=r"even sharding every parameter that can be sharded leaves 0.19 MiB"):
        solve_sharding(program, budget=0.3)
    with pytest.raises(MeshcError, match=r"cannot pin up.bias to S\(1\).*possible placements are R, S\(0\)"):
        solve_sharding(program, pin={"up.bias": "S(1)"})


def test_explain_lists_layers_and_alternatives(llama):
    program = _program(llama, "tp=2")
    sol = solve_sharding(program, budget=0.6, preset="h100-nvlink")
    text = explain(sol, solve_sharding(program, preset="h100-nvlink",
                                       fixed_plan=make_plan("megatron", program, program.mesh)))
    assert "model.layers.0" in text and "megatron plan:" in text and "total on 'tp': compute" in text
    linear = next(n for n in sol.chosen if n.name.startswith("linear"))
    assert "strategies, cheapest first" in explain(sol, node_name=linear.name)


def _llama(layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_integer_program_does_not_grow_with_depth():
    import torch

    ids = torch.randint(0, 256, (2, 8))
    sols = []
    for layers in (3, 9):
        program = PassManager("dce").run(capture(_llama(layers), (ids,), {"use_cache": False},
                                                 mesh=MeshSpec.parse("tp=4"), dynamic_shapes="auto"))
        sols.append(solve_sharding(program, budget=0.4, preset="h100-nvlink"))
    assert sols[0].variables == sols[1].variables  # layers past the second reuse its variables
    assert sols[1].shared_nodes > sols[0].shared_nodes
    a, b = (s.plan.params for s in sols)  # and every layer gets the same placements
    assert {k.replace("layers.8", "layers.2"): v for k, v in b.items() if "layers.8." in k} == \
        {k: v for k, v in a.items() if "layers.2." in k}


def test_two_dim_mesh_solves_every_dim(llama):
    program = _program(llama, "dp=2,tp=2")
    sol = solve_sharding(program, budget=0.6, preset="h100-nvlink")
    assert [d.dim for d in sol.dims] == ["tp", "dp"]  # the tensor-parallel dim first
    assert sol.plan.params and all(describe(p[0]) == "R" for p in sol.plan.params.values())  # dp: replicas
    assert all(describe(p) == "S(0)" for p in sol.plan.for_input("args[0]")[:1])  # batch split on dp
    assert sol.cost == sum(d.cost for d in sol.dims)


@pytest.mark.timeout(300)
def test_auto_shard_end_to_end_equals_eager():
    r = run_on_mesh("gpt2-tiny", "tp=2", iters=1, timeout=240,
                    pipeline="dce,auto_shard(budget=0.6,preset=h100-nvlink),spmd_partition,lint")
    assert r["max_abs_error"] <= 1e-5, r["checks"]
    assert "auto_shard: optimal" in r["report"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, mesh", [pytest.param("llama-tiny", "tp=4", marks=pytest.mark.slow),  # 4 ranks: slow
                                         pytest.param("gpt2-tiny", "dp=2,tp=2", marks=pytest.mark.slow)])
def test_compile_uses_auto_shard_by_default_and_equals_eager(model, mesh):
    r = run_on_mesh(model, mesh, iters=1, timeout=240)  # compile()'s default plan
    assert r["max_abs_error"] <= 1e-5, r["checks"]
    assert "auto_shard: optimal" in r["report"] and "parameters sharded" in r["report"]


def test_plan_file_is_keyed_by_the_graph_and_exports_to_parallelize_module(llama, mlp, tmp_path):
    from meshc.errors import MeshError
    from meshc.plan import Plan
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    program = _program(llama, "tp=2")
    plan = make_plan("megatron", program, program.mesh)
    plan.save(tmp_path / "plan.json", program)
    assert Plan.load(tmp_path / "plan.json", _program(llama, "tp=2", fresh=True)).to_json() == plan.to_json()
    with pytest.raises(MeshError, match="was made for graph .* but this program's graph is"):
        Plan.load(tmp_path / "plan.json", _program(mlp, "tp=2"))
    tp = plan.to_parallelize_module()
    assert isinstance(tp["model.layers.0.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(tp["model.layers.3.mlp.down_proj"], RowwiseParallel)
    assert len(tp) == 7 * 4


@pytest.mark.parametrize("name,mesh", [("gptj-tiny", "dp=2,tp=2"), ("phi3-tiny", "tp=2")])
def test_auto_plans_never_nest_shards_or_mismatch_interleaved_contractions(name, mesh):
    """Regressions (both gave wrong logits): GPT-J's dp solve sharded a tensor dim tp already
    sharded; Phi-3's down_proj took an interleaved weight against a plainly sharded activation."""
    import torch
    from meshc.models import load_model
    from meshc.passes import sharding_rules as rules
    from meshc.passes.auto_shard import parse_budget
    from meshc.placement import InterleavedShard, Replicate, Shard

    lm = load_model(name)
    program = PassManager("dce").run(capture(lm.model, lm.example_inputs, lm.example_kwargs,
                                             mesh=MeshSpec.parse(mesh), dynamic_shapes="auto"))
    sol = solve_sharding(program, parse_budget("auto", program))
    for fqn, pls in sol.plan.params.items():
        dims = [p.dim for p in pls if isinstance(p, Shard)]
        assert len(dims) == len(set(dims)), (fqn, pls)
    linears = [n for n in program.graph.nodes if n.target is torch.ops.aten.linear.default]
    w = next(n.args[1] for n in linears)
    decision = rules.decide(linears[0], lambda a: InterleavedShard(1, 2) if a is w else Replicate())
    assert decision.needs[linears[0].args[0]] == InterleavedShard(linears[0].args[0].meta["val"].dim() - 1, 2)
