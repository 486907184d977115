"""ladder_residual against its defining equations on real HF models, the layers it selects, its
errors, and the overlap it buys in a tensor-parallel rank program."""

import pytest
import torch
from meshc import MeshSpec, PassManager, capture
from meshc.collectives import collective_name
from meshc.errors import MeshcError, PassError
from meshc.passes.ladder_residual import select_layers


def _capture(loaded, mesh=None):
    return capture(loaded.model, loaded.example_inputs, loaded.example_kwargs, mesh=MeshSpec.parse(mesh),
                   dynamic_shapes="auto")


def _run(program, loaded, ids):
    with torch.no_grad():
        return program.run(ids, **loaded.example_kwargs).logits


def llama_ladder_reference(model, ids, selected: set[int], delay: int = 1) -> torch.Tensor:
    """The recurrence x_k = x_{k-1} + h_k(x_{k-1-delay}) for sub-layers in `selected`, by hand."""
    m = model.model
    x = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cos_sin = m.rotary_emb(x, pos)
    xs, k = [x], 0
    for layer in m.layers:
        subs = [(layer.input_layernorm,
                 lambda h, layer=layer: layer.self_attn(hidden_states=h, position_embeddings=cos_sin,
                                                        attention_mask=None)[0]),
                (layer.post_attention_layernorm, layer.mlp)]
        for norm, body in subs:
            k += 1
            src = xs[max(0, k - 1 - delay)] if k in selected else xs[k - 1]
            xs.append(xs[k - 1] + body(norm(src)))
    return model.lm_head(m.norm(xs[-1]))


def gpt2_ladder_reference(model, ids, selected: set[int], delay: int = 1) -> torch.Tensor:
    t = model.transformer
    x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1])[None])
    xs, k = [x], 0
    for block in t.h:
        for norm, body in ((block.ln_1, lambda h, b=block: b.attn(h)[0]), (block.ln_2, block.mlp)):
            k += 1
            src = xs[max(0, k - 1 - delay)] if k in selected else xs[k - 1]
            xs.append(xs[k - 1] + body(norm(src)))
    return model.lm_head(t.ln_f(xs[-1]))


REFERENCES = {"llama": llama_ladder_reference, "gpt2": gpt2_ladder_reference}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_delay_zero_is_bit_identical(model, request):
    loaded = request.getfixturevalue(model)
    program = _capture(loaded)
    ladder = PassManager("ladder_residual(delay=0)").run(program)
    ids = loaded.inputs_at(2, 16)[0]
    assert torch.equal(_run(program, loaded, ids), _run(ladder, loaded, ids))


@pytest.mark.parametrize("layers, selected", [("all", set(range(1, 9))), ("last:2", {5, 6, 7, 8}), ("1", {3, 4})])
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_delay_one_matches_the_hand_written_recurrence(model, layers, selected, request):
    loaded = request.getfixturevalue(model)
    ladder = PassManager(f"dce,ladder_residual(layers={layers})").run(_capture(loaded))
    for seq in (16, 33):  # one capture, two lengths
        ids = loaded.inputs_at(2, seq)[0]
        with torch.no_grad():
            ref = REFERENCES[model](loaded.model, ids, selected)
            plain = loaded.model(ids, use_cache=False).logits
        got = _run(ladder, loaded, ids)
        assert (got - ref).abs().max().item() <= 1e-6
        assert (got - plain).abs().max().item() > 1e-4  # it really computes something else


def test_the_pass_reports_what_it_rewired(llama):
    ladder = PassManager("ladder_residual(layers=last:2)").run(_capture(llama))
    assert any("rewired sub-layers [5, 6, 7, 8]" in n and "4 layers / 8 sub-layers" in n for n in ladder.notes)


def test_layer_selection():
    assert select_layers("last:2", 4) == [2, 3] and select_layers("first:1", 4) == [0]
    assert select_layers("1-2", 4) == [1, 2] and select_layers("all", 3) == [0, 1, 2]
    for bad in ("last:5", "9", "odd"):
        with pytest.raises(MeshcError, match="layers="):
            select_layers(bad, 4)


def test_a_graph_without_a_residual_stream_says_where_it_broke(mlp):
    with pytest.raises(PassError, match="no residual add"):
        PassManager("ladder_residual").run(_capture(mlp))

    class OneResidual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(x + self.f(x))

    program = capture(OneResidual(), (torch.randn(2, 8),))
    with pytest.raises(PassError, match=r"only 1 sub-layer.*goes to %relu"):
        PassManager("ladder_residual").run(program)


def test_under_tp_each_all_reduce_overlaps_the_next_sub_layer(llama):
    """Rank program order: the all-reduce of sub-layer k is issued before sub-layer k+1's first
    linear, and its wait comes after that linear, right before the residual add that needs it."""
    program = _capture(llama, "tp=2")
    ladder = PassManager("dce,ladder_residual(layers=all),spmd_partition").run(program)
    nodes = list(ladder.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    reduces = [n for n in nodes if collective_name(n) == "all_reduce"]
    linears = [n for n in nodes if n.target in (torch.ops.aten.linear.default,)]
    assert len(reduces) == 8
    for ar in reduces[:-1]:  # the last one has no next sub-layer
        (wait,) = ar.users
        later_linears = [ln for ln in linears if pos[ln] > pos[ar]]
        assert later_linears and pos[later_linears[0]] < pos[wait], "next sub-layer did not overlap the all-reduce"
        assert any(u.target is torch.ops.aten.add.Tensor for u in wait.users)

    standard = PassManager("dce,spmd_partition").run(_capture(llama, "tp=2"))
    order = list(standard.graph.nodes)
    for ar in [n for n in order if collective_name(n) == "all_reduce"]:
        (wait,) = ar.users  # without ladder no matmul can run between the issue and the wait
        between = order[order.index(ar) + 1:order.index(wait)]
        assert not [n for n in between if n.target is torch.ops.aten.linear.default]
