"""Convert the shipped reference LM to ladder residual, heal it, and run it tensor-parallel.

    .venv/bin/python examples/convert_ladder.py                       # upper half (last:4 of 8 layers)
    .venv/bin/python examples/convert_ladder.py --steps 2 --max-bytes 4096 --out /tmp/lad   # smoke test

Prints bits per byte on the held-out stdlib files before conversion, right after it and after a
short healing fine-tune (the same training loop as the reference LM), saves the healed weights
(`--out`, safetensors + config.json, loadable with `meshc.reference_lm.load_reference_lm(out)`),
and finally compiles the healed model with the ladder pipeline on a local `tp=2` mesh and checks
that it scores the same bits per byte as in one process. Writes `<out>/ladder_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import meshc
import meshc.reference_lm as ref
import torch
from meshc.reference_lm.quality import bits_per_byte
from meshc.reference_lm.training import heal

REPO = Path(__file__).resolve().parents[1]


def convert(model, layers: str):
    """The reference LM captured (dynamic batch and length) and rewritten by ladder_residual."""
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    program = meshc.capture(model, (ids,), {"use_cache": False}, dynamic_shapes="auto")
    return meshc.PassManager(f"dce,ladder_residual(layers={layers})").run(program)


def _tp_bits_per_byte(device_mesh, folder: str, layers: str, max_bytes: int) -> float:
    model = ref.load_reference_lm(folder)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs={"use_cache": False},
                             pipeline=f"dce,ladder_residual(layers={layers}),spmd_partition,lint", plan="megatron")
    return bits_per_byte(lambda x: compiled(x).logits, max_bytes=max_bytes, progress=False)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="last:4", help="ladder_residual layers option (default: upper half)")
    p.add_argument("--steps", type=int, default=300, help="healing steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=200_000, help="held-out bytes scored (default 200k)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mesh", default="tp=2")
    p.add_argument("--out", type=Path, default=REPO / "runs/ladder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bpb = lambda fn: bits_per_byte(fn, max_bytes=args.max_bytes, progress=False)  # noqa: E731

    model = ref.load_reference_lm()
    before = bpb(model)
    print(f"reference LM: {before:.4f} bits/byte on {args.max_bytes:,} held-out bytes", flush=True)
    program = convert(model, args.layers)
    print("\n".join(program.notes), flush=True)
    student = program.to_module()
    converted = bpb(student)
    print(f"after ladder_residual(layers={args.layers}): {converted:.4f} bits/byte", flush=True)
    t0 = time.time()
    heal(student, steps=args.steps, batch_size=args.batch_size, threads=args.threads, log_every=50,
         progress=False)
    healed = bpb(student)
    print(f"after healing {args.steps} steps ({time.time() - t0:.0f} s): {healed:.4f} bits/byte", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in student.export_state().items()}, str(args.out / "model.safetensors"))
    model.config.to_json_file(str(args.out / "config.json"))
    print(f"saved healed weights to {args.out} (apply the same ladder_residual pipeline when loading)", flush=True)

    tp_value = meshc.launch(_tp_bits_per_byte, args.mesh, str(args.out), args.layers, args.max_bytes,
                            timeout=600)[0]
    print(f"compiled on {args.mesh} with the ladder pipeline: {tp_value:.4f} bits/byte "
          f"(one process: {healed:.4f}; difference {abs(tp_value - healed):.1e})", flush=True)
    metrics = {"layers": args.layers, "heal_steps": args.steps, "max_bytes": args.max_bytes,
               "bits_per_byte": {"reference": before, "converted": converted, "healed": healed,
                                 f"healed_{args.mesh}": tp_value},
               "command": "python examples/convert_ladder.py " + " ".join(argv or [])}
    (args.out / "ladder_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
