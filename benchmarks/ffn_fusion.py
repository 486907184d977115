"""FFN Fusion latency: the reference LM original vs attention removed vs attention removed + FFN
runs fused, forward at prefill and greedy decode at batch 1, on one device and on a tp=2 mesh.

    .venv/bin/python benchmarks/ffn_fusion.py                 # one device and gloo tp=2 on CPU
    .venv/bin/python benchmarks/ffn_fusion.py --mesh tp=2 --prefill 256 --new-tokens 32

The conversion is the one `examples/convert_ffn_fusion.py` chose (read from its metrics file when
that has run; else `--removed` / `--runs`). Random weights of the reference config: latency only.
Per variant: matmuls and all-reduces per forward (counted in the rank program), prefill forward
ms (batch 1, --prefill tokens) and decode ms per token (`compiled.generate`, KV cache, batch 1),
medians over interleaved rounds with min-max spread. The fusion step itself is `fused` vs
`attention_removed` (the paper's Table 2: 63.38 -> 70.92 tokens/s, 1.12x). Writes
benchmarks/results_ffn_fusion_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

PAPER = {"model": "Llama-Nemotron Ultra-253B (FFN Fusion, NVIDIA 2025)", "hardware": "8x H100",
         "fusion_step_tokens_per_s": [63.38, 70.92], "fusion_step_speedup": 1.12,
         "vs_llama_405b_user_tokens_per_s": 1.71, "source": "FFN Fusion (2025), Table 2"}
REPO = Path(__file__).resolve().parents[1]


def variants(removed: str, runs: str) -> dict[str, str]:
    removal = f"dce,attention_removal(layers='{removed}')"
    return {"original": "dce", "attention_removed": removal, "fused": f"{removal},ffn_fusion(runs='{runs}')"}


def _measure(device_mesh, pipelines: dict, prefill: int, prompt: int, new_tokens: int, rounds: int,
             threads: int) -> dict:
    import meshc
    import meshc.reference_lm as ref
    from meshc.collectives import collective_name
    from meshc.plan import linear_weight

    torch.set_num_threads(threads)
    model = ref.build_reference_lm(seed=0)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    tp = device_mesh is not None
    compiled = {}
    for name, passes in pipelines.items():
        # auto_shard in the pipeline: the prefill/decode Programs are planned by it as the forward is
        pipeline = f"{passes},auto_shard,spmd_partition,lint" if tp else f"{passes},propagate_shapes,lint"
        compiled[name] = meshc.compile(model, device_mesh, example_inputs=(ids,), pipeline=pipeline,
                                       max_cache_len=prompt + new_tokens)
    x = torch.randint(0, 256, (1, prefill), generator=torch.Generator().manual_seed(1))
    p = torch.randint(0, 256, (1, prompt), generator=torch.Generator().manual_seed(2))
    times = {name: {"prefill_ms": [], "decode_ms_per_token": []} for name in compiled}
    with torch.no_grad():
        for c in compiled.values():  # warm up
            c(x)
            c.generate(p, max_new_tokens=2)
        for _ in range(rounds):  # interleaved, so drift hits every variant alike
            for name, c in compiled.items():
                t0 = time.perf_counter()
                c(x)
                times[name]["prefill_ms"].append((time.perf_counter() - t0) * 1e3)
                c.generate(p, max_new_tokens=new_tokens)
                times[name]["decode_ms_per_token"].append(1e3 / c.decoder.stats.tokens_per_s)
    out = {}
    for name, c in compiled.items():
        nodes = list(c.program.graph.nodes)
        out[name] = {"matmuls_per_forward": sum(linear_weight(n) is not None for n in nodes),
                     "all_reduces_per_forward": sum(collective_name(n) == "all_reduce" for n in nodes),
                     **times[name]}
    return out


def _summary(ranks: list[dict], anchor: str = "original") -> dict:
    out = {}
    for name in ranks[0]:
        row = {k: ranks[0][name][k] for k in ("matmuls_per_forward", "all_reduces_per_forward")}
        for key in ("prefill_ms", "decode_ms_per_token"):
            vals = [v for r in ranks for v in r[name][key]]  # every round of every rank
            row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        out[name] = row
    for name, row in out.items():
        for key in ("prefill_ms", "decode_ms_per_token"):
            row[f"{key}_speedup_vs_{anchor}"] = out[anchor][key]["median"] / row[key]["median"]
        if name == "fused":
            for key in ("prefill_ms", "decode_ms_per_token"):
                row[f"{key}_speedup_vs_attention_removed"] = (out["attention_removed"][key]["median"]
                                                              / row[key]["median"])
    return out


def main(argv: list[str] | None = None) -> dict:
    from meshc.runtime.launch import launch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="tp=2", help="the distributed mesh (at most 2 ranks on a shared CPU)")
    p.add_argument("--removed", default=None, help="layers whose attention is removed (default: the example's)")
    p.add_argument("--runs", default=None, help="FFN runs fused (default: the example's)")
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens before generating")
    p.add_argument("--new-tokens", type=int, default=32, help="decode: tokens generated per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shared", action="store_true", help="say in the results that other jobs shared the machine")
    args = p.parse_args(argv)
    metrics = REPO / "runs/ffn_fusion/ffn_fusion_metrics.json"
    chosen = json.loads(metrics.read_text()) if metrics.exists() else {}
    removed = args.removed or ",".join(map(str, chosen.get("removed_attention", [1, 2, 3, 4])))
    runs = args.runs or ",".join(f"{r[0]}-{r[-1]}" for r in chosen.get("runs", [[0, 1, 2, 3, 4]]))
    pipelines = variants(removed, runs)
    one = _summary([_measure(None, pipelines, args.prefill, args.prompt, args.new_tokens, args.rounds, args.threads)])
    ranks = launch(_measure, args.mesh, pipelines, args.prefill, args.prompt, args.new_tokens, args.rounds,
                   args.threads, timeout=1200)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "ffn_fusion", "device": device,
        "model": "reference LM config (hidden 256, 8 layers, SwiGLU 688; random weights, fp32), batch 1",
        "pipelines": pipelines, "prefill_tokens": args.prefill, "decode": {"prompt": args.prompt,
                                                                          "new_tokens": args.new_tokens},
        "one_device": one, args.mesh: _summary(ranks),
        "paper": PAPER,
        "machine": (f"{platform.machine()}, {args.threads} torch thread(s) per rank"
                    + ("; shared with other jobs during the run (contention: medians, min-max spread)"
                       if args.shared else "")),
        "torch": torch.__version__, "command": "python benchmarks/ffn_fusion.py " + " ".join(argv or []),
    }
    print(json.dumps(result, indent=2))
    Path(__file__).with_name(f"results_ffn_fusion_{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
