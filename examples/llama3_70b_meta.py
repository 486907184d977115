"""A Llama-3-70B-shaped model built on 'meta' (no weights, no download), for planning at scale.

    meshc explain examples/llama3_70b_meta.py:build --mesh tp=8 --preset h100-nvlink
    .venv/bin/python examples/llama3_70b_meta.py          # explain on tp=8, dp=8,tp=8, pp=8,tp=8, timed

The shape is Llama-3-70B's published config (hidden 8192, FFN 28672, 80 layers, 64 query and 8
KV heads, vocabulary 128256), bf16. Capture traces two of the 80 identical blocks and reuses the
second for the rest (`meshc.capture_blocks`), so planning takes seconds and little memory.
"""

from __future__ import annotations

import sys
import time

import torch

SHAPE = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
             num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)


def build(batch: int = 8, seq: int = 512, layers: int = 80):
    """(model on meta, (token ids,), {'use_cache': False}): the factory `meshc` model specs call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, torch_dtype=torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq))
    return model, (ids,), {"use_cache": False}


def main() -> int:
    from meshc.cli import main as meshc

    for mesh in ("tp=8", "dp=8,tp=8", "pp=8,tp=8"):
        t0 = time.perf_counter()
        rc = meshc(["explain", f"{__file__}:build", "--mesh", mesh, "--preset", "h100-nvlink"])
        print(f"\n== meshc explain on {mesh}: {time.perf_counter() - t0:.1f} s end to end (rc {rc})\n", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
