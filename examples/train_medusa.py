"""Train Medusa heads (Medusa-1: backbone frozen) for the shipped reference LM.

    .venv/bin/python examples/train_medusa.py                  # ~20 min on 2 cores; writes the shipped heads
    .venv/bin/python examples/train_medusa.py --distill        # targets: the base model's own argmax
    .venv/bin/python examples/train_medusa.py --smoke --out /tmp/heads.safetensors   # what the test runs

Loss (Medusa-1): sum_i 0.8^i * CE(head i's logits at position t, token t+i+2), head 0 predicting one
token past lm_head. With `--distill` the target of head i at t is the base model's argmax at t+i+1
(its own prediction of token t+i+2) on the same training text (self-distillation). Heads are
`meshc.passes.speculative_heads.MedusaHeads` (the ops the pass inserts), initialised from lm_head.
Training stops after `--steps` or `--max-minutes` (default 25), checkpointing every `--checkpoint-every`
steps; a rerun resumes. The heads' top-1 .. top-10 accuracy on held-out windows is measured and
printed next to Medusa-1's Vicuna-7B figures, and saved (with the default tree size) as safetensors
metadata beside the reference LM (`meshc generate reference-lm --speculative medusa` reads it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import meshc.reference_lm as ref
import torch
import torch.nn.functional as F
from meshc.passes.speculative_heads import MedusaHeads
from meshc.reference_lm.training import lr_at, training_tokens

REPO = Path(__file__).resolve().parents[1]
OUT = ref.PACKAGE_DIR / "medusa_heads.safetensors"
VICUNA_7B = {"top1": [0.56, 0.32, 0.20, 0.15, 0.12]}  # Medusa-1 paper, heads 1..5 on Vicuna-7B
TOPK = 10
DECAY = 0.8


def head_loss(model, heads: MedusaHeads, chunk: torch.Tensor, distill: bool) -> tuple[torch.Tensor, list[float]]:
    """sum_i 0.8^i CE(head i at t, target t+i+2) over a batch of token windows [B, S]."""
    with torch.no_grad():
        hidden = model.model(input_ids=chunk, use_cache=False).last_hidden_state  # after the final norm
        targets = model.lm_head(hidden).argmax(-1) if distill else None
    logits = heads(hidden)  # [heads, B, S, V]
    total, parts = 0.0, []
    for i in range(len(heads)):
        shift = i + 2
        if distill:  # the base model's prediction of token t+i+2 is its argmax at t+i+1
            want = targets[:, shift - 1:]
        else:
            want = chunk[:, shift:]
        got = logits[i, :, : chunk.shape[1] - shift]
        want = want[:, : got.shape[1]]
        ce = F.cross_entropy(got.reshape(-1, got.shape[-1]).float(), want.reshape(-1))
        total = total + DECAY**i * ce
        parts.append(ce.item())
    return total, parts


@torch.no_grad()
def rank_accuracy(model, heads: MedusaHeads, windows: list[torch.Tensor]) -> list[list[float]]:
    """acc[i][k]: how often head i's (k+1)-th most likely token is the true token t+i+2 (held-out)."""
    counts = torch.zeros(len(heads), TOPK)
    totals = torch.zeros(len(heads))
    for chunk in windows:
        hidden = model.model(input_ids=chunk[None], use_cache=False).last_hidden_state
        logits = heads(hidden)[:, 0]  # [heads, S, V]
        for i in range(len(heads)):
            shift = i + 2
            top = logits[i, : chunk.shape[0] - shift].topk(TOPK, -1).indices  # [S', K]
            hit = top == chunk[shift:, None]
            counts[i] += hit.sum(0).float()
            totals[i] += top.shape[0]
    return (counts / totals[:, None].clamp_min(1)).tolist()


def heldout_windows(seq: int, count: int) -> list[torch.Tensor]:
    """`count` consecutive windows of `seq` tokens from the held-out split (deterministic)."""
    files = ref.stdlib_files("heldout", strict=False)
    stream = torch.cat([ref.encode_bytes(b, bos=True, eos=True) for b in ref.read_bytes(files)])
    return [stream[i * seq:(i + 1) * seq] for i in range(min(count, len(stream) // seq))]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=25.0, help="stop (and save) after this much training")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill", action="store_true", help="targets are the base model's own argmax")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len scored")
    p.add_argument("--tree-size", type=int, default=16, help="default tree size (nodes) stored with the heads")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--checkpoint-dir", type=Path, default=REPO / "runs/medusa")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="3 steps, tiny batches (the test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.eval_windows = 3, 2, 64, 2
    torch.set_num_threads(args.threads)
    model = ref.load_reference_lm()
    for param in model.parameters():
        param.requires_grad_(False)
    heads = MedusaHeads(model.lm_head.weight.detach(), args.heads, args.layers)
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = args.checkpoint_dir / "medusa_checkpoint.pt"
    settings = {k: getattr(args, k) for k in ("heads", "layers", "batch_size", "seq_len", "lr", "distill", "steps")}
    start, wall_before, history = 0, 0.0, []
    if ckpt.exists() and not args.smoke:
        state = torch.load(ckpt, weights_only=True)
        if state["settings"] == settings:
            heads.load_state_dict(state["heads"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["data_rng"])
            start, wall_before, history = state["step"], state["wall_s"], state["history"]
            print(f"resumed from {ckpt} at step {start}", flush=True)
        else:
            print(f"{ckpt} was written with other settings {state['settings']}; starting over", flush=True)

    data = training_tokens()
    offsets = torch.arange(args.seq_len)
    warmup = min(50, args.steps // 10)
    t0 = time.time()

    def save(step: int) -> None:
        if args.smoke:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "heads": heads.state_dict(), "optimizer": opt.state_dict(),
                    "data_rng": gen.get_state(), "wall_s": wall_before + time.time() - t0, "history": history,
                    "settings": settings}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    step = start
    for step in range(start, args.steps):
        if (time.time() - t0 + wall_before) / 60 > args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, max(1, warmup), 0.1)
        starts = torch.randint(0, len(data) - args.seq_len, (args.batch_size, 1), generator=gen)
        loss, parts = head_loss(model, heads, data[starts + offsets].long(), args.distill)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if (step + 1) % 25 == 0 or step == start:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} per head "
                  f"{' '.join(f'{x:.2f}' for x in parts)} ({time.time() - t0 + wall_before:.0f} s)", flush=True)
        if (step + 1) % args.checkpoint_every == 0:
            save(step + 1)
    else:
        step = args.steps
    save(step)
    train_s = wall_before + time.time() - t0

    heads.eval()
    acc = rank_accuracy(model, heads, heldout_windows(args.seq_len, args.eval_windows))
    top1 = [a[0] for a in acc]
    top5 = [sum(a[:5]) for a in acc]
    print(f"\nheld-out accuracy ({args.eval_windows} windows of {args.seq_len} tokens), after {step} steps, "
          f"{train_s / 60:.1f} min:")
    print("head  predicts  top-1   top-5   Medusa-1 Vicuna-7B top-1")
    for i in range(len(acc)):
        paper = VICUNA_7B["top1"][i] if i < len(VICUNA_7B["top1"]) else float("nan")
        print(f"{i:>4}  t+{i + 2:<7} {top1[i]:.3f}   {top5[i]:.3f}   {paper:.2f}")
    from meshc.runtime.speculative import default_tree, expected_length

    tree = default_tree(args.tree_size, acc)
    print(f"default tree: {tree.size} nodes, depth {tree.depth}, expected accepted tokens per step "
          f"{expected_length(tree, acc):.2f} (independent-heads estimate)")
    from safetensors.torch import save_file

    meta = {"heads": args.heads, "layers": args.layers, "steps": step, "distill": args.distill,
            "train_minutes": round(train_s / 60, 2), "batch_size": args.batch_size, "seq_len": args.seq_len,
            "top1": [round(x, 4) for x in top1], "top5": [round(x, 4) for x in top5],
            "accuracy": [[round(x, 5) for x in a] for a in acc], "tree_size": tree.size,
            "loss_last": round(sum(history[-25:]) / max(1, len(history[-25:])), 4) if history else math.nan}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, str(args.out),
              metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    print(f"wrote {args.out}")
    return meta


if __name__ == "__main__":
    main()
