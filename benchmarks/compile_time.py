"""meshc compile time vs torch.compile (default backend, first call) for a model on CPU.

    python benchmarks/compile_time.py [--model llama-tiny] [--repeats 3] [--out result.json]

Each measurement runs in a fresh Python process (no warm import or compile caches; Inductor gets
an empty cache folder), timing from "model and inputs ready" to "first output returned":
  meshc:                      meshc.compile(...) + first call
  meshc (run_decompositions): the same, with capture lowering torch.export's training IR by torch's
                              second trace (`ExportedProgram.run_decompositions({})`) instead of
                              meshc.inference_ir's local rewrite — what capture did before it
  torch.compile:              torch.compile(model) + first call (Dynamo + Inductor)
The contenders alternate within each repeat. Reports medians, their spread (min, max) and the
ratios to meshc from the same run, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

RETRACE = "meshc (run_decompositions)"


def measure(which: str, model_name: str) -> float:
    import meshc
    import torch
    from meshc.models import load_model

    loaded = load_model(model_name)
    args, kwargs = loaded.example_inputs, loaded.example_kwargs
    with torch.no_grad():
        t0 = time.perf_counter()
        if which.startswith("meshc"):
            if which == RETRACE:  # the module (meshc.capture the attribute is the function)
                sys.modules["meshc.capture"].to_inference_ir = lambda ep: ep.run_decompositions({})
            compiled = meshc.compile(loaded.model, example_inputs=args, example_kwargs=kwargs)
        else:
            compiled = torch.compile(loaded.model)
        compiled(*args, **kwargs)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--one", choices=["meshc", RETRACE, "torch.compile"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps({"seconds": measure(a.one, a.model)}))
        return
    times: dict[str, list[float]] = {"meshc": [], RETRACE: [], "torch.compile": []}
    for r in range(a.repeats):
        for which in times:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, __file__, "--one", which, "--model", a.model],
                                     capture_output=True, text=True, env=env, timeout=900)
            if out.returncode != 0:
                sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
            times[which].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
            print(f"repeat {r + 1}/{a.repeats}: {which} {times[which][-1]:.2f} s", file=sys.stderr)
    import torch

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "compile_time",
        "model": a.model,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "seconds": times,
        "median_seconds": med,
        "spread_seconds": {k: [min(v), max(v)] for k, v in times.items()},
        "ratio_torch_compile_over_meshc": med["torch.compile"] / med["meshc"],
        "ratio_run_decompositions_over_meshc": med[RETRACE] / med["meshc"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
