"""Decode speed of `compiled.generate` vs Hugging Face eager `generate`, one device, as JSON.

    python benchmarks/generate.py [--model reference-lm] [--batches 1,8] [--prompt-len 8]
                                  [--new-tokens 64] [--cache 128] [--repeats 3] [--out result.json]

Both sides decode greedily with one thread, the same prompts and the same number of new tokens
(no early stop): (a) HF `model.generate(do_sample=False, min_new_tokens=N)` with its default
dynamic cache, (c) meshc `compiled.generate(ids, max_new_tokens=N)` with a static cache of
`--cache` positions. Reported per batch size: decode tokens/s (new tokens x batch / time; HF's
time includes its prefill, so meshc's prefill is included too) as medians with min/max over
`--repeats` alternating runs, the ratio (c)/(a) of the medians, and meshc's time to first token.
Not measured here yet (issue 13): HF static cache + torch.compile, meshes, a 512-token prompt.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def run(model_name: str, batches: list[int], prompt_len: int, new_tokens: int, cache: int, repeats: int) -> dict:
    import meshc
    from meshc.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_name, batch=max(batches), seq=prompt_len)
    model = loaded.model
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (max(batches), prompt_len), generator=g)
    t0 = time.perf_counter()
    compiled = meshc.compile(model, None, example_inputs=(ids,), max_cache_len=cache, max_batch_size=max(batches))
    compile_s = time.perf_counter() - t0
    rows = []
    for b in batches:
        x = ids[:b]
        with torch.no_grad():  # warm-up both
            compiled.generate(x, max_new_tokens=new_tokens, eos_token_id=[])
            model.generate(x, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0)
        hf, mc, ttft = [], [], []
        for _ in range(repeats):
            with torch.no_grad():
                t = time.perf_counter()
                model.generate(x, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=0)
                hf.append(b * new_tokens / (time.perf_counter() - t))
                t = time.perf_counter()
                compiled.generate(x, max_new_tokens=new_tokens, eos_token_id=[])
                mc.append(b * new_tokens / (time.perf_counter() - t))
                ttft.append(compiled.decoder.stats.time_to_first_token_s * 1e3)
        rows.append({"batch": b, "hf_eager_tokens_per_s": _stats(hf), "meshc_tokens_per_s": _stats(mc),
                     "meshc_time_to_first_token_ms": _stats(ttft),
                     "ratio_meshc_over_hf_eager": statistics.median(mc) / statistics.median(hf)})
        print(f"batch {b}: HF eager {statistics.median(hf):.1f} tok/s, meshc {statistics.median(mc):.1f} tok/s "
              f"({rows[-1]['ratio_meshc_over_hf_eager']:.2f}x)", flush=True)
    return {"benchmark": "generate", "model": model_name, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "max_cache_len": cache, "threads": 1, "repeats": repeats, "meshc_compile_s": compile_s, "rows": rows,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference-lm")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    result = run(a.model, [int(b) for b in a.batches.split(",")], a.prompt_len, a.new_tokens, a.cache, a.repeats)
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
