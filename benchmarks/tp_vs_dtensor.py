"""meshc's sharded program vs PyTorch's DTensor tensor parallelism (`parallelize_module`) on the
same model, mesh and Megatron plan, in one run; plus the unsharded model on one rank.

    .venv/bin/python benchmarks/tp_vs_dtensor.py                # tp=2 on gloo, CPU
    .venv/bin/python benchmarks/tp_vs_dtensor.py --mesh tp=4 --seq 128

Prints a table and writes JSON (default benchmarks/results_tp_vs_dtensor_<device>.json). The
figure of merit is `meshc_over_dtensor` = median meshc forward / median DTensor forward (lower is
better), measured interleaved on the same ranks.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def build(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


MEGATRON_TP = {  # the same plan, in parallelize_module's form
    "model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


def median_ms(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _rank(device_mesh, hidden: int, layers: int, batch: int, seq: int, iters: int, threads: int) -> dict:
    import meshc
    from meshc.numerics import max_abs_error
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(threads)
    ids = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0))
    kw = {"use_cache": False}
    model = build(hidden, layers)
    with torch.no_grad():
        single_ms = median_ms(lambda: model(ids, **kw), iters) if device_mesh.get_rank() == 0 else None
        ref = model(ids, **kw)
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs=kw, plan="megatron")
    dt_model = build(hidden, layers)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(dt_model, device_mesh, {k: styles[v]() for k, v in MEGATRON_TP.items()})
    with torch.no_grad():
        err_meshc = max_abs_error(ref, compiled(ids, **kw))[0]
        err_dt = max_abs_error(ref, dt_model(ids, **kw))[0]
        meshc_ms, dt_ms = [], []
        for _ in range(3):  # interleave, so drift on a shared machine hits both alike
            meshc_ms.append(median_ms(lambda: compiled(ids, **kw), iters))
            dt_ms.append(median_ms(lambda: dt_model(ids, **kw), iters))
    return {"meshc_ms": statistics.median(meshc_ms), "dtensor_ms": statistics.median(dt_ms),
            "single_rank_unsharded_ms": single_ms, "max_abs_error_meshc": err_meshc,
            "max_abs_error_dtensor": err_dt}


def main(argv: list[str] | None = None) -> dict:
    from meshc.runtime.launch import launch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="tp=2")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ranks = launch(_rank, args.mesh, args.hidden, args.layers, args.batch, args.seq, args.iters, args.threads,
                   timeout=600)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "tp_vs_dtensor", "mesh": args.mesh, "backend": "nccl" if device == "cuda" else "gloo",
        "model": f"Llama hidden={args.hidden} layers={args.layers}", "batch": args.batch, "seq": args.seq,
        "meshc_ms_median": statistics.median(r["meshc_ms"] for r in ranks),
        "dtensor_ms_median": statistics.median(r["dtensor_ms"] for r in ranks),
        "single_rank_unsharded_ms": ranks[0]["single_rank_unsharded_ms"],
        "max_abs_error_meshc": max(r["max_abs_error_meshc"] for r in ranks),
        "max_abs_error_dtensor": max(r["max_abs_error_dtensor"] for r in ranks),
        "machine": f"{platform.machine()}, {args.threads} torch thread(s) per rank, {device}",
        "torch": torch.__version__, "command": "python benchmarks/tp_vs_dtensor.py " + " ".join(argv or []),
    }
    result["meshc_over_dtensor"] = result["meshc_ms_median"] / result["dtensor_ms_median"]
    print(json.dumps(result, indent=2))
    out = args.out or Path(__file__).with_name(f"results_tp_vs_dtensor_{device}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
