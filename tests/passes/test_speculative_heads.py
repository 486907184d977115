"""speculative_heads: heads found from the graph (any module names), base logits untouched (bit for
bit, checked by NumericCheck on the declared output), heads equal lm_head at initialisation, the
defining equation with trained weights, tp plans place each head like lm_head, clear errors."""

from __future__ import annotations

import meshc
import pytest
import torch
from meshc import MeshSpec, NumericCheck, PassManager, capture
from meshc.errors import MeshcError, PassError
from meshc.models import load_model
from meshc.passes.speculative_heads import MedusaHeads, head_keys, pipeline_with_heads

SLOW = pytest.mark.slow  # suite time: llama-tiny covers the default suite
FAMILIES = ["llama-tiny", *(pytest.param(f, marks=SLOW) for f in ("gpt2-tiny", "opt-tiny", "falcon-tiny",
                                                                 "gemma-tiny"))]


def _program(name: str, mesh: str | None = None):
    lm = load_model(name)
    return lm, capture(lm.model, lm.example_inputs, lm.example_kwargs, mesh=MeshSpec.parse(mesh), dynamic_shapes="auto")


@pytest.fixture(scope="module")
def llama():
    return _program("llama-tiny")


@pytest.fixture(scope="module")
def llama_tp():
    return _program("llama-tiny", "tp=2")[1]


@pytest.mark.parametrize("name", FAMILIES)
def test_base_logits_bit_for_bit_and_heads_start_as_lm_head(name, request):
    lm, program = request.getfixturevalue("llama") if name == "llama-tiny" else _program(name)
    check = NumericCheck(atol=0.0)
    out = PassManager("dce,speculative_heads(heads=3),propagate_shapes,lint", [check]).run(program)
    assert [r for r in check.results if r[0].startswith("speculative_heads")] == [("speculative_heads(heads=3)", 0.0)]
    got = out.run_example()
    with torch.no_grad():
        want = lm.model(*lm.example_inputs, **lm.example_kwargs).logits
    assert torch.equal(got.logits, want)
    assert got.medusa_logits.shape == (3, *want.shape)
    for i in range(3):  # W = 0: x + SiLU(0) = x, and P = lm_head
        assert torch.equal(got.medusa_logits[i], want)


def test_defining_equation_with_trained_weights_and_two_blocks(tmp_path, llama):
    """head i = P_i (h + SiLU(W h)) applied `layers` times, against the eager MedusaHeads module."""
    from safetensors.torch import save_file

    lm, program = llama
    g = torch.Generator().manual_seed(0)
    heads = MedusaHeads(lm.model.lm_head.weight.detach(), heads=2, layers=2)
    for p in heads.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    save_file(heads.state_dict(), str(tmp_path / "h.safetensors"))
    out = PassManager(f"dce,speculative_heads(heads=2,layers=2,weights={tmp_path / 'h.safetensors'})").run(program)
    with torch.no_grad():
        hidden = lm.model.model(*lm.example_inputs).last_hidden_state
        torch.testing.assert_close(out.run_example().medusa_logits, heads(hidden), rtol=1e-5, atol=1e-5)
    names = [n.meta["meshc_name"] for n in out.placeholders("parameter") if n.meta["meshc_name"].startswith("medusa")]
    assert names == ["medusa_heads." + k for k in head_keys(2, 2)]


def test_found_from_the_graph_not_from_names():
    class Net(torch.nn.Module):  # no 'lm_head', no 'norm' in any name; output is a bare tensor
        def __init__(self):
            super().__init__()
            self.emb, self.mix = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16)
            self.fin, self.vocab = torch.nn.LayerNorm(16), torch.nn.Linear(16, 50, bias=False)

        def forward(self, ids):
            h = self.emb(ids)
            return self.vocab(self.fin(h + self.mix(h)))

    ids = torch.randint(0, 50, (2, 5))
    out = PassManager("speculative_heads(heads=2)").run(capture(Net().eval(), (ids,)))
    res = out.run(ids)
    assert set(res) == {"logits", "medusa_logits"} and res["medusa_logits"].shape == (2, 2, 5, 50)
    assert "beside %linear" in out.notes[-1] and "vocab.weight" in out.notes[-1]


def test_clear_errors(tmp_path, llama, llama_tp):
    mlp = load_model("mlp")  # no norm before its last linear
    program = capture(mlp.model, mlp.example_inputs)
    with pytest.raises(PassError, match="not a normalised hidden state"):
        PassManager("speculative_heads").run(program)
    _, program = llama
    with pytest.raises(PassError, match="does not exist; train heads"):
        PassManager(f"speculative_heads(weights={tmp_path / 'none.safetensors'})").run(program)
    with pytest.raises(PassError, match="already has Medusa heads"):
        PassManager("speculative_heads,speculative_heads").run(program)
    sharded = llama_tp.clone()
    sharded.plan = "auto"
    with pytest.raises(PassError, match="runs after auto_shard"):
        PassManager("speculative_heads").run(sharded)


@pytest.mark.parametrize("plan", ["auto", pytest.param("megatron", marks=SLOW)])
def test_tp_heads_are_sharded_like_lm_head(plan, llama_tp):
    """On tp=2 (rank 0's program, no processes): each head's projection has lm_head's local shard
    shape and placement, the blocks are replicated, and the model's own parameters keep the plan
    they get without heads."""
    program = llama_tp.clone()
    program.plan = plan
    base = "dce,auto_shard,spmd_partition,lint" if plan == "auto" else "dce,spmd_partition,lint"
    without = PassManager(base).run(program)
    with_heads = PassManager(pipeline_with_heads(base, "heads=2")).run(program)
    shapes = {n.meta["meshc_name"]: tuple(with_heads.state[n.name].shape) for n in with_heads.placeholders("parameter")}
    before = {n.meta["meshc_name"]: tuple(without.state[n.name].shape) for n in without.placeholders("parameter")}
    assert {k: v for k, v in shapes.items() if not k.startswith("medusa")} == before
    for i in range(2):
        assert shapes[f"medusa_heads.{i}.proj.weight"] == shapes["lm_head.weight"]
        assert with_heads.plan.for_param(f"medusa_heads.{i}.proj.weight") == with_heads.plan.for_param("lm_head.weight")
        assert shapes[f"medusa_heads.{i}.blocks.0.weight"] == (128, 128)
    if plan == "auto":  # auto_shard shards this lm_head over the vocabulary: so are the heads
        assert shapes["lm_head.weight"] == (256, 128)


def test_pipeline_with_heads():
    assert pipeline_with_heads("dce,propagate_shapes,lint", "heads=2") == \
        "dce,speculative_heads(heads=2),propagate_shapes,lint"
    assert pipeline_with_heads("dce,auto_shard,spmd_partition,lint") == \
        "dce,auto_shard,speculative_heads,spmd_partition,lint"
    with pytest.raises(MeshcError):
        pipeline_with_heads("dce,ladder_residual(layers=all),lint")
    assert meshc.PASSES["speculative_heads"].preserves_outputs == ("logits",)
