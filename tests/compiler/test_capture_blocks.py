"""Block-reuse capture (meshc.capture_blocks) gives the graph, plan and outputs of a full capture."""

import meshc
import pytest
import torch
from meshc.capture_blocks import capture_reusing_blocks, find_block_list
from meshc.passes.auto_shard import group_identical_rows, parse_budget, solve_sharding

KW = {"use_cache": False}


def _llama(layers: int, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pair():
    """(model, full capture, block-reuse capture) of a 4-layer Llama on tp=2."""
    model = _llama(4)
    ids = torch.randint(0, 256, (2, 8))
    full = meshc.capture(model, (ids,), KW, dynamic_shapes="auto", mesh="tp=2", reuse_blocks=False)
    reused = meshc.capture(model, (ids,), KW, dynamic_shapes="auto", mesh="tp=2", reuse_blocks=True)
    return model, full, reused


def test_same_graph_and_placeholders_as_full_capture(pair):
    model, full, reused = pair
    assert any("traced 2 of 4 identical blocks" in n for n in reused.notes)
    assert not any("capture_blocks" in n for n in full.notes)
    ops = lambda p: [(n.op, str(n.target)) for n in p.graph.nodes]  # noqa: E731
    assert ops(reused) == ops(full)
    names = lambda p: [n.meta["meshc_name"] for n in p.placeholders()]  # noqa: E731
    assert names(reused) == names(full)
    for n in reused.placeholders("parameter"):  # every placeholder is fed the model's own tensor
        assert reused.state[n.name] is model.get_parameter(n.meta["meshc_name"])
    paths = {n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0]
             for n in reused.graph.nodes if n.op == "call_function" and n.meta.get("nn_module_stack")}
    assert {f"model.layers.{i}.mlp.down_proj" for i in range(4)} <= paths


def test_same_outputs_as_eager_at_two_lengths(pair):
    model, _, reused = pair
    with torch.no_grad():
        for shape in ((2, 8), (1, 13)):
            ids = torch.randint(0, 256, shape)
            torch.testing.assert_close(reused.run(ids, **KW).logits, model(ids, **KW).logits, rtol=0, atol=0)


def test_same_plan_as_full_capture(pair):
    _, full, reused = pair
    plans = []
    for p in (full, reused):
        p = meshc.PassManager("dce").run(p)
        sol = solve_sharding(p, parse_budget("auto", p), "h100-nvlink")
        plans.append((sol.plan.params, round(sol.cost, 12), sol.collectives))
    assert plans[0] == plans[1]


def test_compile_uses_block_reuse_at_depth():
    model = _llama(8, hidden=32)
    ids = torch.randint(0, 256, (1, 6))
    compiled = meshc.compile(model, example_inputs=(ids,), example_kwargs=KW)
    assert "traced 2 of 8 identical blocks of model.layers" in compiled.report
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, **KW).logits, model(ids, **KW).logits)


def test_blocks_that_differ_are_captured_whole():
    model = _llama(4)
    model.model.layers[2].self_attn.scaling = 0.5  # a per-layer difference: the blocks are not identical
    assert find_block_list(model, 3) is None
    ids = torch.randint(0, 256, (1, 5))
    assert capture_reusing_blocks(model, (ids,), KW, force=True) is None
    assert len(model.model.layers) == 4  # the model is left as it was


def test_explain_groups_identical_layers():
    rows = [["embed", "0.0", "0.0", "-", "R"]] + [[f"m.layers.{i}", "5.0", "1.0", "ar x2", "q=S(0)"] for i in range(80)]
    rows += [["m.norm", "0.1", "0.0", "-", "R"]]
    out = group_identical_rows(rows)
    assert [r[0] for r in out] == ["embed", "m.layers.0-79 (80 identical, each)", "m.norm"]
    rows[5][1] = "6.0"  # layer 4 differs: three runs
    assert [r[0] for r in group_identical_rows(rows)][1:4] == ["m.layers.0-3 (4 identical, each)", "m.layers.4",
                                                               "m.layers.5-79 (75 identical, each)"]
