"""Quality measurements for byte-level LMs: bits per byte, compressor baselines, greedy samples.

Entry points:

* ``bits_per_byte(fn, ...)`` -- held-out cross-entropy in bits per byte of any model.
* ``gzip_bits_per_byte(files)`` / ``xz_bits_per_byte(files)`` -- what general-purpose
  compressors achieve on the same bytes (the bar a useful LM must clear).
* ``greedy_generate(fn, prompt, max_new_tokens)`` -- argmax decoding, no KV cache.

``fn`` may be a plain callable ``LongTensor[B, S] -> logits[B, S, V]``, a Hugging Face model,
or anything whose output is a tensor, a tuple/list whose first item is the logits, or an
object with a ``.logits`` attribute (see ``logits_of``).

Evaluation scheme (deterministic): files are taken in the given order (default: the frozen
held-out list); each file becomes ``[BOS] + bytes``.  With ``context = C`` the token stream of
a file is cut into non-overlapping windows; window ``k`` feeds tokens ``[kC, kC + C)`` and is
scored on the next tokens ``[kC + 1, kC + C + 1)``.  So every byte is predicted exactly
once, from at most ``C`` preceding tokens of the same file (a window starts cold, without the
previous window's context).  EOS is never scored.  ``max_bytes`` keeps only the first
``max_bytes`` scored bytes of that stream (later files are dropped, the last one truncated).
Result = sum of cross-entropies in bits / number of scored bytes.
"""

from __future__ import annotations

import gzip
import lzma
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from . import BOS_ID, CONTEXT, EOS_ID, PAD_ID, decode, encode, encode_bytes, read_bytes, stdlib_files

__all__ = ["bits_per_byte", "greedy_generate", "gzip_bits_per_byte", "logits_of", "xz_bits_per_byte"]


def logits_of(fn: Callable, ids: torch.Tensor) -> torch.Tensor:
    """Call ``fn`` on token ids ``[B, S]`` and return the logits tensor ``[B, S, V]``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a test dependency
        PreTrainedModel = ()
    out = fn(input_ids=ids, use_cache=False) if isinstance(fn, PreTrainedModel) else fn(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(
            f"expected logits of shape [B, S, V] = [{ids.shape[0]}, {ids.shape[1]}, V] from {fn!r}, "
            f"got {got}; pass a callable returning logits, a tuple (logits, ...) or an object with .logits"
        )
    return out


def _windows(files: Sequence[Path], context: int, max_bytes: int | None) -> list[torch.Tensor]:
    """Token windows of length <= context + 1 (inputs = w[:-1], targets = w[1:])."""
    out, budget = [], max_bytes
    for data in read_bytes(list(files)):
        if budget is not None:
            data = data[:budget]
            budget -= len(data)
        if not data:
            if budget == 0:
                break
            continue
        toks = encode_bytes(data, bos=True)
        for start in range(0, len(toks) - 1, context):
            out.append(toks[start : start + context + 1])
        if budget == 0:
            break
    return out


def bits_per_byte(
    fn: Callable,
    files: Sequence[str | Path] | None = None,
    context: int = CONTEXT,
    max_bytes: int | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> float:
    """Cross-entropy of ``fn`` on ``files`` (default: held-out split) in bits per byte.

    See the module docstring for the exact windowing.  Runs under ``torch.no_grad``; an
    ``nn.Module`` in training mode is switched to eval for the call and restored after.
    ``progress=None`` shows a tqdm bar (stderr) when there are more than 20 batches.
    """
    files = [Path(f) for f in (stdlib_files("heldout") if files is None else files)]
    wins = _windows(files, context, max_bytes)
    if not wins:
        raise ValueError("nothing to evaluate: files are empty or max_bytes is 0")
    batches = [wins[i : i + batch_size] for i in range(0, len(wins), batch_size)]
    if progress is None:
        progress = len(batches) > 20
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="bits/byte", unit="batch", file=sys.stderr, leave=False)
    was_training = isinstance(fn, torch.nn.Module) and fn.training
    if was_training:
        fn.eval()
    total_nats, total_bytes = 0.0, 0
    try:
        with torch.no_grad():
            for batch in it:
                width = max(len(w) for w in batch) - 1
                x = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
                y = torch.full((len(batch), width), -100, dtype=torch.long)
                for r, w in enumerate(batch):
                    x[r, : len(w) - 1], y[r, : len(w) - 1] = w[:-1], w[1:]
                logits = logits_of(fn, x).float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                      ignore_index=-100, reduction="sum")
                total_nats += float(nll.double())
                total_bytes += int((y != -100).sum())
    finally:
        if was_training:
            fn.train()
    return total_nats / math.log(2) / total_bytes


def _heldout_bytes(files: Sequence[str | Path] | None) -> bytes:
    files = stdlib_files("heldout") if files is None else [Path(f) for f in files]
    return b"".join(read_bytes(list(files)))


def gzip_bits_per_byte(files: Sequence[str | Path] | None = None) -> float:
    """8 x size of the concatenated files compressed with gzip -9 (incl. header) / raw size."""
    raw = _heldout_bytes(files)
    return 8.0 * len(gzip.compress(raw, compresslevel=9, mtime=0)) / len(raw)


def xz_bits_per_byte(files: Sequence[str | Path] | None = None) -> float:
    """8 x size of the concatenated files compressed with xz (LZMA2 preset 9) / raw size."""
    raw = _heldout_bytes(files)
    return 8.0 * len(lzma.compress(raw, preset=9)) / len(raw)


def greedy_generate(fn: Callable, prompt: str, max_new_tokens: int = 64, context: int = CONTEXT) -> str:
    """Prompt plus its greedy (argmax) continuation; stops early at EOS.

    Recomputes the whole (last ``context`` tokens of the) sequence each step, so it works
    with any ``fn`` -- slow but simple.  Special tokens are not included in the text.
    """
    ids = encode(prompt, bos=True)
    was_training = isinstance(fn, torch.nn.Module) and fn.training
    if was_training:
        fn.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                nxt = int(logits_of(fn, ids[-context:][None])[0, -1].argmax())
                if nxt == EOS_ID:
                    break
                ids = torch.cat([ids, torch.tensor([nxt])])
    finally:
        if was_training:
            fn.train()
    return decode(ids[ids != BOS_ID])
