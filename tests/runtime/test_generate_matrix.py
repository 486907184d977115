"""Greedy generation equals Hugging Face's `model.generate(do_sample=False)` (its default cache)
for 20 left-padded prompts x 64 new tokens, per family and mesh: one device, tp=2, pp=2 and
dp=2,tp=2 (the KV cache sharded with the heads on tp, split by batch on dp, kept per stage on pp).

Tokens are compared in each row up to the first step where the reference's top-2 logit margin is
below 1e-4 (a near-tie either side may break); those rows are counted and printed. Every rank of a
mesh must emit the same tokens. The default suite runs one device on opt-tiny and tp=2 on
llama-tiny; the rest of the family x mesh matrix runs under `-m slow`.
"""

from __future__ import annotations

import meshc
import pytest
import torch
from meshc.errors import InputError
from meshc.models import load_model

PROMPTS, NEW, CACHE = 20, 64, 80
FAMILIES = ["llama-tiny", "gpt2-tiny", "reference-lm", "qwen2-tiny", "gemma-tiny", "opt-tiny", "gptneox-tiny",
            "phi3-tiny", "falcon-tiny", "olmo2-tiny", "gptj-tiny"]
DEFAULT = {("opt-tiny", "1"), ("llama-tiny", "tp=2")}
MESHES = ["1", "tp=2", "pp=2", "dp=2,tp=2"]


def prompts(name: str, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """20 prompts of 3..12 tokens, left-padded into one batch (reference-lm: byte prompts from its own code)."""
    g = torch.Generator().manual_seed(11)
    if name == "reference-lm":
        from meshc.reference_lm import encode

        text = "def main(argv):\n    import os, sys\n    class Parser(object):\n        return self.value + 1\n"
        starts = torch.randint(0, len(text) - 12, (PROMPTS,), generator=g).tolist()
        rows = [encode(text[s:s + int(torch.randint(3, 13, (1,), generator=g))]) for s in starts]
    else:
        rows = [torch.randint(3, vocab, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g)
                for _ in range(PROMPTS)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    return ids, mask


def compare(model, ids, mask, got: torch.Tensor) -> int:
    """Assert `got` equals HF greedy generate up to each row's first near-tie; return the near-tie rows."""
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                             eos_token_id=None)
    top2 = torch.stack([step.float().topk(2, dim=-1).values for step in ref.logits], 1)
    ties = (top2[..., 0] - top2[..., 1]) < 1e-4
    prompt, near = ids.shape[1], 0
    for row in range(ids.shape[0]):
        upto = int(ties[row].nonzero()[0]) if ties[row].any() else NEW
        near += bool(ties[row].any())
        assert torch.equal(got[row, prompt:prompt + upto], ref.sequences[row, prompt:prompt + upto]), (
            f"row {row}: meshc {got[row, prompt:].tolist()} != HF {ref.sequences[row, prompt:].tolist()} "
            f"(compared up to step {upto})")
    return near


def generate_on(device_mesh, name: str) -> tuple[list, int, list, int, int]:
    """This rank's tokens, near-tie rows, shapes of the cache tensors it really holds, the model's
    K/V heads and its number of cache tensors."""
    torch.set_num_threads(1)
    loaded = load_model(name, batch=2, seq=8)
    model = loaded.model
    ids, mask = prompts(name, model.config.vocab_size)
    compiled = meshc.compile(model, device_mesh, example_inputs=loaded.example_inputs, max_cache_len=CACHE,
                             max_batch_size=PROMPTS)
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    near = compare(model, ids, mask, out)
    if compiled.program.mesh.dp > 1:
        with pytest.raises(InputError, match="does not divide over the mesh's data-parallel size"):
            compiled.generate(ids[:1], max_new_tokens=2)
    decoder = compiled.decoder
    held = [tuple(c.shape) for c in decoder.cache if c.stride(0)]  # another stage's layers: zero-stride stand-ins
    return out.tolist(), near, held, decoder.layout.kv_shapes[0][0][0], len(decoder.cache)


def _params():
    for mesh in MESHES:
        for name in FAMILIES:
            slow = (name, mesh) not in DEFAULT
            yield pytest.param(name, mesh, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{mesh}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,mesh", list(_params()))
def test_greedy_matches_hf_on_every_mesh(name, mesh):
    if mesh == "1":
        near = generate_on(None, name)[1]
        print(f"{name} one device: {near} of {PROMPTS} rows compared only up to a near-tie")
        return
    per_rank = meshc.launch(generate_on, mesh, name, timeout=800)
    tokens = [r[0] for r in per_rank]
    assert all(t == tokens[0] for t in tokens), "ranks emitted different tokens"
    spec = meshc.MeshSpec.parse(mesh)
    for _, _, held, kv_heads, n_cache in per_rank:
        if spec.dp > 1:
            assert all(s[0] == PROMPTS // spec.dp for s in held), held  # the batch is split
        if spec.tp > 1 and kv_heads % spec.tp == 0:
            assert all(s[1] == kv_heads // spec.tp for s in held), held  # the heads are split
        if spec.pp > 1:
            assert 0 < len(held) < n_cache, held  # each stage's rank holds only its layers' cache
    print(f"{name} {mesh}: {per_rank[0][1]} of {PROMPTS} rows compared only up to a near-tie")


def _die_mid_generation(device_mesh):
    import os

    torch.set_num_threads(1)
    loaded = load_model("llama-tiny", batch=2, seq=8)
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs, max_cache_len=32)
    decode, steps = compiled.decoder._decode, [0]

    def dying(flat):
        steps[0] += 1
        if steps[0] == 3 and device_mesh.get_rank() == 1:
            os._exit(3)  # a crash mid-generation: the other rank waits in a collective
        return decode(flat)

    compiled.decoder._decode = dying
    compiled.generate(loaded.example_inputs[0], max_new_tokens=8)


@pytest.mark.slow  # one tp=2 compile (~1 min)
@pytest.mark.timeout(600)
def test_a_rank_dying_mid_generation_ends_every_rank():
    from meshc.runtime.launch import LaunchError

    with pytest.raises(LaunchError, match="rank 1 died with exit code 3"):
        meshc.launch(_die_mid_generation, "tp=2", timeout=120)
