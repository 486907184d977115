"""Train the shipped reference LM from scratch (reproducibly) and write its weights + metrics.

    python examples/reference_lm/train.py                 # full run, ~1 h on 2 CPU cores
    python examples/reference_lm/train.py --steps 20 --out /tmp/ref_lm   # smoke test

Writes to ``--out`` (default: the ``meshc.reference_lm`` package folder):
``config.json``, ``model.safetensors`` (loaded by ``meshc.reference_lm.load_reference_lm``)
and ``metrics.json`` (held-out bits per byte with the exact eval settings, gzip/xz baselines,
steps, wall time, versions, a greedy sample).  Training checkpoints go to
``--checkpoint-dir`` (gitignored); rerunning the same command resumes from the last one.
All randomness is seeded (``--seed`` for the initialisation, ``--data-seed`` for windows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import meshc.reference_lm as ref
import torch
from meshc.reference_lm.quality import bits_per_byte, greedy_generate, gzip_bits_per_byte, xz_bits_per_byte
from meshc.reference_lm.training import train_lm
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=ref.CONTEXT)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument("--data-seed", type=int, default=0, help="training-window sampling seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 = steady and polite on a shared box)")
    p.add_argument("--out", type=Path, default=ref.PACKAGE_DIR)
    p.add_argument("--checkpoint-dir", type=Path, default=REPO / "examples/reference_lm/checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--eval-max-bytes", type=int, default=None, help="held-out byte budget (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = ref.build_reference_lm(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"reference LM: {n_params:,} parameters; {args.steps} steps x {args.batch_size} x {args.seq_len} "
        f"tokens, lr {args.lr}, {args.threads} thread(s); checkpoints in {args.checkpoint_dir}")
    info: dict = {}
    history = train_lm(
        model, args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        seed=args.data_seed, checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, threads=args.threads,
        progress=sys.stderr.isatty(), log=log, info=info,
    )
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(args.out / "config.json"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "model.safetensors").chmod(0o644)
    log(f"wrote {args.out / 'config.json'} and {args.out / 'model.safetensors'}")
    reloaded = ref.load_reference_lm(args.out)  # evaluate exactly what was shipped

    files = ref.stdlib_files("heldout")
    raw = b"".join(ref.read_bytes(files))
    log(f"evaluating on {len(files)} held-out files ({len(raw):,} bytes)")
    t0 = time.time()
    bpb = bits_per_byte(reloaded, files, context=args.seq_len, max_bytes=args.eval_max_bytes,
                        batch_size=args.eval_batch_size, progress=sys.stderr.isatty())
    eval_s = time.time() - t0
    gz, xz = gzip_bits_per_byte(files), xz_bits_per_byte(files)
    sample = greedy_generate(reloaded, "def ", max_new_tokens=200, context=args.seq_len)
    metrics = {
        "bits_per_byte": bpb,
        "eval": {
            "function": "meshc.reference_lm.quality.bits_per_byte",
            "files": "heldout_files.txt", "n_files": len(files), "n_bytes": len(raw),
            "heldout_sha256": hashlib.sha256(raw).hexdigest(),
            "context": args.seq_len, "max_bytes": args.eval_max_bytes, "batch_size": args.eval_batch_size,
            "scheme": "per file [BOS]+bytes, non-overlapping windows, every byte scored once",
            "seconds": round(eval_s, 1),
        },
        "gzip_bits_per_byte": gz,
        "xz_bits_per_byte": xz,
        "train": {
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "seed": args.seed, "data_seed": args.data_seed, "threads": args.threads,
            "tokens_seen": info.get("tokens_seen"), "wall_s": round(info.get("wall_s", 0.0), 1),
            "final_loss_avg50": sum(history[-50:]) / max(1, len(history[-50:])),
            "n_train_files": len(ref.stdlib_files("train")),
        },
        "n_params": n_params,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
        "sample_prompt": "def ",
        "sample": sample,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"held-out bits/byte {bpb:.4f} (gzip -9 {gz:.4f}, xz -9 {xz:.4f}); eval took {eval_s:.0f}s")
    log(f"wrote {args.out / 'metrics.json'}")
    print("greedy sample from 'def ':\n" + sample, flush=True)


if __name__ == "__main__":
    main()
