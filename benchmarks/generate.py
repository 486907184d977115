"""Decode speed and time to first token of `compiled.generate` against Hugging Face, as JSON.

    python benchmarks/generate.py [--model reference-lm|llama-512] [--batches 1,8] [--new-tokens 64]
                                  [--context N] [--repeats 3] [--mesh tp=2] [--no-torch-compile] [--out F]

Models: (i) `reference-lm` at context 128 (default), (ii) `llama-512`, the Llama of
`benchmarks/tp_vs_dtensor.py` (hidden 512, 4 layers) with a 4096-position config, at context 1024.
Every side decodes greedily with one thread per process, the same prompts (8 tokens) and the same
number of new tokens (no early stop):

    (a) HF eager `model.generate(do_sample=False)`, its default dynamic cache
    (b) HF with a static cache + `torch.compile(model.forward)` (gpt-fast's recipe; first call timed apart)
    (c) meshc `compiled.generate` on one device (a static cache of `--context` positions; a decode
        step attends over the filled prefix rounded up to a power of two, as HF's dynamic cache
        attends over the filled positions)
    (d) meshc on a gloo `--mesh` (tp=2: two processes, the cache sharded with the heads)
    (e) DTensor `parallelize_module` (Megatron plan) on the same mesh, running HF generate

Each is timed with a streamer: time to first token (prefill + first token) and decode tokens/s
(new tokens after the first x batch / the time after the first). Time to first token is also
measured for a long prompt: min(512, context - new tokens) tokens. Runs alternate between the
sides; medians with min/max over `--repeats`; ratios are of medians from this one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = 8


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


class _Clock:
    """A streamer recording when the first new token arrives (HF and meshc call put(prompt) first)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, _value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def timed(generate, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(time to first token in ms, decode tokens/s after it) of one `generate(ids, new, streamer)` call."""
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        generate(ids, new, clock)
    t1 = time.perf_counter()
    return (clock.first - t0) * 1e3, ids.shape[0] * (new - 1) / (t1 - clock.first)


def build(name: str):
    """(model, context) for the two benchmark models."""
    if name == "llama-512":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=512 * 8 // 3 // 16 * 16,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                          max_position_embeddings=4096)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval(), 1024
    from meshc.models import load_model

    return load_model(name).model, 128


def _hf(model):
    def gen(ids, new, streamer):
        return model.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                              streamer=streamer)
    return gen


def _meshc(compiled):
    return lambda ids, new, streamer: compiled.generate(ids, max_new_tokens=new, eos_token_id=[], streamer=streamer)


def _prompts(model, batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def measure(sides: dict, model, batches: list[int], new: int, long_prompt: int, repeats: int) -> list[dict]:
    """Per batch: every side's time to first token and decode tokens/s (alternating runs), then the
    long prompt's time to first token at batch 1."""
    rows = []
    for b, length in [*((b, PROMPT) for b in batches), (1, long_prompt)]:
        ids = _prompts(model, b, length)
        n = new if length == PROMPT else 2
        for gen in sides.values():  # warm-up
            timed(gen, ids, n)
        got = {k: ([], []) for k in sides}
        for _ in range(repeats):
            for k, gen in sides.items():
                ttft, rate = timed(gen, ids, n)
                got[k][0].append(ttft)
                got[k][1].append(rate)
        row = {"batch": b, "prompt_len": length}
        for k, (ttft, rate) in got.items():
            row[k] = {"time_to_first_token_ms": _stats(ttft)}
            if length == PROMPT:
                row[k]["decode_tokens_per_s"] = _stats(rate)
        rows.append(row)
        print(f"batch {b} prompt {length}: " + ", ".join(
            f"{k} ttft {statistics.median(v[0]):.1f} ms" + (f" {statistics.median(v[1]):.1f} tok/s"
                                                             if length == PROMPT else "")
            for k, v in got.items()), flush=True)
    return rows


def per_step_overhead(compiled) -> dict:
    """On CPU at batch 1 a decode step is mostly per-op dispatch: the decode graph's op count times
    the measured cost of one tiny ATen op is a floor under meshc's step time."""
    ops = sum(n.op == "call_function" for n in compiled.decoder.programs.decode.graph.nodes)
    a, b = torch.ones(4), torch.ones(4)
    for _ in range(100):
        torch.add(a, b)
    t = time.perf_counter()
    for _ in range(2000):
        torch.add(a, b)
    per_op_us = (time.perf_counter() - t) / 2000 * 1e6
    return {"decode_graph_ops": ops, "tiny_aten_op_us": per_op_us, "dispatch_floor_ms": ops * per_op_us / 1e3}


def single_device(name: str, batches: list[int], new: int, repeats: int, torch_compile: bool) -> dict:
    import meshc

    torch.set_num_threads(1)
    model, context = build(name)
    long_prompt = min(512, context - new)
    ids = _prompts(model, max(batches), PROMPT)
    t = time.perf_counter()
    compiled = meshc.compile(model, None, example_inputs=(ids,), max_cache_len=context, max_batch_size=max(batches))
    out = {"meshc_compile_s": time.perf_counter() - t, **per_step_overhead(compiled)}
    sides = {"a_hf_eager": _hf(model), "c_meshc": _meshc(compiled)}
    if torch_compile:
        static = copy.deepcopy(model)
        static.generation_config.cache_implementation = "static"
        static.generation_config.cache_config = {"max_cache_len": context}
        static.forward = torch.compile(static.forward)
        t = time.perf_counter()
        for b in batches:  # first calls (compilation) per batch shape, timed apart
            timed(_hf(static), _prompts(model, b, PROMPT), 4)
        out["b_torch_compile_first_calls_s"] = time.perf_counter() - t
        sides["b_hf_static_torch_compile"] = _hf(static)
    out["rows"] = measure(sides, model, batches, new, long_prompt, repeats)
    return out


def _mesh_rank(device_mesh, name: str, batches: list[int], new: int, repeats: int) -> dict:
    import meshc
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    model, context = build(name)
    ids = _prompts(model, max(batches), PROMPT)
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), max_cache_len=context,
                             max_batch_size=max(batches))
    dt_model, _ = build(name)
    styles = {"q_proj": ColwiseParallel, "k_proj": ColwiseParallel, "v_proj": ColwiseParallel,
              "o_proj": RowwiseParallel, "gate_proj": ColwiseParallel, "up_proj": ColwiseParallel,
              "down_proj": RowwiseParallel}
    plan = {f"model.layers.*.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}": v() for k, v in styles.items()}
    parallelize_module(dt_model, device_mesh, plan)
    sides = {"d_meshc_mesh": _meshc(compiled), "e_dtensor_hf_generate": _hf(dt_model)}
    with torch.no_grad():
        same = torch.equal(compiled.generate(ids[:1], max_new_tokens=16, eos_token_id=[]),
                           _hf(model)(ids[:1], 16, None))
    rows = measure(sides, model, batches, new, min(512, context - new), repeats)
    return {"rows": rows, "meshc_greedy_equals_single_device_hf": same}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference-lm", choices=["reference-lm", "llama-512"])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mesh", default="tp=2", help="mesh for (d) and (e); 'none' skips them")
    p.add_argument("--no-torch-compile", action="store_true", help="skip (b)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    result = {"benchmark": "generate", "model": a.model, "new_tokens": a.new_tokens, "prompt_len": PROMPT,
              "threads_per_process": 1, "repeats": a.repeats, "machine": platform.processor() or platform.machine(),
              "cores": __import__("os").cpu_count(), "torch": torch.__version__}
    result["one_device"] = single_device(a.model, batches, a.new_tokens, a.repeats, not a.no_torch_compile)
    if a.mesh != "none":
        from meshc import launch

        result["mesh"] = a.mesh
        result["on_mesh"] = launch(_mesh_rank, a.mesh, a.model, batches, a.new_tokens, a.repeats, timeout=3000)[0]
    result["ratios"] = _ratios(result)
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.write_text(text)
    print(json.dumps(result["ratios"], indent=1))
    return result


def _ratios(result: dict) -> dict:
    """Median-over-median ratios per batch: (c)/(a), (c)/(b) decode tokens/s, (d)/(e) on the mesh."""
    out = {}
    pairs = [("one_device", "c_meshc", "a_hf_eager"), ("one_device", "c_meshc", "b_hf_static_torch_compile"),
             ("on_mesh", "d_meshc_mesh", "e_dtensor_hf_generate")]
    for part, num, den in pairs:
        for row in result.get(part, {}).get("rows", []):
            if num in row and den in row:
                key = f"batch{row['batch']}_prompt{row['prompt_len']}"
                if "decode_tokens_per_s" in row[num]:
                    out[f"{num}/{den} decode tokens/s {key}"] = (row[num]["decode_tokens_per_s"]["median"]
                                                                 / row[den]["decode_tokens_per_s"]["median"])
                out[f"{den}/{num} time to first token {key}"] = (row[den]["time_to_first_token_ms"]["median"]
                                                                 / row[num]["time_to_first_token_ms"]["median"])
    return out


if __name__ == "__main__":
    main()
