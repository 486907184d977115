"""Peak memory of loading a checkpoint into a meta-captured, tensor-parallel model: each rank
should grow by about its shard, never by the full model.

    .venv/bin/python benchmarks/sharded_load_memory.py            # GPT-2-style, ~0.5 GB fp32, tp=2

Each rank records its peak RSS (VmHWM) after imports and compile (model on 'meta'), and again
after `meshc.load_checkpoint`; the growth is compared with the full and the local parameter bytes.
Writes benchmarks/results_sharded_load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def _peak_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("needs Linux /proc/self/status")


def _rank(device_mesh, folder: str) -> dict:
    import meshc
    from meshc.runtime.sharded import local_state_bytes
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config.from_pretrained(folder)).eval()
    ids = torch.randint(0, 1000, (1, 16))
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs={"use_cache": False})
    before = _peak_mib()
    meshc.load_checkpoint(compiled, folder)
    after = _peak_mib()
    with torch.no_grad():
        compiled(ids, use_cache=False)
    after_forward = _peak_mib()  # loaded slices may be mmapped pages, resident only once touched
    return {"peak_rss_before_load_mib": before, "peak_rss_after_load_mib": after,
            "peak_rss_after_first_forward_mib": after_forward, "peak_growth_mib": after_forward - before,
            "local_param_mib": local_state_bytes(compiled) / 2**20}


def main(argv: list[str] | None = None) -> dict:
    from meshc.runtime.launch import launch
    from transformers import GPT2Config, GPT2LMHeadModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="tp=2")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args(argv)
    cfg = GPT2Config(vocab_size=32000, n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 64,
                     n_positions=1024)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
        full_mib = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20
        model.save_pretrained(folder)
        del model
        ranks = launch(_rank, args.mesh, folder, timeout=600)
    result = {"benchmark": "sharded_load_memory", "mesh": args.mesh,
              "model": f"GPT-2 hidden={args.hidden} layers={args.layers} vocab=32000 (fp32)",
              "full_param_mib": full_mib, "ranks": ranks,
              "max_growth_over_full": max(r["peak_growth_mib"] for r in ranks) / full_mib,
              "command": "python benchmarks/sharded_load_memory.py " + " ".join(argv or [])}
    print(json.dumps(result, indent=2))
    Path(__file__).with_name("results_sharded_load_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
