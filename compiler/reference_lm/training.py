"""The one training loop of the reference LM: training from scratch and "healing" fine-tunes.

Entry points:

* ``train_lm(model, steps, ...)`` -- next-byte prediction on random windows of the training
  split, AdamW (decoupled weight decay on matrices only), linear warmup + cosine decay,
  gradient clipping, tqdm progress, periodic resumable checkpoints.  Returns the per-step
  loss history (nats per token), including steps done before a resume.
* ``heal(model, steps=300, ...)`` -- the same loop with short fine-tune defaults, for models
  whose architecture a pass has changed.

The model may be a Hugging Face causal LM or any module accepted by
``quality.logits_of``.  Frozen parameters (``requires_grad=False``) stay frozen.

Data: every training file becomes ``[BOS] + bytes + [EOS]``; the files are concatenated in
sorted order and windows of ``seq_len + 1`` tokens are drawn uniformly from that stream with
a ``torch.Generator`` seeded by ``seed`` (so windows may span a file boundary).

Checkpoints (``checkpoint_dir/checkpoint.pt``, written atomically) hold model, optimizer,
step, loss history, data-sampler and torch RNG states; with ``resume=True`` a run picks up
from there and reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from . import CONTEXT, encode_bytes, read_bytes, stdlib_files
from .quality import logits_of

__all__ = ["heal", "lr_at", "train_lm", "training_tokens"]

CHECKPOINT_NAME = "checkpoint.pt"


@lru_cache(maxsize=2)
def _tokens(files: tuple[str, ...]) -> torch.Tensor:
    parts = [encode_bytes(b, bos=True, eos=True) for b in read_bytes([Path(f) for f in files])]
    return torch.cat(parts).to(torch.int16)


def training_tokens(files: Sequence[str | Path] | None = None) -> torch.Tensor:
    """The concatenated token stream (int16) of ``files`` (default: the training split)."""
    files = stdlib_files("train") if files is None else files
    return _tokens(tuple(str(f) for f in files))


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of 0-based ``step``: linear warmup, then cosine down to ``min_lr_ratio * lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_lm(
    model: torch.nn.Module,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 8,
    seq_len: int = CONTEXT,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    log_every: int = 50,
    checkpoint_every: int = 100,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    threads: int | None = None,
    files: Sequence[str | Path] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    info: dict | None = None,
) -> list[float]:
    """Train ``model`` in place for ``steps`` optimizer steps; return the loss per step.

    ``warmup_steps`` defaults to ``min(200, steps // 10)``.  ``threads`` sets
    ``torch.set_num_threads`` for the duration of the call only.  ``stop_after`` ends this
    call after that many steps (checkpointing first), so a long run can be split into
    sessions; the LR schedule always refers to the full ``steps``.  ``log`` receives a plain
    text line every ``log_every`` steps (``None`` to silence).  If ``info`` is a dict it is
    filled with ``wall_s`` (training seconds summed over resumed sessions), ``start_step``,
    ``end_step`` and ``tokens_seen``.
    """
    warmup = min(200, steps // 10) if warmup_steps is None else warmup_steps
    data = training_tokens(files)
    if len(data) <= seq_len + 1:
        raise ValueError(f"training stream has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    opt = _optimizer(model, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    hparams = {"lr": lr, "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "steps": steps}
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, history, wall_before = 0, [], 0.0
    if ckpt is not None and resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, history = state["step"], list(state["history"])
        wall_before = state.get("wall_s", 0.0)
        changed = {k: (v, hparams[k]) for k, v in state["hparams"].items() if hparams.get(k) != v}
        if changed:
            warnings.warn(f"resuming {ckpt} with changed settings (saved, now): {changed}", stacklevel=2)
        if log:
            log(f"resumed from {ckpt} at step {start}")

    def save(step: int) -> None:
        if ckpt is not None:
            _save(ckpt, {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "history": history, "data_rng": gen.get_state(),
                         "torch_rng": torch.get_rng_state(), "hparams": hparams,
                         "wall_s": wall_before + time.time() - t0})

    end = steps if stop_after is None else min(steps, start + stop_after)
    prev_threads = torch.get_num_threads()
    was_training = model.training
    if threads is not None:
        torch.set_num_threads(threads)
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr)
    offsets = torch.arange(seq_len + 1)
    t0, t_log = time.time(), time.time()
    try:
        for step in range(start, end):
            cur_lr = lr_at(step, steps, lr, warmup, min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size, 1), generator=gen)
            chunk = data[starts + offsets].long()
            logits = logits_of(model, chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
            opt.step()
            history.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{cur_lr:.1e}")
            done = step + 1
            if log and log_every and (done % log_every == 0 or done == end):
                n = min(log_every, done - start) or 1
                avg = sum(history[-n:]) / n
                tok_s = n * batch_size * seq_len / max(1e-9, time.time() - t_log)
                log(f"step {done}/{steps} loss {avg:.4f} ({avg / math.log(2):.3f} bits/byte) "
                    f"lr {cur_lr:.2e} {tok_s:.0f} tok/s elapsed {time.time() - t0:.0f}s")
                t_log = time.time()
            if checkpoint_every and done % checkpoint_every == 0 and done != end:
                save(done)
        save(end)
    finally:
        if bar is not None:
            bar.close()
        if threads is not None:
            torch.set_num_threads(prev_threads)
        model.train(was_training)
    if info is not None:
        info.update(wall_s=wall_before + time.time() - t0, start_step=start, end_step=end,
                    tokens_seen=end * batch_size * seq_len)
    return history


def heal(
    model: torch.nn.Module,
    steps: int = 300,
    lr: float = 3e-4,
    batch_size: int = 8,
    seq_len: int = CONTEXT,
    seed: int = 1,
    **kwargs,
) -> list[float]:
    """Short fine-tune of a (converted) model with ``train_lm``; warmup defaults to 10 % of steps."""
    kwargs.setdefault("warmup_steps", max(1, steps // 10))
    return train_lm(model, steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed, **kwargs)
