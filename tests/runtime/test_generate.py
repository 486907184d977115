"""compiled.generate on one device (issue 13): greedy tokens equal Hugging Face's generate, left
padding, sampling, the cache stays in place, one prefill and one decode capture, a decode step
attends over a bucketed prefix of the cache only, errors."""

from __future__ import annotations

from unittest import mock

import meshc
import meshc.capture_decode
import meshc.driver
import meshc.runtime.generate
import pytest
import torch
from meshc.errors import InputError, MeshcError
from meshc.models import load_model
from meshc.runtime.generate import read_length

NEW = 32
CACHE = 64


def _compile(name: str, batch: int = 2, max_batch_size: int = 4):
    loaded = load_model(name, batch=batch, seq=8)
    counts = {"forward": 0, "decoding": 0}

    def counting(key, fn):
        def wrapped(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        return wrapped

    with mock.patch.object(meshc.driver, "capture", counting("forward", meshc.driver.capture)), \
         mock.patch.object(meshc.capture_decode, "capture", counting("decoding", meshc.capture_decode.capture)):
        compiled = meshc.compile(loaded.model, None, example_inputs=loaded.example_inputs,
                                 max_cache_len=CACHE, max_batch_size=max_batch_size)
    return loaded.model, compiled, counts


@pytest.fixture(scope="module", params=["llama-tiny",  # the others under -m slow (suite time)
                                        pytest.param("gpt2-tiny", marks=pytest.mark.slow),
                                        pytest.param("reference-lm", marks=pytest.mark.slow)])
def lm(request):
    return (request.param, *_compile(request.param))


def _prompts(name: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A left-padded batch of 3 prompts of lengths 9, 5, 7 (and the prompts themselves)."""
    if name == "reference-lm":
        from meshc.reference_lm import PAD_ID, encode

        rows, pad = [encode(t) for t in ("def main(", "impor", "class A")], PAD_ID
    else:
        g = torch.Generator().manual_seed(7)
        rows, pad = [torch.randint(3, 512, (n,), generator=g) for n in (9, 5, 7)], 0
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    return ids, mask, rows


def _compare_with_hf(model, compiled, ids, mask) -> int:
    """Assert meshc's greedy tokens equal HF's up to the first near-tie of the reference (top-2
    logit margin < 1e-4) in each row; return how many rows had one."""
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         return_dict_in_generate=True, output_logits=True)
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    top2 = torch.stack([step.float().topk(2, dim=-1).values for step in ref.logits], 1)  # [B, steps, 2]
    ties = (top2[..., 0] - top2[..., 1]) < 1e-4
    prompt, near = ids.shape[1], 0
    for row in range(ids.shape[0]):
        upto = int(ties[row].nonzero()[0]) if ties[row].any() else len(ref.logits)
        near += bool(ties[row].any())
        want, got = ref.sequences[row, prompt:prompt + upto], out[row, prompt:prompt + upto]
        assert torch.equal(got, want), f"row {row}: meshc {got.tolist()} != HF {want.tolist()}"
    assert torch.equal(out[:, :prompt], ids)
    return near


def test_greedy_equals_hf_generate(lm):
    name, model, compiled, _ = lm
    g = torch.Generator().manual_seed(3)
    vocab = 256 if name == "reference-lm" else 512
    near = _compare_with_hf(model, compiled, torch.randint(3, vocab, (2, 8), generator=g), None)
    ids, mask, _ = _prompts(name)
    near += _compare_with_hf(model, compiled, ids, mask)
    print(f"{name}: {near} rows compared only up to a near-tie")


def test_left_padded_batch_equals_one_by_one(lm):
    name, _, compiled, _ = lm
    ids, mask, rows = _prompts(name)
    batch = compiled.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = compiled.generate(row[None], max_new_tokens=16, eos_token_id=[])
        assert torch.equal(batch[i, ids.shape[1]:], alone[0, len(row):]), f"row {i}"


def test_one_prefill_and_one_decode_capture_through_the_pipeline(lm):
    _, _, compiled, counts = lm
    assert counts == {"forward": 1, "decoding": 2}
    programs = compiled.decoder.programs
    for p in (programs.prefill, programs.decode):
        assert p.history == compiled.program.history == ["dce", "propagate_shapes", "lint"]
        writes = [n for n in p.graph.nodes if n.target is torch.ops.aten.index_copy_.default]
        assert len(writes) == len(programs.layout.kv_shapes) * 2  # K and V of every layer, in place
        for node in p.placeholders("user"):  # a cache tensor's only reader is its write (pp stages rely on it)
            if "meshc_held" in node.meta:
                assert [u.target for u in node.users] == [torch.ops.aten.index_copy_.default], (node, node.users)


def test_decode_attends_over_the_first_p_cache_positions_only(lm):
    """Every attention of the decode Program reads keys/values of the mask's length P (a symbolic
    slice of the cache), and what lies past P in the cache, even NaN, does not reach the logits;
    with a mask over the whole cache the same NaN does (so the check can fail)."""
    _, _, compiled, _ = lm
    decoder = compiled.decoder
    decode = decoder.programs.decode
    mask = next(n for n in decode.placeholders("user") if n.meta["meshc_name"] == "args[3]")
    p = mask.meta["val"].shape[3]
    attention = [n for n in decode.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(attention) == len(decoder.layout.kv_shapes)
    for node in attention:
        key, value = (node.args[i].meta["val"].shape[2] for i in (1, 2))
        assert str(key) == str(value) == str(p), (node.name, key, value, p)
    ids, read, length = torch.tensor([[5, 6, 7, 8, 9]]), 16, decoder.layout.max_cache_len
    cache = [c[:1] for c in decoder.cache]
    minimum = torch.finfo(decoder.layout.dtype).min

    def step(columns: int) -> torch.Tensor:
        bias = torch.full((1, 1, 1, columns), minimum, dtype=decoder.layout.dtype)
        bias[..., :6] = 0.0
        return decoder._decode([torch.tensor([[10]]), torch.tensor([[5]]), torch.tensor([5]), bias, *cache])

    try:
        with torch.no_grad():
            decoder._prefill([ids, torch.ones_like(ids), *cache])
            clean = step(read)
            for c in cache:
                c[:, :, read:] = float("nan")
            garbage, whole = step(read), step(length)
    finally:
        for c in decoder.cache:
            c.zero_()
    assert torch.isfinite(clean).all() and torch.equal(garbage, clean)
    assert torch.isnan(whole).any()


def test_a_step_reads_the_filled_length_rounded_up_to_a_bucket(lm, monkeypatch):
    """Decode steps pass a mask of read_length(filled) columns: powers of two from 16, capped at
    max_cache_len; the tokens are those of the whole-cache reads the buckets replace."""
    assert [read_length(n, 1024) for n in (1, 16, 17, 33, 1000)] == [16, 16, 32, 64, 1024]
    assert [read_length(n, 48) for n in (5, 20, 40, 48)] == [16, 32, 48, 48]
    _, _, compiled, _ = lm
    decoder, sizes = compiled.decoder, []
    decode = decoder._decode

    def recording(flat):
        sizes.append(flat[3].shape[-1])
        return decode(flat)

    monkeypatch.setattr(decoder, "_decode", recording)
    out = compiled.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=40, eos_token_id=[])
    filled = range(4, 3 + 40)  # a step writes position 3 + step and reads positions < filled
    assert sizes == [16 if n <= 16 else 32 if n <= 32 else 64 for n in filled] == [read_length(n, CACHE)
                                                                                   for n in filled]
    monkeypatch.setattr(meshc.runtime.generate, "read_length", lambda filled, length: length)
    assert torch.equal(compiled.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=40, eos_token_id=[]), out)
    assert sizes[-1] == CACHE


def test_sampling_is_reproducible_and_respects_top_k(lm):
    name, _, compiled, _ = lm
    ids, mask, _ = _prompts(name)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(compiled.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                      temperature=0.8, top_k=5, top_p=0.9))
    assert torch.equal(*runs)
    torch.manual_seed(0)
    top1 = compiled.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1)
    assert torch.equal(top1, compiled.generate(ids, attention_mask=mask, max_new_tokens=12))  # top_k=1 is greedy


def test_cache_stays_in_place_and_the_model_is_never_called(lm, monkeypatch):
    _, model, compiled, _ = lm

    def forbidden(*a, **k):
        raise AssertionError("the original model's forward ran during generate")

    monkeypatch.setattr(type(model), "forward", forbidden)
    ptrs = [c.data_ptr() for c in compiled.decoder.cache]
    seen = []

    class Streamer:
        def put(self, value):
            seen.append((value.clone(), [c.data_ptr() for c in compiled.decoder.cache]))

        def end(self):
            seen.append(("end", None))

    out = compiled.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, eos_token_id=[], streamer=Streamer())
    assert seen[-1] == ("end", None) and len(seen) == 1 + 10 + 1
    assert torch.equal(seen[0][0], torch.tensor([[5, 6, 7]]))
    assert torch.equal(torch.cat([v for v, _ in seen[1:-1]]), out[0, 3:])
    assert all(p == ptrs for _, p in seen[:-1])


def test_eos_stops_a_sequence_and_pads_after_it(lm):
    name, model, compiled, _ = lm
    vocab = 256 if name == "reference-lm" else 512
    ids = torch.randint(3, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    free = compiled.generate(ids, max_new_tokens=8, eos_token_id=[])
    stop = int(free[0, 8])  # row 0's third new token is now its end
    end = 6 + int((free[0, 6:] == stop).nonzero()[0])  # where it first appears
    out = compiled.generate(ids, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    ref = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(out, ref)
    assert out[0, end] == stop and (out[0, end + 1:] == 0).all()


def test_bad_inputs_name_the_limit_and_the_fix(lm):
    _, _, compiled, _ = lm
    ids = torch.ones(1, 40, dtype=torch.long)
    with pytest.raises(InputError, match=r"past max_cache_len=64.*compile with max_cache_len=80"):
        compiled.generate(ids, max_new_tokens=40)
    with pytest.raises(InputError, match=r"batch 5 is past max_batch_size=4.*max_batch_size=5"):
        compiled.generate(torch.ones(5, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(InputError, match="integer dtype"):
        compiled.generate(torch.ones(1, 4), max_new_tokens=2)
    for option in ({"num_beams": 4}, {"repetition_penalty": 1.3}):
        with pytest.raises(MeshcError, match=f"{next(iter(option))}=.* is not implemented by meshc"):
            compiled.generate(ids[:, :4], max_new_tokens=2, **option)


def test_forward_of_a_use_cache_model_compiles_and_no_cache_means_no_generate():
    loaded = load_model("llama-tiny", batch=2, seq=8)
    assert loaded.model.config.use_cache
    compiled = meshc.compile(loaded.model, example_inputs=loaded.example_inputs)  # no example_kwargs
    ids = loaded.example_inputs[0]
    ref = loaded.model(ids, use_cache=False).logits
    assert (compiled(ids).logits - ref).abs().max() <= 1e-5
    with pytest.raises(MeshcError, match="compile with meshc.compile\\(..., max_cache_len=N\\)"):
        compiled.generate(ids, max_new_tokens=2)


def _generate_on_rank(device_mesh, name: str, sample: bool):
    from meshc.collectives import count_collectives

    torch.set_num_threads(1)
    loaded = load_model(name, batch=2, seq=8)
    ids = loaded.example_inputs[0]
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=(ids,), max_cache_len=CACHE)
    greedy = compiled.generate(ids, max_new_tokens=16)
    with torch.no_grad():
        ref = loaded.model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
    torch.manual_seed(5)
    sampled = compiled.generate(ids, max_new_tokens=8, do_sample=True, top_k=20) if sample else None
    return (greedy.tolist(), ref.tolist(), sampled.tolist() if sampled is not None else None,
            count_collectives(compiled.decoder.programs.decode))


@pytest.mark.slow  # two ranks compiling three graphs each (30+ s)
@pytest.mark.timeout(300)
def test_tensor_parallel_generate_equals_hf_and_every_rank_emits_the_same_tokens():
    """tp=2: the prefill and decode Programs go through auto_shard + spmd_partition (the cache is
    sharded with the heads); greedy equals HF generate, and sampled tokens agree across ranks."""
    per_rank = meshc.launch(_generate_on_rank, "tp=2", "llama-tiny", True, timeout=240)
    for greedy, ref, _, collectives in per_rank:
        assert greedy == ref
        assert collectives.get("all_reduce@tp", 0) > 0  # the decode step really runs sharded
    assert per_rank[0][2] == per_rank[1][2]


def test_generation_on_a_dp_x_pp_mesh_is_a_clear_error():
    loaded = load_model("mlp")
    with pytest.raises(MeshcError, match="generation on mesh 'dp=2,pp=2' is not implemented yet"):
        meshc.driver._decoder(loaded.model, _FakeForward(meshc.MeshSpec.parse("dp=2,pp=2")), None, None, "aten", 2,
                              None, None)


class _FakeForward:
    def __init__(self, mesh):
        self.mesh, self.rank, self.plan = mesh, 0, "auto"


def test_a_model_that_cannot_decode_on_a_static_cache_is_a_clear_error():
    """Bloom builds its ALiBi bias from the 2-D mask: generation is refused naming the step and why."""
    from meshc.errors import CaptureError

    loaded = load_model("bloom-tiny", batch=2, seq=8)
    with pytest.warns(UserWarning), pytest.raises(CaptureError, match="cannot capture the prefill step of "
                                                                      "BloomForCausalLM for generation"):
        meshc.compile(loaded.model, None, example_inputs=loaded.example_inputs, max_cache_len=32)


@pytest.mark.slow  # default-suite time (20 min on 2 cores): covered by faster cases
def test_ladder_residual_applies_to_the_decode_graph():
    """A pipeline with ladder_residual rewires the prefill and decode Programs as it rewires the
    forward: decoding with the cache equals re-running the ladder forward on the growing sequence,
    and differs from the unconverted model."""
    loaded = load_model("llama-tiny", batch=2, seq=8)
    ids = loaded.example_inputs[0]
    compiled = meshc.compile(loaded.model, None, example_inputs=(ids,), max_cache_len=32,
                             pipeline="dce,ladder_residual,propagate_shapes,lint")
    for p in (compiled.decoder.programs.prefill, compiled.decoder.programs.decode):
        assert any(n.startswith("ladder_residual: 4 layers / 8 sub-layers") for n in p.notes), p.notes
    out = compiled.generate(ids, max_new_tokens=6, eos_token_id=[])
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, compiled(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        plain = loaded.model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(out, seq)
    assert not torch.equal(out, plain)


@pytest.mark.slow  # the Triton interpreter runs every kernel in Python (~1 min quiet)
@pytest.mark.timeout(900)
def test_triton_backend_decodes_with_its_attention_kernel_over_the_cache():
    """backend='triton': greedy equals HF for 2 prompts x 8 tokens, and the decode Program's
    attention over the cache (a 4-D additive mask, T=1 query) is a generated attention kernel."""
    pytest.importorskip("triton")
    from meshc.backends import lower

    loaded = load_model("llama-tiny", batch=2, seq=8)
    ids = loaded.example_inputs[0]
    compiled = meshc.compile(loaded.model, None, example_inputs=(ids,), max_cache_len=24, backend="triton")
    assert compiled.decoder.backend == "triton"
    out = compiled.generate(ids, max_new_tokens=8, eos_token_id=[])
    with torch.no_grad():
        ref = loaded.model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(out, ref)
    lowered, _ = lower(compiled.decoder.programs.decode, "triton")
    assert sum(k.kind == "attention" for k in lowered.kernels) == 4  # one per layer
