"""Medusa tree decoding vs plain greedy decoding: accepted tokens per step and wall-clock tokens/s,
reference-lm with its shipped heads, batch 1, one device and tp=2, tree sizes 1, 4, 16, 64 — as JSON.

    python benchmarks/medusa.py [--meshes none,tp=2] [--trees 1,4,16,64] [--prompts 5] [--new-tokens 128]
                                [--repeats 2] [--out benchmarks/results_medusa_cpu.json]

Anchor: plain greedy `compiled.generate` on the same compiled model, mesh and prompts, measured in
the same run, alternating with the speculative runs. Trees are the heads' default trees
(`default_tree(size, measured accuracies)`); size 1 is the root alone (one token per call: the
cost of the speculative loop without speculation). tokens/s counts the tokens after the first
(decode time, prefill excluded) on both sides. Also measured: the time of one decode call with T
tokens (T = 1, 4, 16, 64), i.e. what a verification step costs relative to a plain step — where
that ratio exceeds the accepted tokens per step, speculation loses. One thread per rank; the
machine may be shared with other jobs (the JSON records the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

NEW, PROMPT = 128, 32


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _prompts(count: int) -> list[torch.Tensor]:
    import meshc.reference_lm as ref

    files = ref.stdlib_files("heldout", strict=False)
    stream = torch.cat([ref.encode_bytes(b) for b in ref.read_bytes(files)])
    step = (len(stream) - PROMPT) // count
    return [stream[i * step + 7:i * step + 7 + PROMPT][None] for i in range(count)]  # not the test's prompts


def measure(device_mesh, trees: list[int], prompts: int, new: int, repeats: int) -> dict:
    import meshc
    import meshc.reference_lm as ref
    from meshc.passes.speculative_heads import heads_pipeline, trained_heads_file
    from meshc.runtime.speculative import trained_tree

    torch.set_num_threads(1)
    model = ref.load_reference_lm()
    cache = PROMPT + new + max(trees)
    t0 = time.perf_counter()
    compiled = meshc.compile(model, device_mesh, example_inputs=(torch.zeros(1, 8, dtype=torch.long),),
                             max_cache_len=cache, generate=True,
                             pipeline=heads_pipeline(trained_heads_file("reference-lm"), device_mesh))
    compile_s = time.perf_counter() - t0
    decoder = compiled.decoder
    plain_tps, rows = [], {n: {"tps": [], "accepted": [], "steps": 0, "tokens": 0} for n in trees}
    mismatches = 0
    for ids in _prompts(prompts):
        compiled.generate(ids, max_new_tokens=8, eos_token_id=[])  # warm-up
        for _ in range(repeats):
            plain = compiled.generate(ids, max_new_tokens=new, eos_token_id=[])
            plain_tps.append(decoder.stats.tokens_per_s)
            for n in trees:
                out = compiled.generate(ids, max_new_tokens=new, eos_token_id=[], speculative="medusa", tree=n)
                st = decoder.speculative_stats
                rows[n]["tps"].append(st.tokens_per_s)
                rows[n]["accepted"].append(st.accepted_per_step)
                rows[n]["steps"] += st.steps
                rows[n]["tokens"] += st.new_tokens - 1
                mismatches += int(not torch.equal(out, plain))
    call_ms = _call_times(decoder, cache, max(trees))
    anchor = statistics.median(plain_tps)
    table = []
    for n in trees:
        r = rows[n]
        tree = trained_tree(decoder.programs.decode, n)
        table.append({"tree_nodes": tree.size, "tree_depth": tree.depth,
                      "accepted_tokens_per_step": r["tokens"] / r["steps"], "tokens_per_s": _stats(r["tps"]),
                      "speedup_vs_plain_greedy": statistics.median(r["tps"]) / anchor,
                      "verify_call_ms_over_plain_call_ms": call_ms[tree.size] / call_ms[1] if tree.size in call_ms
                      else None})
    return {"compile_s": compile_s, "plain_greedy_tokens_per_s": _stats(plain_tps), "trees": table,
            "decode_call_ms_by_T": call_ms, "runs_differing_from_plain_greedy": mismatches}


def _call_times(decoder, cache: int, largest: int) -> dict[int, float]:
    """Median ms of one decode-Program call with T tokens at cache position 64 (T = 1, 4, 16, 64)."""
    from meshc.runtime.speculative import runners

    out = {}
    decode = runners(decoder).decode
    kv = [c[:1] for c in decoder.cache]
    for t in (1, 4, 16, 64):
        if t > largest or 64 + t > cache:
            continue
        ids = torch.zeros(1, t, dtype=torch.long)
        bias = torch.zeros(1, 1, t, cache)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            with torch.no_grad():
                decode([ids, torch.arange(64, 64 + t)[None], torch.arange(64, 64 + t), bias, *kv])
            times.append((time.perf_counter() - start) * 1e3)
        out[t] = statistics.median(times[2:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meshes", default="none,tp=2")
    p.add_argument("--trees", default="1,4,16,64")
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=NEW)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    trees = [int(t) for t in a.trees.split(",")]
    load_before = os.getloadavg()
    results = {}
    for mesh in a.meshes.split(","):
        t0 = time.perf_counter()
        if mesh == "none":
            results["one_device"] = measure(None, trees, a.prompts, a.new_tokens, a.repeats)
        else:
            import meshc

            try:
                per_rank = meshc.launch(measure, mesh, trees, a.prompts, a.new_tokens, a.repeats, timeout=3000)
            except meshc.LaunchError as e:  # recorded, not hidden: the other meshes' figures still count
                results[mesh] = {"error": str(e).splitlines()[0]}
                print(f"{mesh}: FAILED: {e}", flush=True)
                continue
            results[mesh] = per_rank[0]  # rank 0's clock; every rank ran the same steps
        r = results["one_device" if mesh == "none" else mesh]
        print(f"{mesh}: plain {r['plain_greedy_tokens_per_s']['median']:.1f} tok/s; " + "; ".join(
            f"{row['tree_nodes']} nodes: {row['accepted_tokens_per_step']:.2f} tok/step, "
            f"{row['tokens_per_s']['median']:.1f} tok/s ({row['speedup_vs_plain_greedy']:.2f}x)" for row in r["trees"])
            + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    from meshc.passes.speculative_heads import trained_heads_file
    from safetensors import safe_open

    with safe_open(str(trained_heads_file("reference-lm")), "pt") as f:
        heads_meta = f.metadata()
    result = {"benchmark": "medusa", "model": "reference-lm", "batch": 1, "prompt_len": PROMPT,
              "new_tokens": a.new_tokens, "prompts": a.prompts, "repeats": a.repeats, "threads_per_rank": 1,
              "heads": {k: json.loads(v) for k, v in heads_meta.items() if k in ("top1", "top5", "steps", "distill")},
              "results": results, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores (see the load averages)",
              "torch": torch.__version__}
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
