import meshc
import pytest
import sympy
import torch
from meshc.errors import CaptureError

from ..conftest import ids


def test_llama_program_structure(llama):
    p = meshc.capture(llama.model, llama.example_inputs, llama.example_kwargs, dynamic_shapes="auto")
    kinds = {n.meta["meshc_input"] for n in p.placeholders()}
    assert kinds == {"parameter", "buffer", "user"}
    names = {n.meta["meshc_name"] for n in p.placeholders("parameter")}
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert [n.meta["meshc_name"] for n in p.placeholders("user")] == ["args[0]", "kwargs['use_cache']"]
    # every parameter's tensor is the model's own object
    params = dict(llama.model.named_parameters())
    for n in p.placeholders("parameter"):
        assert p.state[n.name] is params[n.meta["meshc_name"]]
    # the sequence dim is a sympy symbol visible in node metadata
    seq = p.placeholders("user")[0].meta["val"].shape[1]
    assert isinstance(seq.node.expr, sympy.Symbol)


def test_static_capture_has_int_sizes(llama):
    p = meshc.capture(llama.model, llama.example_inputs, llama.example_kwargs)
    assert list(p.placeholders("user")[0].meta["val"].shape) == [2, 16]


def test_gpt2_tied_weights_stay_one_tensor(gpt2):
    p = meshc.capture(gpt2.model, gpt2.example_inputs, gpt2.example_kwargs)
    groups = p.tied_groups()
    assert len(groups) == 1
    a, b = groups[0]
    assert p.state[a] is p.state[b] is gpt2.model.lm_head.weight


def test_output_structure_is_the_models(llama):
    p = meshc.capture(llama.model, llama.example_inputs, llama.example_kwargs)
    out = p.run_example()
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert torch.equal(out.logits, llama.model(*llama.example_inputs, use_cache=False).logits)


def test_missing_example_inputs_is_an_error(mlp):
    with pytest.raises(CaptureError, match="no example inputs.*example_inputs="):
        meshc.capture(mlp.model, None)


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # the line the error must point at
            return y * 2
        return y


def test_data_dependent_control_flow_names_the_source_line():
    with pytest.raises(CaptureError) as e:
        meshc.capture(DataDependent(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "test_capture.py" in msg and "if y.sum() > 0" in msg
    assert "torch.where" in msg  # says what to do


def test_hf_default_use_cache_says_what_to_pass(llama):
    with pytest.raises(CaptureError, match=r"example_kwargs=\{'use_cache': False\}"):
        meshc.capture(llama.model, llama.example_inputs)


def test_make_fx_fallback_when_export_fails(mlp, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("export is unavailable for this module")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.warns(UserWarning, match="falling back to make_fx"):
        p = meshc.capture(mlp.model, mlp.example_inputs)
    assert {n.meta["meshc_input"] for n in p.placeholders()} == {"parameter", "user"}
    x = mlp.example_inputs[0]
    assert (p.run(x) - mlp.model(x)).abs().max() <= 1e-6


def test_capture_does_not_mutate_the_model(gpt2):
    before = {k: v.clone() for k, v in gpt2.model.state_dict().items()}
    meshc.capture(gpt2.model, (ids(1, 8),), gpt2.example_kwargs)
    after = gpt2.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_program_as_trainable_module_keeps_ties_and_trains(gpt2):
    import meshc

    program = meshc.capture(gpt2.model, gpt2.example_inputs, gpt2.example_kwargs, dynamic_shapes="auto")
    module = program.to_module()
    n_model = sum(p.numel() for p in gpt2.model.parameters())  # tied wte/lm_head counted once
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == n_model
    ids = gpt2.inputs_at(3, 20)[0]
    with torch.no_grad():
        assert torch.equal(module(ids).logits, gpt2.model(ids, use_cache=False).logits)
    module(ids).logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    state = module.export_state()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()  # still tied
    assert set(state) == {k for k, _ in gpt2.model.named_parameters()} | {"lm_head.weight"}
