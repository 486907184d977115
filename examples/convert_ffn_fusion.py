"""Convert the shipped reference LM with FFN Fusion: remove the least useful attention, heal, fuse
the FFN runs this creates into wide FFNs, heal again; and the same runs as parallel blocks.

    .venv/bin/python examples/convert_ffn_fusion.py                      # full run (resumable, < 60 min)
    .venv/bin/python examples/convert_ffn_fusion.py --smoke --out /tmp/ffn   # seconds: the test's run

Steps (bits per byte on the held-out stdlib files after each; every step is saved in `--out`, and
a rerun skips the steps already done, healing resumes from its checkpoint):

1. original model; then, for every layer, the increase when only that layer's attention is removed;
2. `attention_removal` of the `--remove` layers whose attention matters least, before / after
   healing (`meshc.reference_lm.training.heal`, `--steps`);
3. `ffn_fusion` of the FFN runs that creates (FFN count e.g. 8 -> 4), before / after healing;
4. `parallel_blocks` of the same runs on the original model, before / after healing;
5. the healed fused weights saved as safetensors (`fused/model.safetensors`), reloaded by running
   the same passes on the original config (`meshc.load_checkpoint`), and scored compiled on tp=2.

Writes `<out>/ffn_fusion_metrics.json` (what the README table shows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import meshc
import meshc.reference_lm as ref
import torch
from meshc.passes.residual_stream import find_residual_stream
from meshc.reference_lm.quality import bits_per_byte
from meshc.reference_lm.training import heal

REPO = Path(__file__).resolve().parents[1]


def ffn_count(program) -> int:
    stream = find_residual_stream(program)
    return sum(1 for k in range(1, len(stream) + 1) if not stream.attends(k))


def runs_for(removed: list[int]) -> list[list[int]]:
    """Layer runs of consecutive FFNs once the attention of `removed` is gone: a block a..b of
    removed layers joins the FFN of layer a-1 (runs of one FFN are dropped)."""
    runs: list[list[int]] = []
    for layer in sorted(removed):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer - 1, layer] if layer >= 1 else [layer])
    return [r for r in runs if len(r) > 1]


def spell(layers: list[list[int]] | list[int]) -> str:
    """'1-2,4-6' for runs, '3,5,7' for layers (a quoted pipeline option value)."""
    items = [f"{r[0]}-{r[-1]}" for r in layers] if layers and isinstance(layers[0], list) else map(str, layers)
    return ",".join(items)


def with_state(program, module):
    """`program` with the (trained) tensors of its ProgramModule `module`."""
    out = program.clone()
    for ph, key in module._order:
        out.state[ph] = module.tensors[key].detach()
    return out


def _tp_bits_per_byte(device_mesh, folder: str, passes: str, max_bytes: int) -> float:
    model = ref.build_reference_lm(seed=0)  # the original config; every weight comes from the checkpoint
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs={"use_cache": False},
                             pipeline=f"{passes},spmd_partition,lint", plan="megatron")
    meshc.load_checkpoint(compiled, folder)
    return bits_per_byte(lambda x: compiled(x).logits, max_bytes=max_bytes, progress=False)


class Run:
    """The metrics file and the saved weights of a (resumable) conversion run."""

    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "ffn_fusion_metrics.json"
        self.m = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.m, indent=2) + "\n")

    def bpb(self, key: str, fn, max_bytes: int | None = None) -> float:
        if key not in self.m.setdefault("bits_per_byte", {}):
            t0 = time.time()
            self.m["bits_per_byte"][key] = bits_per_byte(fn, max_bytes=max_bytes or self.args.max_bytes,
                                                         progress=False)
            self.save()
            print(f"  {key}: {self.m['bits_per_byte'][key]:.4f} bits/byte ({time.time() - t0:.0f} s)", flush=True)
        return self.m["bits_per_byte"][key]

    def healed(self, name: str, program):
        """A ProgramModule of `program` healed for --steps (resuming; loaded if already done)."""
        from safetensors.torch import load_file, save_file

        student = program.to_module()
        weights = self.out / f"{name}.safetensors"
        if weights.exists():
            saved = load_file(str(weights))
            for key, t in student.tensors.items():
                if key.replace("/", ".") in saved:
                    t.data.copy_(saved[key.replace("/", ".")])
            return student
        t0 = time.time()
        heal(student, steps=self.args.steps, batch_size=self.args.batch_size, threads=self.args.threads,
             checkpoint_dir=self.out / f"heal_{name}", checkpoint_every=25, log_every=50, progress=False,
             seq_len=self.args.seq_len)
        save_file({k: v.contiguous() for k, v in student.export_state().items()}, str(weights))
        self.m.setdefault("heal_seconds", {})[name] = round(time.time() - t0, 1)
        self.save()
        return student


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--remove", type=int, default=4, help="layers whose attention is removed (default 4 of 8)")
    p.add_argument("--steps", type=int, default=150, help="healing steps after each conversion (default 150)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-bytes", type=int, default=100_000, help="held-out bytes scored (default 100k)")
    p.add_argument("--importance-bytes", type=int, default=50_000, help="held-out bytes per attention-removal probe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mesh", default="tp=2")
    p.add_argument("--smoke", action="store_true", help="tiny everything (2 steps, 2k bytes): the example's test")
    p.add_argument("--out", type=Path, default=REPO / "runs/ffn_fusion")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.max_bytes, args.importance_bytes = 2, 2, 64, 2048, 1024
    torch.set_num_threads(args.threads)
    run = Run(args.out, args)
    run.m.update(command="python examples/convert_ffn_fusion.py " + " ".join(argv or []), heal_steps=args.steps,
                 max_bytes=args.max_bytes)

    model = ref.load_reference_lm()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    original = meshc.PassManager("dce").run(meshc.capture(model, (ids,), {"use_cache": False}, dynamic_shapes="auto"))
    n_layers = len(find_residual_stream(original).layers())
    print("1. original and per-layer attention importance", flush=True)
    base = run.bpb("original", original.to_module())
    imp = run.m.setdefault("attention_importance", {})
    for layer in range(n_layers):
        if str(layer) not in imp:
            probe = meshc.PassManager(f"attention_removal(layers={layer})").run(original)
            imp[str(layer)] = bits_per_byte(probe.to_module(), max_bytes=args.importance_bytes, progress=False)
            run.save()
    if "original_importance_bytes" not in run.m:
        run.m["original_importance_bytes"] = bits_per_byte(original.to_module(), max_bytes=args.importance_bytes,
                                                           progress=False)
    base_small = run.m["original_importance_bytes"]
    increase = {int(k): v - base_small for k, v in imp.items()}
    print("  bits/byte increase when one layer's attention is removed: "
          + ", ".join(f"{k}: {v:+.3f}" for k, v in sorted(increase.items())), flush=True)
    removed = sorted(sorted(increase, key=increase.get)[: args.remove])
    runs = runs_for(removed)
    run.m.update(removed_attention=removed, runs=runs)
    removal = f"dce,attention_removal(layers='{spell(removed)}')"
    fusion = f"ffn_fusion(runs='{spell(runs)}')"
    blocks = f"dce,parallel_blocks(runs='{spell(runs)}')"
    run.m["pipelines"] = {"attention_removed": removal, "fused": f"{removal},{fusion}", "parallel_blocks": blocks}

    print(f"2. {removal}", flush=True)
    no_attn = meshc.PassManager(removal).run(original)
    run.bpb("attention_removed", no_attn.to_module())
    no_attn_healed = run.healed("attention_removed", no_attn)
    run.bpb("attention_removed_healed", no_attn_healed)

    print(f"3. {fusion} on the healed model", flush=True)
    fused = meshc.PassManager(fusion).run(with_state(no_attn, no_attn_healed))
    run.m["ffn_count"] = {"original": ffn_count(original), "fused": ffn_count(fused)}
    print(f"  FFNs {ffn_count(original)} -> {ffn_count(fused)}; " + fused.notes[-1], flush=True)
    run.bpb("fused", fused.to_module())
    fused_healed = run.healed("fused", fused)
    run.bpb("fused_healed", fused_healed)

    print(f"4. {blocks} on the original model", flush=True)
    par = meshc.PassManager(blocks).run(original)
    run.bpb("parallel_blocks", par.to_module())
    run.bpb("parallel_blocks_healed", run.healed("parallel_blocks", par))

    print(f"5. reload the fused weights through the same passes, compiled on {args.mesh}", flush=True)
    folder = args.out / "fused"
    folder.mkdir(exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in fused_healed.export_state().items()}, str(folder / "model.safetensors"))
    model.config.to_json_file(str(folder / "config.json"))
    key = f"fused_healed_{args.mesh}"
    if key not in run.m["bits_per_byte"]:
        run.m["bits_per_byte"][key] = meshc.launch(_tp_bits_per_byte, args.mesh, str(folder),
                                                   f"{removal},{fusion}", args.max_bytes, timeout=900)[0]
        run.save()
    b = run.m["bits_per_byte"]
    print(f"  {key}: {b[key]:.4f} bits/byte (one process: {b['fused_healed']:.4f}; difference "
          f"{abs(b[key] - b['fused_healed']):.1e})", flush=True)
    print(f"bits/byte: original {base:.4f}; attention removed {b['attention_removed']:.4f} -> healed "
          f"{b['attention_removed_healed']:.4f}; fused {b['fused']:.4f} -> healed {b['fused_healed']:.4f}; "
          f"parallel blocks {b['parallel_blocks']:.4f} -> healed {b['parallel_blocks_healed']:.4f}", flush=True)
    return run.m


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
