"""Medusa tree decoding (issue 14): trees from paths, one decode call per verification step with all
T tree tokens, lossless against plain greedy generate on the same mesh (reference-lm with its
shipped heads, held-out prompts, one device and tp=2), the committed K/V equal plain decoding's,
typical acceptance runs, clear errors."""

from __future__ import annotations

from types import SimpleNamespace

import meshc
import meshc.reference_lm as ref
import pytest
import torch
from meshc.errors import InputError, MeshcError
from meshc.passes.speculative_heads import heads_pipeline
from meshc.runtime.speculative import MC_SIM_7B_63, Tree, default_tree, expected_length, runners, speculative_generate

HEADS = ref.PACKAGE_DIR / "medusa_heads.safetensors"
NEW = 128
PROMPT = 32
CACHE = PROMPT + NEW + 64
TIE = 1e-4  # steps whose base top-2 margin is below this may legitimately differ (as in the generation tests)


def test_trees_from_paths():
    tree = Tree.of(MC_SIM_7B_63)
    assert (tree.size, tree.depth, tree.topk) == (64, 4, 10)
    assert all(tree.parents[i] < i for i in range(1, tree.size))
    vis = tree.visible
    i = 1 + tree.paths.index((0, 1, 2))  # sees itself, (0, 1), (0,) and the root; nothing else
    want = {0, i, 1 + tree.paths.index((0, 1)), 1 + tree.paths.index((0,))}
    assert {j for j in range(tree.size) if vis[i, j]} == want
    with pytest.raises(MeshcError, match="has no parent"):
        Tree.of([(0,), (1, 0)])
    acc = [[0.6, 0.2, 0.1], [0.4, 0.2], [0.3]]
    small = default_tree(4, acc)
    assert small.paths == ((0,), (1,), (0, 0))  # .6, .24 (= .6 * .4) and .2: the three likeliest nodes
    assert expected_length(small, acc) == pytest.approx(1 + 0.6 + 0.2 + 0.24)
    big = default_tree(64, acc)
    assert big.size == 1 + 3 + 3 * 2 + 6  # every node the accuracies allow
    assert default_tree(1).size == 1 and Tree.of(small.paths).truncated(2).paths == ((0,),)


def _prompts(count: int) -> list[torch.Tensor]:
    """`count` held-out prompts of PROMPT bytes, from evenly spaced offsets of the held-out stream."""
    files = ref.stdlib_files("heldout", strict=False)
    stream = torch.cat([ref.encode_bytes(b) for b in ref.read_bytes(files)])
    step = (len(stream) - PROMPT) // count
    return [stream[i * step:i * step + PROMPT][None] for i in range(count)]


def _compiled(mesh=None):
    model = ref.load_reference_lm()
    ids = torch.zeros(1, 8, dtype=torch.long)
    return model, meshc.compile(model, mesh, example_inputs=(ids,), max_cache_len=CACHE,
                                pipeline=heads_pipeline(HEADS, mesh), generate=True)


@pytest.fixture(scope="module")
def medusa():
    if not HEADS.exists():
        pytest.fail(f"{HEADS} is missing: run examples/train_medusa.py (the shipped heads are part of the repo)")
    torch.set_num_threads(1)
    return _compiled()


def _compare(model, compiled, prompts, trees) -> dict:
    """Speculative tokens == plain greedy tokens up to the first near-tie of the base model; returns
    counts. Each verification step is one decode call whose T is the tree's size."""
    decoder = compiled.decoder
    calls = []
    run = runners(decoder)
    real = run.decode

    def counting(flat):
        calls.append(tuple(flat[0].shape))
        return real(flat)

    run.decode = counting
    stats = {"near_ties": 0, "steps": 0, "tokens": 0}
    try:
        for ids in prompts:
            calls.clear()
            plain = compiled.generate(ids, max_new_tokens=NEW, eos_token_id=[])
            with torch.no_grad():
                top2 = model(plain[:, :-1], use_cache=False).logits[0, ids.shape[1] - 1:].topk(2, -1).values
            ties = ((top2[:, 0] - top2[:, 1]) < TIE).nonzero()
            upto = int(ties[0]) if len(ties) else NEW
            stats["near_ties"] += bool(len(ties))
            for tree in trees:
                calls.clear()
                out = compiled.generate(ids, max_new_tokens=NEW, eos_token_id=[], speculative="medusa", tree=tree)
                st = decoder.speculative_stats
                end = ids.shape[1] + upto
                assert out.shape == plain.shape and torch.equal(out[:, :end], plain[:, :end])
                size = tree if isinstance(tree, int) else Tree.of(tree).size
                assert len(calls) == st.steps and set(calls) == {(1, size)}  # one call per step, all T tokens
                stats["steps"] += st.steps
                stats["tokens"] += st.new_tokens - 1
    finally:
        run.decode = real
    return stats


def test_lossless_against_plain_greedy_one_device(medusa):
    model, compiled = medusa
    stats = _compare(model, compiled, _prompts(20)[:3], [16, MC_SIM_7B_63])
    assert stats["tokens"] / stats["steps"] > 1.2  # the heads do accept tokens (measured: see benchmarks/medusa.py)


@pytest.mark.slow  # 20 prompts x 128 tokens x 3 trees (the full check)
@pytest.mark.timeout(1800)
def test_lossless_20_heldout_prompts_one_device(medusa):
    model, compiled = medusa
    stats = _compare(model, compiled, _prompts(20), [4, 16, MC_SIM_7B_63])
    print(f"one device: {stats}")


def test_committed_cache_equals_plain_decoding_and_typical_acceptance_runs(medusa):
    """After a speculative run the cache rows of every committed token hold what plain decoding
    wrote there (accepted K/V compacted into place); typical acceptance generates max_new_tokens."""
    _, compiled = medusa
    ids = _prompts(20)[5]
    compiled.generate(ids, max_new_tokens=48, eos_token_id=[])
    plain = [c[:1, :, :ids.shape[1] + 47].clone() for c in compiled.decoder.cache]
    out = compiled.generate(ids, max_new_tokens=48, eos_token_id=[], speculative="medusa", tree=MC_SIM_7B_63)
    assert compiled.decoder.speculative_stats.steps < 47
    for a, c in zip(plain, compiled.decoder.cache):
        torch.testing.assert_close(c[:1, :, :ids.shape[1] + 47], a, rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    typical = compiled.generate(ids, max_new_tokens=48, eos_token_id=[], speculative="medusa", acceptance="typical")
    assert typical.shape == out.shape


def test_clear_errors(medusa):
    _, compiled = medusa
    ids = _prompts(20)[0]
    with pytest.raises(InputError, match="batch 1"):
        compiled.generate(ids.repeat(2, 1), max_new_tokens=4, speculative="medusa")
    with pytest.raises(MeshcError, match="5 deep but the model has 4 Medusa head"):
        compiled.generate(ids, max_new_tokens=4, speculative="medusa", tree=[(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0),
                                                                               (0, 0, 0, 0, 0)])
    with pytest.raises(MeshcError, match="not .'top_k'"):
        compiled.generate(ids, max_new_tokens=4, speculative="medusa", top_k=3)
    with pytest.raises(MeshcError, match="'eagle' is not a speculation method"):
        compiled.generate(ids, max_new_tokens=4, speculative="eagle")
    no_heads = meshc.capture(torch.nn.Linear(4, 4), (torch.zeros(1, 4),))
    with pytest.raises(MeshcError, match="compiled without Medusa heads"):
        speculative_generate(SimpleNamespace(programs=SimpleNamespace(decode=no_heads)), ids, speculative="medusa")
    with pytest.raises(MeshcError, match="no trained Medusa heads at"):
        heads_pipeline(HEADS.with_name("missing.safetensors"))


def _tp_rank(device_mesh, count: int):
    torch.set_num_threads(1)
    model, compiled = _compiled(device_mesh)
    return _compare(model, compiled, _prompts(20)[:count], [16, MC_SIM_7B_63])


@pytest.mark.slow  # two ranks compiling three graphs each, then 20 x 128 tokens x 2 trees
@pytest.mark.timeout(3000)
def test_lossless_20_heldout_prompts_tp2():
    per_rank = meshc.launch(_tp_rank, "tp=2", 20, timeout=2900)
    assert per_rank[0] == per_rank[1]
    print(f"tp=2: {per_rank[0]}")


def test_cli_speculation_without_trained_heads_is_a_clear_error(capsys):
    from meshc.cli import main

    assert main(["generate", "llama-tiny", "--speculative", "medusa", "--max-new-tokens", "4"]) == 2
    assert "llama-tiny has no trained Medusa heads" in capsys.readouterr().err


@pytest.mark.slow  # two compiles of reference-lm
@pytest.mark.timeout(900)
def test_cli_speculative_prints_the_same_text(capsys):
    from meshc.cli import main

    args = ["generate", "reference-lm", "--prompt", "def ", "--max-new-tokens", "128"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative", "medusa"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "\n".join(lines[:-2]) + "\n" == plain
    assert lines[-2].startswith("accepted tokens per step: ") and float(lines[-2].split()[-1]) > 1.0
    assert "tokens/s" in lines[-1]
