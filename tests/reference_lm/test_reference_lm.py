"""Fast tests of meshc.reference_lm: corpus split, byte codec, bits-per-byte, training, shipped model."""

from __future__ import annotations

import math

import meshc.reference_lm as ref
import pytest
import torch
from meshc.reference_lm import quality
from meshc.reference_lm.quality import bits_per_byte, greedy_generate, gzip_bits_per_byte, xz_bits_per_byte
from meshc.reference_lm.training import heal, lr_at, train_lm


def _tiny_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=ref.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def small_train_files():
    files = sorted(ref.stdlib_files("train"), key=lambda p: (p.stat().st_size, str(p)))
    return files[200:240]  # ~40 mid-sized files: quick to tokenize, real Python


# --- corpus split ---------------------------------------------------------------------------


def test_split_is_frozen_deterministic_and_disjoint():
    held, train = ref.stdlib_files("heldout"), ref.stdlib_files("train")
    rel = lambda ps: [p.relative_to(ref.stdlib_root()).as_posix() for p in ps]
    frozen = [ln for ln in ref.HELDOUT_LIST.read_text().splitlines() if ln and not ln.startswith("#")]
    assert rel(held) == frozen
    assert ref.compute_heldout_list() == frozen  # the rule reproduces the committed list here
    assert not set(rel(held)) & set(rel(train))
    assert 0.02 < len(held) / (len(held) + len(train)) < 0.10
    assert all(ref.is_heldout(r) for r in frozen) and not any(ref.is_heldout(r) for r in rel(train))
    for r in rel(held) + rel(train):
        assert r.endswith(".py") and not set(r.split("/")[:-1]) & ref.EXCLUDED_DIRS
    assert ref.stdlib_files("train") == train


def test_missing_heldout_file_is_reported(tmp_path, monkeypatch):
    lst = tmp_path / "heldout_files.txt"
    lst.write_text("# header\nos.py\nno_such_module_xyz.py\n")
    monkeypatch.setattr(ref, "HELDOUT_LIST", lst)
    with pytest.raises(FileNotFoundError, match="no_such_module_xyz.py"):
        ref.stdlib_files("heldout")
    with pytest.warns(UserWarning, match="missing"):
        assert [p.name for p in ref.stdlib_files("heldout", strict=False)] == ["os.py"]
    with pytest.raises(ValueError, match="unknown split"):
        ref.stdlib_files("validation")


# --- codec ----------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    text = "def f(x):\n\treturn 'héllo ✓' + x  # 日本\n"
    ids = ref.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1 and len(ids) == len(text.encode("utf-8"))
    assert int(ids.max()) < 256 and ref.decode(ids) == text
    framed = ref.encode(text, bos=True, eos=True)
    assert framed[0] == ref.BOS_ID and framed[-1] == ref.EOS_ID and ref.decode(framed) == text
    assert ref.decode([ref.PAD_ID, 0x68, 0x69, ref.SEP_ID]) == "hi"
    assert len(ref.encode("")) == 0


def test_reference_config():
    cfg = ref.reference_config()
    assert cfg.vocab_size == ref.VOCAB_SIZE == 260 and cfg.num_hidden_layers == 8
    assert cfg.max_position_embeddings >= 512 and cfg.use_cache
    model = ref.build_reference_lm(seed=0)
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 10e6
    again = ref.build_reference_lm(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


# --- bits per byte --------------------------------------------------------------------------


def test_uniform_logits_give_log2_vocab():
    uniform = lambda x: torch.zeros(*x.shape, ref.VOCAB_SIZE)
    bpb = bits_per_byte(uniform, max_bytes=3000, context=128, batch_size=4)
    assert bpb == pytest.approx(math.log2(ref.VOCAB_SIZE), abs=1e-6)
    # A model that is confidently wrong is penalised far beyond 8 bits: the formula can fail.
    wrong = lambda x: torch.nn.functional.one_hot(torch.full_like(x, ref.SEP_ID), ref.VOCAB_SIZE).float() * 20
    assert bits_per_byte(wrong, max_bytes=500, context=64) > 20


def test_output_kinds_and_bad_output():
    x = torch.randint(0, 256, (2, 5))
    logits = torch.randn(2, 5, ref.VOCAB_SIZE)

    class Out:
        def __init__(self, t):
            self.logits = t

    for fn in (lambda i: logits, lambda i: (logits, None), lambda i: Out(logits)):
        assert torch.equal(quality.logits_of(fn, x), logits)
    with pytest.raises(TypeError, match=r"\[B, S, V\]"):
        quality.logits_of(lambda i: logits[:, :-1], x)


def test_windows_score_every_byte_once(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(bytes(range(256)) * 4 + b"x")  # 1025 bytes
    b.write_bytes(b"print(1)\n")
    wins = quality._windows([a, b], context=100, max_bytes=None)
    assert all(len(w) <= 101 for w in wins)
    scored = torch.cat([w[1:] for w in wins])
    assert bytes(scored.tolist()) == a.read_bytes() + b.read_bytes()
    assert sum(int(w[0] == ref.BOS_ID) for w in wins) == 2
    capped = quality._windows([a, b], context=100, max_bytes=1030)
    assert sum(len(w) - 1 for w in capped) == 1030


def test_random_model_is_about_8_bits():
    bpb = bits_per_byte(ref.build_reference_lm(seed=0), max_bytes=2000, context=256, batch_size=4)
    assert math.isfinite(bpb) and 7.5 < bpb < 8.6


def test_compressor_baselines_are_plausible(tmp_path):
    gz, xz = gzip_bits_per_byte(), xz_bits_per_byte()
    assert 1.5 < gz < 2.3 and 1.1 < xz < gz
    rep = tmp_path / "rep.py"
    rep.write_text("x = 1\n" * 5000)
    assert gzip_bits_per_byte([rep]) < 0.1 and xz_bits_per_byte([rep]) < 0.1


# --- training -------------------------------------------------------------------------------


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10, 0.1) == pytest.approx(0.1, abs=1e-3)


def test_train_lm_lowers_loss(small_train_files):
    hist = train_lm(_tiny_lm(), steps=30, lr=3e-3, batch_size=4, seq_len=64, seed=0, warmup_steps=3,
                    files=small_train_files, progress=False, log=None, threads=1)
    assert len(hist) == 30
    assert sum(hist[-5:]) / 5 < sum(hist[:5]) / 5 - 0.8


def test_resume_continues_from_saved_step(tmp_path, small_train_files):
    kw = dict(steps=20, lr=3e-3, batch_size=2, seq_len=32, seed=3, warmup_steps=2,
              files=small_train_files, progress=False, log=None, threads=1)
    straight = train_lm(_tiny_lm(), **kw)
    first = train_lm(_tiny_lm(), checkpoint_dir=tmp_path, stop_after=10, **kw)
    assert len(first) == 10
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10
    fresh = _tiny_lm(seed=99)  # different init: the weights must come from the checkpoint
    info: dict = {}
    resumed = train_lm(fresh, checkpoint_dir=tmp_path, info=info, **kw)
    assert info["start_step"] == 10 and info["end_step"] == 20
    assert resumed[:10] == first
    assert resumed == pytest.approx(straight, rel=1e-4)


def test_heal_keeps_frozen_parameters_frozen(small_train_files):
    model = _tiny_lm()
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    before, head = emb.clone(), model.lm_head.weight.clone()
    hist = heal(model, steps=4, seq_len=32, batch_size=2, files=small_train_files, progress=False, log=None)
    assert len(hist) == 4 and all(math.isfinite(h) for h in hist)
    assert torch.equal(emb, before) and not torch.equal(model.lm_head.weight, head)


# --- shipped model --------------------------------------------------------------------------


def test_load_without_weights_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py"):
        ref.load_reference_lm(tmp_path)


@pytest.mark.skipif(not ref.WEIGHTS_FILE.exists(), reason="model.safetensors not trained yet "
                    "(run examples/reference_lm/train.py)")
def test_shipped_model_beats_gzip_and_generates():
    model = ref.load_reference_lm()
    assert not model.training and next(model.parameters()).dtype == torch.float32
    bpb = bits_per_byte(model, max_bytes=20000, batch_size=8)
    # Bar: gzip -9 on the WHOLE held-out set (~1.92), stricter than gzip on these 20000 bytes (~2.47).
    assert bpb < gzip_bits_per_byte()
    text = greedy_generate(model, "def ", max_new_tokens=40)
    assert text.startswith("def ") and len(text) > 10


def _bpb_on_mesh(device_mesh, max_bytes):
    import meshc
    from meshc.reference_lm.quality import bits_per_byte

    model = ref.load_reference_lm() if ref.WEIGHTS_FILE.exists() else ref.build_reference_lm(0).eval()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs={"use_cache": False})
    return bits_per_byte(model, max_bytes=max_bytes, progress=False), bits_per_byte(
        compiled, max_bytes=max_bytes, progress=False)


@pytest.mark.slow  # default-suite time (20 min on 2 cores): covered by faster cases
@pytest.mark.timeout(300)
def test_bits_per_byte_is_the_same_compiled_on_tp2():
    from meshc.runtime import launch

    for eager, sharded in launch(_bpb_on_mesh, "tp=2", 3000, timeout=240):
        assert abs(eager - sharded) <= 1e-4, (eager, sharded)
