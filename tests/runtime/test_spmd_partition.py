"""spmd_partition without processes: plans found from the graph, the collectives each rank's
program issues, where their waits sit, plan files, and the errors of bad plans and meshes."""

import pytest
import torch
from meshc import MeshSpec, PassManager, capture
from meshc.collectives import collective_name, count_collectives
from meshc.errors import PassError
from meshc.placement import InterleavedShard, Shard, describe, local_shard
from meshc.plan import Plan


def partition(loaded, mesh, plan=None, rank=0):
    program = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs, mesh=MeshSpec.parse(mesh),
                      dynamic_shapes="auto")
    program.plan, program.rank = plan, rank
    return PassManager("dce,spmd_partition,lint").run(program)


@pytest.mark.parametrize("mesh", ["tp=2", "tp=4", "dp=2,tp=2"])
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_megatron_plan_issues_two_all_reduces_per_layer(model, mesh, request):
    loaded = request.getfixturevalue(model)
    program = partition(loaded, mesh)
    counts = count_collectives(program)
    assert counts.pop("all_reduce@tp") == 2 * 4  # 4 layers: attention + MLP
    # the only other collective: data-parallel outputs gathered back to every rank
    assert counts == ({"all_gather_into_tensor@dp": 1} if "dp" in mesh else {})


@pytest.mark.parametrize("model, mesh, rank", [("llama", "dp=2,tp=2", 1), ("gpt2", "tp=4", 3)])
def test_each_rank_value_is_what_the_rank_graph_computes(model, mesh, rank, request):
    """The values spmd_partition records (reused from the global graph where a node keeps its global
    shape, computed again elsewhere) are those of a full fake propagation of the rank's graph:
    dtype, sizes, strides (at their hints) — GPT-2's fused q|k|v included."""
    from meshc.cost_model import size_hint
    from meshc.passes.propagate_shapes import fake_values

    program = partition(request.getfixturevalue(model), mesh, rank=rank)
    fresh = fake_values(program)
    checked = 0
    for node in program.graph.nodes:
        val, want = node.meta.get("val"), fresh.get(node.name)
        if node.op in ("placeholder", "output"):
            continue
        if isinstance(val, (int, torch.SymInt)):  # a size (torch may have specialized it since: an int)
            assert size_hint(val) == size_hint(want), node.name
            continue
        assert type(val) is type(want), node.name
        if isinstance(val, torch.Tensor):
            assert val.dtype == want.dtype, node.name
            assert [size_hint(s) for s in val.shape] == [size_hint(s) for s in want.shape], node.name
            assert [size_hint(s) for s in val.stride()] == [size_hint(s) for s in want.stride()], node.name
            checked += 1
    assert checked > 100


def test_a_dp_block_of_one_row_keeps_the_batch_symbolic(llama):
    """Batch 2 on dp=2: each rank's block is one row, which torch's 0/1 rule would take for the
    constant 1, pinning the batch in the rank's fake values (and `meshc show` and the cost model
    would describe batch 2 only). The rank's output stays 2 x ((s + 1) // 2) rows."""
    assert llama.example_inputs[0].shape[0] == 2
    program = partition(llama, "dp=2,tp=2", rank=1)
    ids = program.placeholders("user")[0].meta["val"]
    assert isinstance(ids.shape[0], torch.SymInt)
    output = next(n for n in program.graph.nodes if n.op == "output")
    logits = [a for a in torch.utils._pytree.tree_leaves(output.args) if isinstance(a, torch.fx.Node)][0]
    assert "//" in str(logits.meta["val"].shape[0])  # the rank's block of the symbolic batch, gathered


def test_megatron_plan_is_found_from_the_graph(llama, gpt2):
    plan = partition(llama, "tp=2").plan
    layer = "model.layers.1."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert plan.params[layer + name + ".weight"] == (Shard(0),), name
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        assert plan.params[layer + name + ".weight"] == (Shard(1),), name
    assert "lm_head.weight" not in plan.params and "model.embed_tokens.weight" not in plan.params
    gplan = partition(gpt2, "tp=2").plan  # GPT-2's fused q|k|v projection: Conv1D weight is [in, out]
    assert gplan.params["transformer.h.0.attn.c_attn.weight"] == (InterleavedShard(1, 3),)
    assert gplan.params["transformer.h.0.attn.c_attn.bias"] == (InterleavedShard(0, 3),)
    assert gplan.params["transformer.h.0.attn.c_proj.weight"] == (Shard(0),)


def test_collectives_issue_at_the_producer_and_wait_at_the_consumer(llama):
    program = partition(llama, "tp=2")
    reduces = [n for n in program.graph.nodes if collective_name(n) == "all_reduce"]
    assert reduces
    for ar in reduces:
        assert ar.prev is ar.args[0]  # issued as soon as its input exists
        (wait,) = ar.users
        assert wait.next in wait.users  # waited right before the first use


def test_rank_programs_differ_only_in_their_shards(mlp):
    p0, p1 = partition(mlp, "tp=2", rank=0), partition(mlp, "tp=2", rank=1)
    assert p0.plan.to_json() == p1.plan.to_json()
    assert p0.gm.code == p1.gm.code  # shards are the state's business, not the graph's


def test_plan_json_round_trip_is_byte_identical(gpt2):
    plan = partition(gpt2, "dp=2,tp=2").plan
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json() and again.hash() == plan.hash()
    assert partition(gpt2, "dp=2,tp=2").plan.to_json() == plan.to_json()


def test_parallelize_module_style_plan(llama):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"model.layers.*.mlp.gate_proj": ColwiseParallel(), "model.layers.*.mlp.up_proj": "colwise",
            "model.layers.*.mlp.down_proj": RowwiseParallel()}
    program = partition(llama, "tp=2", plan=plan)
    assert count_collectives(program) == {"all_reduce@tp": 4}  # MLPs only; attention replicated
    assert program.plan.params["model.layers.0.mlp.down_proj.weight"] == (Shard(1),)


def test_glob_plan_and_replication_fallback_are_correct_placements(mlp):
    program = partition(mlp, "tp=2", plan={"up.weight": "S(0)", "up.bias": "S(0)"})
    counts = count_collectives(program)  # up's sharded output must be gathered for gelu -> mid
    assert counts == {"all_gather_into_tensor@tp": 1}


def test_tied_weights_must_share_a_placement(gpt2):
    with pytest.raises(PassError, match="tied weights .*wte.weight.*lm_head.weight|tied weights .*lm_head"):
        partition(gpt2, "tp=2", plan={"transformer.wte.weight": "S(1)"})


def test_a_size_the_mesh_does_not_divide_names_the_tensor(llama):
    """A plan that asks to shard what the mesh does not divide is an error naming the tensor; the
    Megatron plan shards only what divides, so on tp=3 it keeps llama-tiny replicated and says why."""
    with pytest.raises(PassError, match=r"q_proj.weight \[128, 128\]: dim 0 \(size 128\) does not divide over mesh "
                                        r"dim 'tp'=3"):
        partition(llama, "tp=3", plan={"*.q_proj.weight": "S(0)"})
    program = partition(llama, "tp=3", plan="megatron")
    assert "3 does not divide 8 heads or 128 features" in "\n".join(program.notes)


def test_plan_that_matches_nothing(mlp):
    with pytest.raises(PassError, match="plan entry 'nope.*' matches no parameter"):
        partition(mlp, "tp=2", plan={"nope.*": "S(0)"})


def test_interleaved_shard_gives_each_rank_its_slice_of_every_block():
    full = torch.arange(12).reshape(1, 12)  # blocks q|k|v of 4 columns each
    parts = [local_shard(full, (InterleavedShard(1, 3),), (r,), (2,)) for r in range(2)]
    assert parts[0].tolist() == [[0, 1, 4, 5, 8, 9]] and parts[1].tolist() == [[2, 3, 6, 7, 10, 11]]
    assert describe(InterleavedShard(1, 3)) == "IS(1,3)"


def test_checkpoint_reader_reads_the_same_slices(tmp_path):
    from meshc.runtime.sharded import _read_local
    from safetensors import safe_open
    from safetensors.torch import save_file

    w = torch.randn(6, 12)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    cases = [(Shard(0),), (Shard(1),), (InterleavedShard(1, 3),)]
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as h:
        for pls in cases:
            node = type("N", (), {"meta": {"meshc_placement": pls}})()
            for r in range(2):
                got = _read_local(h.get_slice("w"), node, (r,), (2,))
                assert torch.equal(got, local_shard(w, pls, (r,), (2,))), (pls, r)


def test_a_batch_dp_does_not_divide_is_an_input_error_naming_the_mesh(llama):
    from meshc.errors import InputError

    program = partition(llama, "dp=2,tp=2", rank=3)
    ids = llama.example_inputs[0]
    program.bind_inputs((ids[:2],), dict(llama.example_kwargs or {}))  # 2 divides over dp=2
    with pytest.raises(InputError, match=r"dim 0 of size 3 is split over mesh dim 'dp'=2 \(mesh 'dp=2,tp=2'\), "
                                         r"which does not divide it; pass a size that is a multiple of 2"):
        program.bind_inputs((torch.cat([ids, ids])[:3],), dict(llama.example_kwargs or {}))
