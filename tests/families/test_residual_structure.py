"""Residual structure found from the graph on the decoder families: parallel blocks (attention and
MLP off one stream, one add per layer) are one sub-layer per layer, so ladder_residual selects the
right layers and matches the ladder recurrence; a post-norm decoder gets an error naming its norm."""

from __future__ import annotations

import pytest
import torch
from meshc import PassManager, capture
from meshc.errors import NodeError, PassError
from meshc.families import FAMILIES, VOCAB
from meshc.passes.residual_stream import find_residual_stream


def _model(family: str, **overrides) -> torch.nn.Module:
    base = FAMILIES[family].build()
    cfg = base.config
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return type(base)(cfg).eval()


def _capture(model):
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return capture(model, (ids,), {"use_cache": False}, dynamic_shapes="auto")


def _layers_of(model) -> torch.nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))


def ladder_reference(model, ids, selected: set[int], delay: int = 1) -> torch.Tensor:
    """The ladder on a parallel-block model by hooks: block k (1-based) adds its update
    h_k = block(src) - src computed from src = x_(k-1-delay) (k selected) or x_(k-1)."""
    xs, hooks = [], []

    def pre(index):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            xs.append(x)
            src = xs[max(0, index - delay)] if index + 1 in selected else x
            mod._ladder = (x, src)
            return ((src, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": src})
        return hook

    def post(mod, args, kwargs, out):
        x, src = mod._ladder
        y = out[0] if isinstance(out, tuple) else out
        y = x + (y - src)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    for i, block in enumerate(_layers_of(model)):
        hooks.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["gptneox-tiny", *(pytest.param(f, marks=pytest.mark.slow)
                                                     for f in ("gptj-tiny", "falcon-tiny"))])
def test_parallel_blocks_are_one_sub_layer_per_layer(family):
    model = _model(family, num_hidden_layers=3)
    program = _capture(model)
    stream = find_residual_stream(program)
    assert stream.layers() == [[1], [2], [3]]
    ladder = PassManager("dce,ladder_residual(layers=last:2)").run(program)
    assert any("3 layers / 3 sub-layers" in n and "rewired sub-layers [2, 3]" in n for n in ladder.notes), ladder.notes
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(11))  # captured at 8
    with torch.no_grad():
        got = ladder.run(ids, use_cache=False).logits
        plain = model(ids, use_cache=False).logits
    ref = ladder_reference(model, ids, selected={2, 3})
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-4  # it really computes something else


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["qwen2-tiny", "olmo2-tiny"])
def test_sequential_blocks_pair_attention_and_mlp(family, one_device_program):
    """Pre-norm (Qwen2) and norm-after-sub-layer (OLMo-2: x + Norm(F(x))) keep a residual stream."""
    stream = find_residual_stream(one_device_program(family)[1])
    assert stream.layers() == [[1, 2], [3, 4]]
    assert [stream.attends(k) for k in (1, 2, 3, 4)] == [True, False, True, False]


@pytest.mark.timeout(120)
def test_post_norm_decoder_names_the_norm_that_breaks_the_stream():
    program = _capture(_model("opt-tiny", do_layer_norm_before=False))
    with pytest.raises(PassError, match=r"post-norm block.*residual add %add.*pre-norm blocks") as info:
        PassManager("ladder_residual").run(program)
    assert isinstance(info.value.__cause__, NodeError)
    text = str(info.value)
    assert "%layer_norm = " in text and "module 'model.decoder.layers.0.self_attn_layer_norm'" in text, text
    assert "modeling_opt.py" in text and "self.self_attn_layer_norm(hidden_states)" in text, text


@pytest.mark.timeout(120)
def test_a_stream_that_changes_shape_is_followed_and_ladder_names_the_reshape(one_device_program):
    """OPT runs its MLP on the stream flattened to [tokens, hidden]: the stream passes through that
    reshape (so pipeline stages cut at its sub-layers), and ladder_residual, which would feed one
    shape into the other, names the node."""
    program = one_device_program("opt-tiny")[1]
    stream = find_residual_stream(program)
    assert stream.layers() == [[1, 2], [3, 4]]
    assert [len(x.meta["val"].shape) for x in stream.xs] == [3, 2, 3, 2, 2]  # x_4 = the last add, before the view back
    with pytest.raises(PassError, match=r"sub-layer 2 reads the residual stream in shape .* reshapes its stream"
                                        r"(.|\n)*at node %(view|reshape|_unsafe_view).*modeling_opt.py"):
        PassManager("ladder_residual").run(program)
    staged = PassManager("pipeline_partition(stages=2)").run(program)
    assert any("residual-stream boundaries" in n for n in staged.notes), staged.notes
