"""Standard vs ladder-residual tensor parallelism: measured forward latency on a local mesh and
the cost model's prediction, next to the Ladder Residual paper's figure.

    .venv/bin/python benchmarks/ladder.py                   # gloo tp=2 on CPU (NCCL on a GPU machine)
    .venv/bin/python benchmarks/ladder.py --mesh tp=4 --hidden 1024

Both programs come from the same model and plan; the ladder one is compiled with
`dce,ladder_residual(layers=all),spmd_partition,lint` (random weights: latency only), each with a
KV cache of --cache positions. Measured: decode through `compiled.generate` (batch 1, an 8-token
prompt, --new-tokens greedy tokens; tokens/s after the first token, from a streamer's clock —
the Ladder Residual paper's setting) and a prefill-sized forward (batch 1, --prefill tokens).
Writes benchmarks/results_ladder_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

PAPER = {"model": "Llama-3.1-70B", "tp": 8, "batch": 1, "tokens_per_s_standard": 77.4,
         "tokens_per_s_ladder": 101.2, "speedup": 1.31, "source": "Ladder Residual (2025), TP8 H100, batch 1"}
LADDER = "dce,ladder_residual(layers=all),spmd_partition,lint"


def _rank(device_mesh, hidden: int, layers: int, prefill: int, iters: int, threads: int, cache: int,
          new_tokens: int) -> dict:
    import meshc
    from generate import timed
    from tp_vs_dtensor import build, median_ms

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(hidden, layers).to(device)
    ids = torch.randint(0, 2048, (1, 16), device=device)
    kw = {"use_cache": False}
    model.config.max_position_embeddings = max(cache, model.config.max_position_embeddings)
    gen = {"max_cache_len": cache, "max_batch_size": 1}
    standard = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs=kw, plan="megatron", **gen)
    ladder = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs=kw, pipeline=LADDER,
                           plan="megatron", **gen)
    out = {}
    prompt = torch.randint(0, 2048, (1, 8), device=device)
    rates = {"standard": [], "ladder": []}
    for name, compiled in [("standard", standard), ("ladder", ladder)] * 4:  # first pair: warm-up
        rates[name].append(timed(lambda x, n, s, c=compiled: c.generate(x, max_new_tokens=n, eos_token_id=[],
                                                                         streamer=s), prompt, new_tokens)[1])
    s_tps, l_tps = statistics.median(rates["standard"][1:]), statistics.median(rates["ladder"][1:])
    out["decode"] = {"cache": cache, "new_tokens": new_tokens, "standard_tokens_per_s": s_tps,
                     "ladder_tokens_per_s": l_tps, "standard_ms": 1e3 / s_tps, "ladder_ms": 1e3 / l_tps,
                     "seq": 1}
    with torch.no_grad():
        for label, seq in (("prefill", prefill),):
            x = torch.randint(0, 2048, (1, seq), device=device)
            s_ms, l_ms = [], []
            for _ in range(3):  # interleaved, so drift hits both alike
                s_ms.append(median_ms(lambda x=x: standard(x, **kw), iters))
                l_ms.append(median_ms(lambda x=x: ladder(x, **kw), iters))
            out[label] = {"seq": seq, "standard_ms": statistics.median(s_ms), "ladder_ms": statistics.median(l_ms)}
    return out


def main(argv: list[str] | None = None) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from meshc.decoder_cost import LLAMA_3_70B, DecoderShape, predict_ladder_speedup
    from meshc.mesh import MeshSpec
    from meshc.runtime.launch import launch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="tp=2")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=int, default=1024, help="KV cache positions for the decode measurement")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    ranks = launch(_rank, args.mesh, args.hidden, args.layers, args.prefill, args.iters, args.threads, args.cache,
                   args.new_tokens, timeout=1800)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    measured = {}
    for label in ("decode", "prefill"):
        s = statistics.median(r[label]["standard_ms"] for r in ranks)
        lad = statistics.median(r[label]["ladder_ms"] for r in ranks)
        measured[label] = {**ranks[0][label], "standard_ms": s, "ladder_ms": lad, "speedup": s / lad}
    tp = MeshSpec.parse(args.mesh).tp
    small = DecoderShape(args.hidden, args.hidden * 8 // 3 // 16 * 16, args.layers, args.hidden // 64,
                         args.hidden // 64, dtype_bytes=4)
    result = {
        "benchmark": "ladder", "mesh": args.mesh, "device": device,
        "model": f"Llama hidden={args.hidden} layers={args.layers} (random weights, fp32)",
        "measured": measured,
        "predicted_this_config_cpu_gloo": {k: predict_ladder_speedup(small, tp, 1, v["seq"], "cpu-gloo")["speedup"]
                                           for k, v in measured.items()},
        "predicted_70b_tp8_h100_decode": predict_ladder_speedup(LLAMA_3_70B, 8, 1, 1, "h100-nvlink", context=1024),
        "paper": PAPER,
        "machine": f"{platform.machine()}, {args.threads} torch thread(s) per rank",
        "torch": torch.__version__, "command": "python benchmarks/ladder.py " + " ".join(argv or []),
    }
    print(json.dumps(result, indent=2))
    Path(__file__).with_name(f"results_ladder_{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
