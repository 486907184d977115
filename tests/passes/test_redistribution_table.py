"""The one redistribution table (`meshc.redistribute`): its entries, its prices, its bytes, and
that what auto_shard predicts from it (`Solution.collectives` / `predict_collectives`) is exactly
what spmd_partition emits (`emitted_collectives`), on every rank tried, for auto_shard's plans,
Megatron's (GPT-2's fused c_attn as InterleavedShard) and hand-written plans that force
all_to_all, reduce_scatter and IS <-> S transitions. No processes."""

from __future__ import annotations

import re

import pytest
from meshc import MeshSpec, PassManager
from meshc.collectives import emitted_collectives
from meshc.cost_model import collective_time, get_preset, reduce_scatter_time
from meshc.errors import MeshError
from meshc.passes.auto_shard import parse_budget, solve_sharding
from meshc.passes.spmd_partition import predict_collectives
from meshc.placement import InterleavedShard, Partial, Replicate, Shard, describe
from meshc.plan import make_plan
from meshc.redistribute import Step, plan_steps, step_time, steps

from ..capture_once import captured as capture

MESHES = ["tp=2", "tp=4", "dp=2,tp=2"]
MODELS = ["llama-tiny", "gpt2-tiny"]


# ---- end to end: predicted == emitted ---------------------------------------------------------

@pytest.fixture(scope="module")
def captured():
    """One capture (then dce) per model, once per session (tests/capture_once.py); each test puts
    the program on its own mesh (capture does not depend on the mesh: it only records it)."""
    from meshc.models import load_model

    out = {}
    for name in MODELS:
        loaded = load_model(name)
        out[name] = PassManager("dce").run(capture(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                                                   dynamic_shapes="auto", mesh="tp=2"))
    return out


def _on(program, mesh: str):
    q = program.clone()
    q.mesh = MeshSpec.parse(mesh)
    return q


def _emitted(program, plan, rank: int):
    q = program.clone()
    q.plan, q.rank = plan, rank
    out = PassManager("spmd_partition").run(q)
    assert out.rank == rank and out.plan.hash() == plan.hash()
    return emitted_collectives(out)


def _ranks(program) -> list[int]:
    return [0, program.mesh.size - 1]  # rank 0 and one other (the last: every coordinate non-zero)


def _check_all_ranks(program, plan, predicted):
    assert predicted, "a sharded plan issues collectives (at least the output gathers)"
    for rank in _ranks(program):
        emitted = _emitted(program, plan, rank)
        assert emitted == predicted, (f"rank {rank}: predicted but not emitted {predicted - emitted}; "
                                      f"emitted but not predicted {emitted - predicted}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_auto_shard_prediction_is_what_spmd_partition_emits(captured, model, mesh):
    program = _on(captured[model], mesh)
    solution = solve_sharding(program, budget=parse_budget("auto", program))
    assert solution.plan.params, "auto_shard sharded nothing: the check would be vacuous"
    assert solution.collectives == predict_collectives(program, solution.plan)
    _check_all_ranks(program, solution.plan, solution.collectives)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_megatron_prediction_is_what_spmd_partition_emits(captured, model, mesh):
    program = _on(captured[model], mesh)
    plan = make_plan("megatron", program, program.mesh)
    if model == "gpt2-tiny":  # the fused q|k|v projection: InterleavedShard, really covered
        fused = {f: pls for f, pls in plan.params.items() if any(isinstance(p, InterleavedShard) for p in pls)}
        assert any(f.endswith("c_attn.weight") for f in fused), plan.params
        assert any(f.endswith("c_attn.bias") for f in fused), plan.params
    _check_all_ranks(program, plan, predict_collectives(program, plan))


#: (model, mesh, plan dict, collectives (op, mesh dim) the plan must issue)
HAND_WRITTEN = [
    # gate column-parallel, up row-parallel: gate's S(-1) output meets up's Partial in the mul ->
    # reduce_scatter (P -> S); all_to_all on dp: down_proj row-parallel on dp while its input is
    # dp-sharded on the batch (S(0) -> S(2))
    ("llama-tiny", "dp=2,tp=2",
     {"*.gate_proj.weight": {"tp": "S(0)"}, "*.up_proj.weight": {"tp": "S(1)"}, "*.down_proj.weight": {"dp": "S(1)"}},
     {("reduce_scatter_tensor", "tp"), ("all_to_all_single", "dp"), ("reduce_scatter_tensor", "dp"),
      ("all_gather_into_tensor", "tp"), ("all_gather_into_tensor", "dp")}),
    ("llama-tiny", "tp=4", {"*.gate_proj.weight": "S(0)", "*.up_proj.weight": "S(1)"},
     {("reduce_scatter_tensor", "tp"), ("all_gather_into_tensor", "tp")}),
    # plain S(1) c_attn weight, interleaved bias: the bias goes IS(0,3) -> S(0) (all_gather, chunk)
    ("gpt2-tiny", "tp=2", {"*.c_attn.weight": "S(1)", "*.c_attn.bias": "IS(0,3)"},
     {("all_gather_into_tensor", "tp")}),
    # interleaved weight, plain bias: the bias goes S(0) -> IS(0,3) (all_gather, chunk)
    ("gpt2-tiny", "tp=2", {"*.c_attn.weight": "IS(1,3)", "*.c_attn.bias": "S(0)"},
     {("all_gather_into_tensor", "tp")}),
    ("gpt2-tiny", "dp=2,tp=2", {"*.mlp.c_proj.weight": {"dp": "S(0)"}},
     {("all_to_all_single", "dp"), ("all_reduce", "dp"), ("all_gather_into_tensor", "dp")}),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model,mesh,spec,kinds", HAND_WRITTEN,
                         ids=[f"{m}-{mesh}-{i}" for i, (m, mesh, _, _) in enumerate(HAND_WRITTEN)])
def test_hand_written_plans_prediction_is_what_spmd_partition_emits(captured, model, mesh, spec, kinds):
    program = _on(captured[model], mesh)
    plan = make_plan(spec, program, program.mesh)
    predicted = predict_collectives(program, plan)
    assert {(op, dim) for op, dim, _ in predicted} == kinds
    _check_all_ranks(program, plan, predicted)
    if model == "gpt2-tiny" and mesh == "tp=2":  # the bias transition really is a gather of the whole bias
        biases = [p for p in program.placeholders("parameter") if p.meta["meshc_name"].endswith("c_attn.bias")]
        nbytes = biases[0].meta["val"].numel() * biases[0].meta["val"].dtype.itemsize
        assert len(biases) > 1 and predicted[("all_gather_into_tensor", "tp", nbytes)] == len(biases)  # one per layer


# ---- the table itself -------------------------------------------------------------------------

R, P, S0, S1, IS = Replicate(), Partial(), Shard(0), Shard(1), InterleavedShard(0, 3)
AG, AR, RS, A2A = "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor", "all_to_all_single"

#: (have, want) -> [(op, have, want)] per the module docstring's table; Partial as want: error
TABLE = {
    (R, S0): [("chunk", R, S0)], (R, S1): [("chunk", R, S1)], (R, IS): [("chunk", R, IS)],
    (P, R): [(AR, P, R)], (P, S0): [(RS, P, S0)], (P, S1): [(RS, P, S1)],
    (P, IS): [(AR, P, R), ("chunk", R, IS)],
    (S0, R): [(AG, S0, R)], (S1, R): [(AG, S1, R)], (IS, R): [(AG, IS, R)],
    (S0, S1): [(A2A, S0, S1)], (S1, S0): [(A2A, S1, S0)],
    (S0, IS): [(AG, S0, R), ("chunk", R, IS)], (S1, IS): [(AG, S1, R), ("chunk", R, IS)],
    (IS, S0): [(AG, IS, R), ("chunk", R, S0)], (IS, S1): [(AG, IS, R), ("chunk", R, S1)],
}
ALL = [R, P, S0, S1, IS]


@pytest.mark.parametrize("have", ALL, ids=describe)
@pytest.mark.parametrize("want", ALL, ids=describe)
def test_every_pair_gives_the_documented_steps(have, want):
    if describe(have) == describe(want):
        assert steps(have, want) == []
        return
    if isinstance(want, Partial):
        with pytest.raises(MeshError, match=rf"cannot redistribute a {re.escape(describe(have))} tensor to Partial"):
            steps(have, want)
        return
    got = [(s.op, describe(s.have), describe(s.want)) for s in steps(have, want)]
    assert got == [(op, describe(h), describe(w)) for op, h, w in TABLE[(have, want)]]
    assert all(s.dim == "" and s.nbytes == 0 for s in steps(have, want))  # plan_steps fills those


def test_the_table_covers_every_pair():
    assert len(TABLE) == len(ALL) * (len(ALL) - 1) - (len(ALL) - 1)  # all ordered pairs but x->x and *->P


def test_reduce_scatter_is_priced_as_the_backend_implements_it():
    nbytes = 3 * 2**20
    step = Step(RS, P, S0, "tp", nbytes)
    gloo, nvlink = get_preset("cpu-gloo"), get_preset("h100-nvlink")
    assert gloo.collective_backend == "gloo"
    on_gloo = step_time(step, 4, "cpu-gloo")
    assert on_gloo == collective_time(AR, nbytes, 4, gloo) == step_time(Step(AR, P, R, "tp", nbytes), 4, "cpu-gloo")
    assert on_gloo > reduce_scatter_time(nbytes, 4, gloo)  # so the substitution is visible
    assert step_time(step, 4, "h100-nvlink") == reduce_scatter_time(nbytes, 4, nvlink)
    assert step_time(Step("chunk", R, S0, "tp"), 4, "cpu-gloo") == 0.0
    assert step_time(step, 4, "cpu-gloo", nbytes=2 * nbytes) == collective_time(AR, 2 * nbytes, 4, gloo)


def test_plan_steps_divide_bytes_by_the_other_dims_shards():
    mesh = MeshSpec.parse("dp=2,tp=4")
    shape, item = [8, 16, 32], 4
    full = 8 * 16 * 32 * item

    def got(have, want):
        return [(s.op, s.dim, s.nbytes) for s in plan_steps(have, want, shape, item, mesh)]

    # tp's partial sums of a dp-sharded tensor: each dp half is reduced separately
    assert got((S0, P), (S0, R)) == [(AR, "tp", full // 2)]
    assert got((S0, P), (S0, Shard(2))) == [(RS, "tp", full // 2)]
    # dim 0 first: the dp gather still sees the tp shard, the tp gather then the whole tensor
    assert got((S0, S1), (R, R)) == [(AG, "dp", full // 4), (AG, "tp", full)]
    # all_to_all counts the local operand: other dims' shards and this dim's
    assert got((S0, S1), (S0, Shard(2))) == [(A2A, "tp", full // 2 // 4)]
    # chunks are free and change what later dims see
    assert got((R, S1), (S0, R)) == [("chunk", "dp", 0), (AG, "tp", full // 2)]
    assert got((R, R), (R, R)) == []
    with pytest.raises(MeshError):
        plan_steps((R, R), (R, P), shape, item, mesh)


def test_interleaved_shard_is_its_own_placement():
    assert describe(IS) == "IS(0,3)" and IS != S0 and steps(IS, InterleavedShard(0, 3)) == []
    assert [s.op for s in steps(IS, InterleavedShard(0, 2))] == [AG, "chunk"]  # other groups: regather
