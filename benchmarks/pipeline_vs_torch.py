"""meshc's pipeline runtime vs `torch.distributed.pipelining` on the same model, split and schedule.

    .venv/bin/python benchmarks/pipeline_vs_torch.py                      # pp=2, 1F1B and GPipe, 4 micro-batches
    .venv/bin/python benchmarks/pipeline_vs_torch.py --microbatches 8 --layers 8 --hidden 256

Model: a Hugging Face Llama decoder (8 layers, hidden 256, vocab 2048, random weights). Split: the
embedding and layers 0..3 on rank 0, layers 4..7, the final norm and the head on rank 1 - meshc's
stages are labelled by module path to exactly this split (the pipeline_partition pass's own DP
split is printed for reference), torch's are two `PipelineStage`s of hand-written stage modules.
Both run one training step (forward + backward of every micro-batch, cross-entropy loss, gradients
scaled by 1/microbatches) with the same schedule on the same gloo ranks, interleaved step by step
so drift on a shared machine hits both alike. Figure of merit: `meshc_throughput_over_torch` =
median torch step time / median meshc step time (> 1: meshc is faster). Gradients of both are
compared on every step. Writes benchmarks/results_pipeline_vs_torch_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch


def build(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


class TorchStage(torch.nn.Module):
    """Layers [lo, hi) of a Llama, with the embedding on the first stage and norm + head on the last."""

    def __init__(self, model, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        inner = model.model
        self.embed = inner.embed_tokens if first else None
        self.layers = torch.nn.ModuleList(inner.layers[lo:hi])
        self.rotary = inner.rotary_emb
        self.norm, self.head = (inner.norm, model.lm_head) if last else (None, None)

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        pos = torch.arange(h.shape[1]).unsqueeze(0)
        cos_sin = self.rotary(h, pos)
        for layer in self.layers:  # attention_mask=None: causal SDPA, as the full model on unpadded input
            h = layer(h, position_embeddings=cos_sin, position_ids=pos)
        return self.head(self.norm(h)) if self.head is not None else h


def loss_fn(out, target):
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def label_stages(program, cut_layer: int) -> None:
    """meshc_stage by module path: up to layer cut_layer-1 (with the embedding) stage 0, the rest stage 1."""
    current = 0
    for n in program.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            m = re.search(r"layers\.(\d+)", path)
            if (m and int(m.group(1)) >= cut_layer) or path.endswith(("model.norm", "lm_head")):
                current = 1
        n.meta["meshc_stage"] = current


def _rank(device_mesh, hidden, layers, microbatches, mb_size, seq, schedules, steps, threads):
    import meshc
    from meshc.runtime.pipeline import PipelineModel
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(threads)
    rank = device_mesh.get_rank()
    ids = torch.randint(0, 2048, (microbatches * mb_size, seq), generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 2048, ids.shape, generator=torch.Generator().manual_seed(1))
    kw = {"use_cache": False}
    ours, theirs = build(hidden, layers), build(hidden, layers)
    program = meshc.capture(ours, (ids[:mb_size],), kw, dynamic_shapes="auto", mesh="pp=2")
    dp_split = meshc.PassManager(f"dce,pipeline_partition(microbatches={microbatches})").run(program).notes
    program = meshc.PassManager("dce").run(program)
    label_stages(program, layers // 2)
    program.rank = rank
    stage_mod = TorchStage(theirs, 0 if rank == 0 else layers // 2, layers // 2 if rank == 0 else layers,
                           rank == 0, rank == 1)
    out = {"dp_split": dp_split, "schedules": {}}
    for name in schedules:
        from meshc.schedules import build_schedule

        pipe = PipelineModel(program, build_schedule(name, 2, microbatches), device_mesh)
        stage = PipelineStage(stage_mod, rank, 2, torch.device("cpu"))
        torch_sched = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name](stage, microbatches, loss_fn=loss_fn)
        t_meshc, t_torch, grad_err = [], [], []
        for step in range(steps + 1):
            for m in (ours, theirs):
                for p in m.parameters():
                    p.grad = None
            torch.distributed.barrier()
            t0 = time.perf_counter()
            pipe.train_step((ids,), target, loss_fn, kw)
            t1 = time.perf_counter()
            torch.distributed.barrier()
            t2 = time.perf_counter()
            if rank == 0:
                torch_sched.step(ids)
            else:
                torch_sched.step(target=target, losses=[])
            t3 = time.perf_counter()
            if step:  # the first step warms up (and lets torch infer its stage shapes)
                t_meshc.append(t1 - t0)
                t_torch.append(t3 - t2)
            local = [n for n, p in theirs.named_parameters() if p.grad is not None]
            grad_err.append(max(float((dict(ours.named_parameters())[n].grad - p.grad).abs().max()
                                      / p.grad.abs().max().clamp_min(1e-30))
                                for n, p in theirs.named_parameters() if n in local))
        out["schedules"][name] = {"meshc_step_s": t_meshc, "torch_step_s": t_torch, "max_rel_grad_diff": max(grad_err)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--mb-size", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--schedules", default="1f1b,gpipe")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_pipeline_vs_torch_cpu.json")))
    args = ap.parse_args(argv)
    from meshc.runtime.launch import launch

    schedules = args.schedules.split(",")
    results = launch(_rank, "pp=2", args.hidden, args.layers, args.microbatches, args.mb_size, args.seq, schedules,
                     args.steps, args.threads, timeout=600)
    tokens = args.microbatches * args.mb_size * args.seq
    print("meshc's pipeline_partition (DP) split of the same model, for reference:\n  "
          + "\n  ".join(results[0]["dp_split"][:3]) + "\n")
    rows = {}
    for name in schedules:
        # a step ends when the slowest rank ends: per step, the max over ranks
        m = statistics.median(max(r["schedules"][name]["meshc_step_s"][i] for r in results) for i in range(args.steps))
        t = statistics.median(max(r["schedules"][name]["torch_step_s"][i] for r in results) for i in range(args.steps))
        err = max(r["schedules"][name]["max_rel_grad_diff"] for r in results)
        rows[name] = {"meshc_step_ms": m * 1e3, "torch_step_ms": t * 1e3, "meshc_tokens_per_s": tokens / m,
                      "torch_tokens_per_s": tokens / t, "meshc_throughput_over_torch": t / m,
                      "max_rel_grad_diff_meshc_vs_torch": err}
        print(f"{name:<6} meshc {m * 1e3:8.1f} ms/step  torch.distributed.pipelining {t * 1e3:8.1f} ms/step  "
              f"throughput ratio meshc/torch {t / m:.2f}x  (grads agree to {err:.1e} relative)")
    result = {"benchmark": "pipeline_vs_torch", "mesh": "pp=2", "backend": "gloo",
              "model": f"Llama hidden={args.hidden} layers={args.layers} vocab=2048",
              "split": f"embedding + layers 0..{args.layers // 2 - 1} | layers {args.layers // 2}..{args.layers - 1} "
                       f"+ norm + head",
              "microbatches": args.microbatches, "microbatch": [args.mb_size, args.seq], "steps": args.steps,
              "schedules": rows, "machine": f"{platform.machine()}, {args.threads} torch thread(s) per rank, cpu",
              "torch": torch.__version__, "command": "python benchmarks/pipeline_vs_torch.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
