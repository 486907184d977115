"""meshc's Triton backend vs eager and torch.compile on a GPU: whole-model forwards and each
generated kernel, plus every memory-bound kernel's achieved bandwidth as a fraction of the
device's peak.

    .venv/bin/python benchmarks/triton_vs.py                 # needs CUDA: Llama-style ~1.1B, bf16
    .venv/bin/python benchmarks/triton_vs.py --layers 4      # quicker
    .venv/bin/python benchmarks/triton_vs.py --smoke         # CPU: tiny model, interpreter, checks the script

Model: a Hugging Face Llama (hidden 2048, 16 layers, MLP 8192, 32 heads / 8 KV heads, vocab 32000:
about 1.1B parameters), random weights, bf16. Phases: "decode" = batch 1, one token (a stateless
1-token forward: meshc compiles forwards without a KV cache), "prefill" = batch 1, 2048 tokens.
Contenders per phase: eager, torch.compile (default), torch.compile(mode="max-autotune-no-cudagraphs"),
meshc backend="triton". Per kernel: each distinct generated kernel (layers repeat, so kernels
with the same source and input shapes are timed once and counted) vs its own region of ATen ops
run eagerly and under torch.compile. Times are medians (`triton.testing.do_bench`); figures
of merit are ratios within one run. Writes benchmarks/results_triton_vs_<device>.json.
Most of the run time is torch.compile's max-autotune; `--phases decode` or `--phases prefill`
splits the run (each writes its own JSON; pass `--out`).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.fx as fx

PEAK_BANDWIDTH = [  # (substring of torch.cuda.get_device_name, bytes/s): vendor datasheet HBM peaks
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12),
]


def peak_bandwidth(device_name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in device_name), None)


def build(args, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def bench_ms(fn, smoke: bool) -> float:
    """Median milliseconds of fn(); do_bench on a GPU (warm-up, cache flush, CUDA events)."""
    if smoke:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(t) for t in x)
    return 0


class _RecordKernelCalls(fx.Interpreter):
    """Runs the lowered graph once and keeps the arguments of the first call of each kernel."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.args = names, {}

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        name = getattr(target, "__name__", "")
        if name in self.names and name not in self.args:
            self.args[name] = tuple(args)  # the graph is functional: these tensors are never written again
        return out


def region_module(program, kernel) -> fx.GraphModule:
    """The kernel's region as a GraphModule of ATen ops: inputs = the region's inputs, in the
    kernel launcher's order; outputs = the values it writes."""
    by_name = {n.name: n for n in program.graph.nodes}
    nodes = [by_name[n] for n in kernel.nodes]
    inputs = [by_name[r.split()[0].lstrip("%")] for r in kernel.reads]
    outputs = [by_name[w.split()[0].lstrip("%")] for w in kernel.writes]
    g, env = fx.Graph(), {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"in{i}")
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs) if len(outputs) > 1 else env[outputs[0]])
    return fx.GraphModule(torch.nn.Module(), g)


def _dedupe_key(kernel, args) -> str:
    """Same code and input shapes -> same key: the kernel's body without comments, with its name
    and the per-node value names (v_<node>) renamed in order of appearance."""
    body = re.sub(r"#[^\n]*", "", kernel.source.split("@triton.jit", 1)[-1].replace(kernel.name, "K"))
    names = list(dict.fromkeys(re.findall(r"\bv_\w+", body)))
    body = re.sub(r"\bv_\w+", lambda m: f"v{names.index(m.group(0))}", body)
    shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
    return body + repr(shapes)


def per_kernel(compiled, smoke: bool, peak: float | None, with_compile: bool) -> list[dict]:
    lowered = compiled._run_flat
    kernels = {k.name: k for k in lowered.kernels}
    rec = _RecordKernelCalls(lowered.gm, set(kernels))
    with torch.no_grad():
        rec.run(*lowered.state, *compiled.program.bind_inputs(*compiled.program.example_inputs))
    groups: dict[str, dict] = {}
    for name, args in rec.args.items():
        key = _dedupe_key(kernels[name], args)
        if key in groups:
            groups[key]["count"] += 1
            continue
        groups[key] = {"name": name, "args": args, "count": 1}
    rows = []
    for g in groups.values():
        k, args = kernels[g["name"]], g["args"]
        launch = next(n.target for n in lowered.gm.graph.nodes if getattr(n.target, "__name__", "") == k.name)
        ref = region_module(compiled.program, k)
        with torch.no_grad():
            out = launch(*args)
            row = {"kernel": k.name, "kind": k.kind, "count": g["count"], "nodes": k.nodes,
                   "meshc_ms": bench_ms(partial(launch, *args), smoke),
                   "eager_ms": bench_ms(partial(ref, *args), smoke)}
            if with_compile:
                compiled_ref = torch.compile(ref)
                compiled_ref(*args)
                row["torch_compile_ms"] = bench_ms(partial(compiled_ref, *args), smoke)
        row["bytes"] = _nbytes(args) + _nbytes(out)
        if k.kind in ("pointwise", "reduction"):  # memory-bound: achieved bandwidth
            row["gbytes_per_s"] = row["bytes"] / row["meshc_ms"] / 1e6
            row["fraction_of_peak_bandwidth"] = row["gbytes_per_s"] * 1e9 / peak if peak else None
        rows.append(row)
    return rows


def run_phase(model, phase: str, batch: int, seq: int, args, device: str) -> dict:
    import meshc

    ids = torch.randint(0, args.vocab, (batch, seq), device=device, generator=None)
    kw = {"use_cache": False}
    t0 = time.perf_counter()
    compiled = meshc.compile(model, example_inputs=(ids,), example_kwargs=kw, backend="triton", dynamic_shapes=None)
    compile_s = {"meshc_triton": time.perf_counter() - t0}
    contenders = {"eager": lambda: model, "meshc_triton": lambda: compiled}
    if not args.smoke:  # each torch.compile starts from a reset dynamo cache: no reuse across modes/phases
        contenders["torch_compile_default"] = lambda: torch.compile(model, dynamic=False)
        contenders["torch_compile_max_autotune_no_cudagraphs"] = lambda: torch.compile(
            model, mode="max-autotune-no-cudagraphs", dynamic=False)
    result = {"phase": phase, "batch": batch, "seq": seq, "forward_ms": {}, "compile_s": compile_s,
              "max_abs_error_vs_eager": {}}
    with torch.no_grad():
        ref = model(ids, **kw).logits.float()
        for name, make in contenders.items():
            if name.startswith("torch_compile"):
                torch._dynamo.reset()
            fn = make()
            t0 = time.perf_counter()
            out = fn(ids, **kw).logits.float()  # the first call compiles torch.compile
            if name.startswith("torch_compile"):
                compile_s[name] = time.perf_counter() - t0
            result["max_abs_error_vs_eager"][name] = (out - ref).abs().max().item()
            result["forward_ms"][name] = bench_ms(partial(fn, ids, **kw), args.smoke)
    f = result["forward_ms"]
    for name in f:
        if name.startswith("torch_compile"):
            result[f"meshc_over_{name}"] = f["meshc_triton"] / f[name]
    result["meshc_over_eager"] = f["meshc_triton"] / f["eager"]
    result["kernels"] = per_kernel(compiled, args.smoke, args.peak, with_compile=not args.smoke)
    result["n_generated_kernels"] = len(compiled._run_flat.kernels)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prefill", type=int, default=2048, help="prefill tokens (batch 1)")
    p.add_argument("--phases", default="decode,prefill", help="which phases to run (each writes into the JSON)")
    p.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, interpreter, no JSON")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 64, 96, 2, 4, 2, 128
        args.prefill, device, dtype, args.peak, name = 9, "cpu", torch.float32, None, "cpu (smoke)"
    elif not torch.cuda.is_available():
        print("benchmarks/triton_vs.py measures Triton kernels on a CUDA GPU, and this machine has none "
              "(torch.cuda.is_available() is False). Run it on a GPU machine, or check the script on CPU "
              "with --smoke.", file=sys.stderr)
        return 2
    else:
        device, dtype, name = "cuda", torch.bfloat16, torch.cuda.get_device_name()
        args.peak = peak_bandwidth(name)
    model = build(args, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    result = {"benchmark": "triton_vs", "device": name, "peak_bandwidth_bytes_per_s": args.peak,
              "model": f"Llama hidden={args.hidden} layers={args.layers} mlp={args.intermediate} "
                       f"heads={args.heads}/{args.kv_heads} vocab={args.vocab}",
              "parameters": n_params, "dtype": str(dtype).removeprefix("torch."),
              "phases": [run_phase(model, phase, 1, {"decode": 1, "prefill": args.prefill}[phase], args, device)
                         for phase in args.phases.split(",")],
              "machine": platform.machine(), "torch": torch.__version__,
              "command": "python benchmarks/triton_vs.py " + " ".join(argv or [])}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(result, indent=2))
    if not args.smoke:
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        out = args.out or Path(__file__).with_name(f"results_triton_vs_{slug}.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
