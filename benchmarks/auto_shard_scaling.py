"""auto_shard solve time vs model depth, and its plan's predicted cost vs Megatron's.

    .venv/bin/python benchmarks/auto_shard_scaling.py            # Llama configs of 2..32 layers, tp=4

Repeated layers share decision variables, so the integer program should not grow with depth.
Writes benchmarks/results_auto_shard_scaling.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def main() -> dict:
    import meshc
    from meshc.passes.auto_shard import _nbytes, solve_sharding
    from meshc.placement import Shard
    from meshc.plan import make_plan
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    for layers in (2, 4, 8, 16, 32):
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=4)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 512, (2, 16))
        program = meshc.PassManager("dce").run(meshc.capture(model, (ids,), {"use_cache": False},
                                                            mesh=meshc.MeshSpec.parse("tp=4"), dynamic_shapes="auto"))
        megatron = make_plan("megatron", program, program.mesh)
        budget = sum(_nbytes(p) / (4 if any(isinstance(x, Shard) for x in megatron.for_param(p.meta["meshc_name"]))
                                   else 1) for p in program.placeholders("parameter"))
        t0 = time.perf_counter()
        sol = solve_sharding(program, budget=budget, preset="h100-nvlink")
        total = time.perf_counter() - t0
        base = solve_sharding(program, preset="h100-nvlink", fixed_plan=megatron)
        rows.append({"layers": layers, "nodes": program.num_nodes(), "variables": sol.variables,
                     "shared_nodes": sol.shared_nodes, "solve_s": sol.solve_seconds, "build_and_solve_s": total,
                     "status": sol.status, "predicted_ms": sol.cost * 1e3, "megatron_ms": base.cost * 1e3})
        print(rows[-1], flush=True)
    result = {"benchmark": "auto_shard_scaling", "mesh": "tp=4", "preset": "h100-nvlink",
              "budget": "Megatron's per-rank parameter bytes", "rows": rows,
              "command": "python benchmarks/auto_shard_scaling.py"}
    Path(__file__).with_name("results_auto_shard_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
