"""auto_shard: build + solve time vs depth, and the chosen plan's predicted cost vs Megatron's.

    .venv/bin/python benchmarks/auto_shard.py            # Llama decoders of 12, 24 and 48 layers, tp=4

Identical layers share their strategies and decision variables, so building and solving the
integer program should barely grow with depth (target: 48 layers <= 1.5x the 12-layer time, and
under 10 s). The budget is Megatron's per-rank parameter bytes; the preset h100-nvlink. Capture
(torch.export) is timed separately: it is the front end, not the solver; so is the graph copy every
pass gets from the PassManager. Writes
benchmarks/results_auto_shard.json.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

LAYERS = (12, 24, 48)


def main() -> dict:
    import meshc
    from meshc.passes.auto_shard import default_budget, solve_sharding
    from meshc.plan import make_plan
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    for layers in LAYERS:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=4)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 512, (2, 16))
        t0 = time.perf_counter()
        program = meshc.PassManager("dce").run(meshc.capture(model, (ids,), {"use_cache": False},
                                                            mesh=meshc.MeshSpec.parse("tp=4"), dynamic_shapes="auto"))
        capture_s = time.perf_counter() - t0
        budget = default_budget(program)  # Megatron's per-rank parameter bytes
        runs = []
        for _ in range(5):  # on a fresh copy each time, as the PassManager hands the pass (copy not timed)
            fresh = program.clone()
            t0 = time.perf_counter()
            sol = solve_sharding(fresh, budget=budget, preset="h100-nvlink", copy=False)
            runs.append((time.perf_counter() - t0, sol.solve_seconds))
        total, milp = sorted(runs)[len(runs) // 2]  # the median run
        base = solve_sharding(program, preset="h100-nvlink", fixed_plan=make_plan("megatron", program, program.mesh))
        rows.append({"layers": layers, "nodes": program.num_nodes(), "capture_s": round(capture_s, 2),
                     "build_and_solve_s": round(total, 3), "milp_s": round(milp, 3),
                     "variables": sol.variables, "shared_nodes": sol.shared_nodes, "status": sol.status,
                     "auto_ms": sol.cost * 1e3, "megatron_ms": base.cost * 1e3,
                     "auto_over_megatron": sol.cost / base.cost})
        print(rows[-1], flush=True)
    ratio = rows[-1]["build_and_solve_s"] / rows[0]["build_and_solve_s"]
    result = {"benchmark": "auto_shard", "mesh": "tp=4", "preset": "h100-nvlink",
              "budget": "Megatron's per-rank parameter bytes", "rows": rows,
              f"build_and_solve_{LAYERS[-1]}_over_{LAYERS[0]}": round(ratio, 2),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "command": "python benchmarks/auto_shard.py"}
    print(f"build+solve {LAYERS[-1]} layers / {LAYERS[0]} layers = {ratio:.2f}x")
    Path(__file__).with_name("results_auto_shard.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
