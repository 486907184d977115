"""A small byte-level reference language model for measuring architecture-changing passes.

Passes that change a model's architecture (ladder residual, FFN fusion, Medusa heads) are
judged by how much quality they cost and how much a short "healing" fine-tune wins back.
This package supplies a real, trained model to measure that on, entirely offline:

* ``reference_config()`` -- the Hugging Face ``LlamaConfig`` of the reference model
  (byte vocabulary of 256 + 4 special tokens, 8 layers, SwiGLU, about 6.4 M parameters).
* ``build_reference_lm(seed)`` -- a randomly initialised model with that config.
* ``load_reference_lm()`` -- the shipped trained model (``config.json`` + ``model.safetensors``
  next to this file, produced by ``examples/reference_lm/train.py``), in eval mode, fp32.
* ``encode(text)`` / ``decode(ids)`` -- UTF-8 bytes <-> token ids (no tokenizer files needed).
* ``stdlib_files(split)`` -- the corpus: Python standard-library sources, split by file.

Quality measurement lives in ``meshc.reference_lm.quality`` (bits per byte, gzip/xz
baselines, greedy generation) and training / healing in ``meshc.reference_lm.training``.

Corpus rule: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` whose directory
path contains none of ``EXCLUDED_DIRS`` (third-party packages, test suites and their data,
byte-code caches, and the generated ``pydoc_data`` documentation blob).  A file is held out
when the SHA-256 of its relative POSIX path, read as an integer, is ``< 5 %`` of the range.
The held-out list is frozen in ``heldout_files.txt`` so the split never drifts; training
uses every eligible file NOT on that list.
"""

from __future__ import annotations

import hashlib
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
HELDOUT_LIST = PACKAGE_DIR / "heldout_files.txt"
WEIGHTS_FILE = PACKAGE_DIR / "model.safetensors"
CONFIG_FILE = PACKAGE_DIR / "config.json"

# Token ids: 0..255 are raw bytes, then the specials.
BOS_ID, EOS_ID, PAD_ID, SEP_ID = 256, 257, 258, 259
VOCAB_SIZE = 260
CONTEXT = 512  # training sequence length == max_position_embeddings

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "pydoc_data"}
)
HELDOUT_PERCENT = 5

__all__ = [
    "BOS_ID", "CONTEXT", "EOS_ID", "PAD_ID", "SEP_ID", "VOCAB_SIZE",
    "build_reference_lm", "decode", "encode", "encode_bytes", "load_reference_lm", "read_bytes",
    "reference_config", "stdlib_files", "stdlib_root",
]


def reference_config():
    """The ``LlamaConfig`` of the reference LM (hidden 256, 8 layers, 4 heads, SwiGLU 688)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=688,  # ~2.7 x hidden, multiple of 16
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,  # separate lm_head: simpler for Medusa-style head passes
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def build_reference_lm(seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` with ``reference_config()``, fp32.

    The global torch RNG is left untouched (initialisation runs under ``fork_rng``).
    """
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(reference_config())
    return model.float()


def load_reference_lm(folder: str | Path | None = None):
    """Load the shipped trained model (``config.json`` + ``model.safetensors``), eval mode, fp32.

    ``folder`` defaults to this package's directory.  Nothing is downloaded.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder) if folder is not None else PACKAGE_DIR
    weights, config = folder / "model.safetensors", folder / "config.json"
    for f in (config, weights):
        if not f.exists():
            raise FileNotFoundError(
                f"{f} is missing: the reference LM has not been trained/shipped yet. "
                "Run `python examples/reference_lm/train.py` to produce it."
            )
    model = LlamaForCausalLM(LlamaConfig.from_json_file(str(config)))
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.float().eval()


def encode(text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D LongTensor (optionally framed with BOS / EOS)."""
    return encode_bytes(text.encode("utf-8"), bos=bos, eos=eos)


def encode_bytes(data: bytes, bos: bool = False, eos: bool = False) -> torch.Tensor:
    """Raw bytes as a 1-D LongTensor of token ids (optionally framed with BOS / EOS)."""
    if not data:
        ids = torch.zeros(0, dtype=torch.long)
    else:
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    parts = ([torch.tensor([BOS_ID])] if bos else []) + [ids] + ([torch.tensor([EOS_ID])] if eos else [])
    return torch.cat(parts) if len(parts) > 1 else ids


def decode(ids) -> str:
    """Inverse of ``encode``: special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _eligible(rel: str) -> bool:
    parts = rel.split("/")
    return rel.endswith(".py") and not (set(parts[:-1]) & EXCLUDED_DIRS)


def is_heldout(rel: str) -> bool:
    """The split rule: SHA-256 of the relative path falls in the lowest ``HELDOUT_PERCENT`` %."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")
    return h % 100 < HELDOUT_PERCENT


@lru_cache(maxsize=1)
def _all_eligible() -> tuple[str, ...]:
    root = stdlib_root()
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    return tuple(sorted(r for r in rels if _eligible(r)))


def compute_heldout_list() -> list[str]:
    """Apply the split rule to this machine's stdlib (used once to write ``heldout_files.txt``)."""
    return [r for r in _all_eligible() if is_heldout(r)]


def _frozen_heldout() -> list[str]:
    if not HELDOUT_LIST.exists():
        raise FileNotFoundError(
            f"{HELDOUT_LIST} is missing; it freezes the held-out split. Restore it from git "
            "(or regenerate with meshc.reference_lm.compute_heldout_list(), which changes the split)."
        )
    lines = HELDOUT_LIST.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def stdlib_files(split: str = "heldout", strict: bool = True) -> list[Path]:
    """Absolute paths of the corpus files of ``split`` ("train" or "heldout"), sorted.

    "heldout" is exactly the list frozen in ``heldout_files.txt``.  If some listed file does
    not exist in this interpreter's stdlib, ``strict=True`` raises (numbers would not be
    comparable); ``strict=False`` warns and skips it.  "train" is every eligible file here
    that is not on the frozen list.
    """
    root, frozen = stdlib_root(), _frozen_heldout()
    if split == "heldout":
        missing = [r for r in frozen if not (root / r).is_file()]
        if missing:
            msg = (
                f"{len(missing)} held-out file(s) listed in {HELDOUT_LIST.name} are missing from "
                f"{root} (different Python version?): {missing[:5]}... Bits-per-byte figures are "
                "not comparable with the shipped metrics.json."
            )
            if strict:
                raise FileNotFoundError(msg + " Pass strict=False to skip them.")
            warnings.warn(msg, stacklevel=2)
        return [root / r for r in frozen if r not in missing]
    if split == "train":
        held = set(frozen)
        return [root / r for r in _all_eligible() if r not in held]
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")


def read_bytes(files: list[Path]) -> list[bytes]:
    """Raw contents of each file (bits per byte is measured on these exact bytes)."""
    return [Path(f).read_bytes() for f in files]
