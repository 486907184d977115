"""The `meshc` command: drive the same PassManager as `meshc.compile`, with instruments on.

Entry point: `main(argv)`. Subcommands: `passes`, `compile`, `run`, `explain`, `show`, `bisect`,
`schedule`, `kernels`, `generate`, `calibrate`, `ffn-deps`. The CLI holds no compiler logic of its own: each
command builds a pipeline string and instruments and calls the library. Errors meshc raises on purpose print as one
clear message and exit with status 2 (`MESHC_TRACEBACK=1` shows their traceback); any other exception is a bug
and shows its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time

import torch
from meshc.errors import MeshcError, PassError, SpecError

#: What --plan takes (meshc.compile's plan= takes these and dicts; see meshc.plan).
PLAN_NAMES = ("auto", "megatron", "replicate")
EPILOG = ("MODEL is a built-in name (llama-tiny, gpt2-tiny, mlp, reference-lm, or a Hugging Face family: "
          "falcon-tiny, bloom-tiny, opt-tiny, gptneox-tiny, gptj-tiny, phi3-tiny, qwen2-tiny, olmo2-tiny, "
          "gemma-tiny), path/to/file.py:factory or package.module:factory.")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        _check_specs(args)
        return args.func(args) or 0
    except MeshcError as e:
        if os.environ.get("MESHC_TRACEBACK"):  # debugging meshc itself: the whole story
            raise
        print(f"meshc: error: {_for_the_user(e, args)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


def _check_specs(args) -> None:
    """Parse the specs typed on the command line before any model is loaded, so a typo costs a
    second, not a capture. The parsers raise meshc errors; anything else is a bug and shows."""
    from meshc.cost_model import get_preset
    from meshc.mesh import MeshSpec

    MeshSpec.parse(getattr(args, "mesh", None))
    if getattr(args, "preset", None) is not None:
        get_preset(args.preset)
    plan = getattr(args, "plan", None)
    if plan is not None and plan not in PLAN_NAMES:
        close = difflib.get_close_matches(plan, PLAN_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"unknown plan {plan!r}{hint}; --plan takes {', '.join(PLAN_NAMES)}")


def _for_the_user(e: MeshcError, args) -> MeshcError:
    """A failed pass's replay command names the model spec the user typed (not its class name)."""
    model = getattr(args, "model", None) or getattr(args, "run", None)
    if isinstance(e, PassError) and model:
        e.replay_for(model)
    return e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshc", description="meshc: a graph compiler for distributed PyTorch.",
                                epilog=EPILOG)
    sub = p.add_subparsers(title="commands")

    s = sub.add_parser("passes", help="table of registered passes")
    s.set_defaults(func=cmd_passes)

    def model_args(s):
        s.add_argument("model", metavar="MODEL", help=EPILOG)
        s.add_argument("--mesh", default=None, help="device mesh, e.g. tp=2 or dp=2,tp=2 (default: one device)")
        s.add_argument("--pipeline", default="default", help="pipeline string, e.g. 'dce,lint' (default: 'default')")
        s.add_argument("--plan", default="auto",
                       help="sharding plan on a mesh: auto (default: auto_shard), megatron or replicate")
        s.add_argument("--schedule", default="1f1b", help="pipeline schedule on a mesh with a pp dim (default 1f1b)")
        s.add_argument("--batch", type=int, default=2, help="batch size of the example inputs (built-ins)")
        s.add_argument("--seq", type=int, default=16, help="sequence length of the example inputs (built-ins)")
        s.add_argument("--static", action="store_true", help="capture with static shapes (default: dynamic)")
        s.add_argument("--zero", type=int, default=None, metavar="N",
                       help="the training program: compile(training=True, zero=N)'s passes (ZeRO stage 0-3)")

    s = sub.add_parser("compile", help="compile a model and show what the passes did", epilog=EPILOG)
    model_args(s)
    s.add_argument("--dump-dir", help="write one runnable NNN_<pass>.py per pass into this folder")
    s.add_argument("--print-after-change", action="store_true", help="print the IR after each pass that changed it")
    s.add_argument("--timings", action="store_true", help="also time capture, passes, lowering and the first call")
    s.add_argument("--check", action="store_true",
                   help="verify every pass (lint, shapes, numerics) and compare with eager at two sequence lengths")
    s.add_argument("--backend", default="auto", choices=["auto", "aten", "triton"],
                   help="auto (Triton on CUDA, else ATen), aten, or triton (the interpreter on CPU)")
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser("run", help="run a model on a local CPU/GPU mesh and compare with eager", epilog=EPILOG)
    s.add_argument("model", metavar="MODEL", help=EPILOG)
    s.add_argument("--mesh", required=True, help="device mesh, e.g. tp=2, tp=4 or dp=2,tp=2")
    s.add_argument("--plan", default="auto",
                   help="sharding plan: auto (default: auto_shard within Megatron's memory), megatron or replicate")
    s.add_argument("--pipeline", default="default",
                   help="pipeline, e.g. 'dce,auto_shard(budget=0.5),spmd_partition,lint' or with ladder_residual")
    s.add_argument("--batch", type=int, default=2, help="batch size (built-ins)")
    s.add_argument("--seq", type=int, default=16, help="first sequence length; a second one is 2*seq+1")
    s.add_argument("--microbatches", type=int, default=0,
                   help="on a pp mesh: micro-batches per call (default: the most, up to 2 per stage, dividing --batch)")
    s.add_argument("--iters", type=int, default=30,
                   help="timed forward calls per rank (the prediction is a least time: more calls, a truer least)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck rank fails the run")
    s.add_argument("--show-program", action="store_true", help="print rank 0's local program")
    s.add_argument("--preset", default="cpu-gloo",
                   help="cost-model preset for the predicted forward time (a name, or a `meshc calibrate` file)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("explain", help="auto_shard's plan: per-layer placements, collectives, predicted costs",
                       epilog=EPILOG)
    s.add_argument("model", metavar="MODEL", help=EPILOG)
    s.add_argument("--mesh", required=True, help="device mesh, e.g. tp=4")
    s.add_argument("--budget", default="auto",
                   help="per-rank parameter bytes (2e9), a fraction of all parameter bytes (0.5), 'none', or "
                        "'auto' (default: what the Megatron plan needs per rank)")
    s.add_argument("--preset", default="cpu-gloo", help="device preset of the cost model (cpu-gloo, h100-nvlink, ...)")
    s.add_argument("--node", default=None, help="show one node's strategies and why the chosen one won")
    s.add_argument("--time-limit", type=float, default=30.0, help="solver time limit in seconds")
    s.add_argument("--save", default=None, help="write the plan as JSON keyed by the graph (Plan.load reads it)")
    s.set_defaults(func=cmd_explain, batch=2, seq=16, static=False, pipeline="dce")

    s = sub.add_parser("show", help="print the IR after one pass (or its diff)", epilog=EPILOG)
    model_args(s)
    s.add_argument("--after", default=None, help="pass name, 1-based index in the pipeline, or 'captured' "
                   "(required, except with --training: default the step's last pass)")
    s.add_argument("--diff", action="store_true", help="show a unified diff against the IR before that pass")
    s.add_argument("--training", action="store_true", help="the training-step Program train_step runs (loss: "
                   "causal-LM cross-entropy of shifted logits); its passes follow 'training_step' in --after")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("bisect", help="find the first pass after which outputs differ from eager", epilog=EPILOG)
    model_args(s)
    s.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance vs eager (default 1e-5)")
    s.set_defaults(func=cmd_bisect)

    s = sub.add_parser("kernels", help="the Triton kernels the backend generates: names, FX nodes, source lines",
                       epilog=EPILOG)
    model_args(s)
    s.add_argument("--source", action="store_true", help="also print each kernel's generated Triton source")
    s.set_defaults(func=cmd_kernels)

    s = sub.add_parser("schedule", help="a pipeline schedule: step x rank table, predicted bubble, peak activations")
    s.add_argument("--schedule", default="1f1b",
                   help="forward, gpipe, 1f1b, interleaved-1f1b or zb-h1 (default: 1f1b)")
    s.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    s.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default: 2 x pp x virtual)")
    s.add_argument("--virtual", type=int, default=1, help="virtual stages per rank (interleaved-1f1b)")
    s.add_argument("--p2p", type=float, default=0.0, help="transfer time between ranks, in units of one F (default 0)")
    s.add_argument("--run", metavar="MODEL", default=None,
                   help="also run MODEL with this schedule on a local pp mesh and write a trace (pipeline runtime)")
    s.add_argument("--trace", default="pipeline_trace.json", help="Chrome/Perfetto trace file for --run")
    s.add_argument("--batch", type=int, default=8, help="batch size for --run (built-ins)")
    s.add_argument("--seq", type=int, default=16, help="sequence length for --run (built-ins)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck rank fails --run")
    s.set_defaults(func=cmd_schedule)

    s = sub.add_parser("calibrate", help="measure this machine with microbenchmarks and write a cost-model preset file")
    s.add_argument("--mesh", default=None, help="also measure collectives on this local mesh, e.g. tp=2")
    s.add_argument("--out", default="cpu-calibrated.json", help="preset file to write (--preset FILE reads it)")
    s.add_argument("--name", default="cpu-calibrated", help="the preset's name")
    s.add_argument("--seconds", type=float, default=1.0, help="time per microbenchmark group (default 1)")
    s.add_argument("--threads", type=int, default=1, help="torch threads while measuring (default 1)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("generate", help="compile MODEL with a KV cache and generate from a prompt", epilog=EPILOG)
    s.add_argument("model", metavar="MODEL", help=EPILOG)
    s.add_argument("--prompt", default="def ", help="the prompt: text for reference-lm (bytes), else token ids "
                   "'1,2,3' (default: 'def ')")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    s.add_argument("--mesh", default=None, help="generate on a local CPU mesh, one process per device: tp=2, "
                   "dp=2,tp=2, pp=2 (default: this device)")
    s.add_argument("--max-cache-len", type=int, default=None, help="cache length (default: prompt + --max-new-tokens)")
    s.add_argument("--do-sample", action="store_true", help="sample (temperature/top-k/top-p) instead of greedy")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0, help="torch seed for --do-sample (default 0)")
    s.add_argument("--speculative", choices=["medusa"], default=None, help="decode with the model's trained Medusa "
                   "heads (reference-lm ships them): the same tokens as greedy, fewer decode steps")
    s.add_argument("--tree", type=int, default=None,
                   help="with --speculative: tree size in nodes (default: the heads')")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("ffn-deps", help="how much consecutive FFN blocks depend on each other (FFN Fusion's "
                       "metric): table, heatmap, the runs ffn_fusion(runs=auto) would fuse", epilog=EPILOG)
    s.add_argument("model", metavar="MODEL", help=EPILOG)
    s.add_argument("--calibration", default=None, help="text or whitespace-separated token ids (default: the "
                   "reference LM's training split; other models need this)")
    s.add_argument("--pipeline", default="dce", help="passes to run first, e.g. 'attention_removal(layers=2-5)'")
    s.add_argument("--threshold", type=float, default=0.1, help="runs=auto fuses pairs with M below this")
    s.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    s.add_argument("--png", default="ffn_deps.png", help="heatmap file (needs matplotlib; '' for none)")
    s.set_defaults(func=cmd_ffn_deps)
    return p


def cmd_ffn_deps(args) -> int:
    """The dependency matrix M of a model's FFN sub-layers (meshc.ffn_deps), after --pipeline."""
    import meshc
    from meshc.ffn_deps import calibration_ids, choose_runs, ffn_dependencies, heatmap
    from meshc.models import load_model

    meshc.parse_pipeline(args.pipeline)
    loaded = load_model(args.model)
    vocab = getattr(getattr(loaded.model, "config", None), "vocab_size", None)
    ids = calibration_ids(args.model, args.calibration, tokens=args.tokens, vocab=vocab)
    program = meshc.capture(loaded.model, loaded.example_inputs, loaded.example_kwargs, dynamic_shapes="auto")
    program = meshc.PassManager(args.pipeline).run(program)
    deps = ffn_dependencies(program, ids)
    print(f"M[i, j]: cosine distance of FFN j's output with and without FFN i ({deps.tokens} calibration tokens; "
          f"rows i, columns j, by decoder layer)")
    print(deps.table())
    runs = choose_runs(deps, args.threshold)
    quoted = ",".join(f"{r[0]}-{r[-1]}" for r in runs)
    print(f"runs=auto (threshold {args.threshold}): {runs or 'none (no adjacent FFNs below the threshold)'}"
          + (f" -> ffn_fusion(runs='{quoted}')" if runs else ""))
    if args.png:
        try:
            print(f"heatmap: {heatmap(deps, args.png, f'{args.model}: M[i, j]')}")
        except MeshcError as e:
            print(f"no heatmap: {e}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    """Microbenchmarks only (meshc.calibrate) -> a preset file for --preset / preset=."""
    from meshc.calibrate import calibrate, summary, write_preset

    preset, raw = calibrate(args.mesh, args.seconds, args.threads, args.name)
    write_preset(preset, args.out, raw)
    print(summary(preset))
    print(f"wrote {args.out}; use it with --preset {args.out} (or preset='{args.out}' in the cost model)")
    return 0


def cmd_generate(args) -> int:
    """Compile with a KV cache (on this device, or on a local --mesh), generate, print the
    continuation and the speed."""
    if args.mesh:
        import meshc

        options = {k: v for k, v in vars(args).items() if k != "func"}
        lines = meshc.launch(_generate_lines, args.mesh, options)[0]  # every rank emits the same tokens
    else:
        lines = _generate_lines(None, {k: v for k, v in vars(args).items() if k != "func"})
    for text, to_stderr in lines:
        print(text, file=sys.stderr if to_stderr else sys.stdout)
    return 0


def _generate_lines(device_mesh, options: dict) -> list[tuple[str, bool]]:
    """What `meshc generate` prints, as (line, to stderr) pairs; runs on every rank of a mesh."""
    import argparse

    import meshc
    from meshc.models import load_model

    args, lines = argparse.Namespace(**options), []
    if device_mesh is not None:
        torch.set_num_threads(1)  # ranks share this machine's cores

    if args.speculative:  # before loading anything: only a model with trained heads can speculate
        from meshc.passes.speculative_heads import heads_pipeline, trained_heads_file

        heads = trained_heads_file(args.model)
    byte_level = args.model == "reference-lm"
    if byte_level:
        from meshc.reference_lm import decode, encode

        ids = encode(args.prompt).long()[None]
    else:
        try:
            ids = torch.tensor([[int(t) for t in args.prompt.split(",") if t.strip()]])
        except ValueError:
            ids = torch.tensor([list(args.prompt.encode())])  # a random-weight tiny model: bytes as ids
    loaded = load_model(args.model, batch=1, seq=max(2, ids.shape[1]))
    t0 = time.perf_counter()
    cache = args.max_cache_len or ids.shape[1] + args.max_new_tokens  # attention reads the whole cache each step
    pipeline, options = "default", {"do_sample": args.do_sample, "temperature": args.temperature,
                                    "top_k": args.top_k, "top_p": args.top_p}
    if args.speculative:  # Medusa: the heads' pass in the pipeline; greedy tree verification
        pipeline, options = heads_pipeline(heads), {"speculative": args.speculative, "tree": args.tree}
        cache += args.tree or 64  # a verification step writes the whole tree past the last token
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=(ids,), max_cache_len=cache, generate=True,
                             pipeline=pipeline)
    where = f" on mesh '{compiled.program.mesh}'" if device_mesh is not None else ""
    lines.append((f"compiled {args.model}{where} in {time.perf_counter() - t0:.1f} s", True))
    torch.manual_seed(args.seed)
    out = compiled.generate(ids, max_new_tokens=args.max_new_tokens, **options)
    new = out[0, ids.shape[1]:].tolist()
    lines.append((args.prompt + decode(new) if byte_level else " ".join(map(str, new)), False))
    if args.speculative:
        st = compiled.decoder.speculative_stats
        lines.append((f"accepted tokens per step: {st.accepted_per_step:.2f}", False))
        lines.append((f"{st.steps} verification calls of a {st.tree_size}-node tree; decode "
                      f"{st.tokens_per_s:.1f} tokens/s", False))
        return lines
    st = compiled.decoder.stats
    lines.append((f"time to first token {st.time_to_first_token_s * 1e3:.1f} ms; {st.new_tokens} new tokens; "
                  f"decode {st.tokens_per_s:.1f} tokens/s", True))
    return lines


def cmd_passes(args) -> int:
    from meshc.pipeline import all_passes
    from meshc.table import render_table

    rows = []
    for p in sorted(all_passes().values(), key=lambda p: p.name):
        opts = ", ".join(f"{k}={v.default!r}" for k, v in p.options().items()) or "-"
        rows.append([p.name, "yes" if p.preserves_semantics else "no", opts, p.description])
    print(render_table(["pass", "preserves semantics", "options", "description"], rows))
    return 0


def _load(args):
    from meshc.mesh import MeshSpec
    from meshc.models import load_model
    from meshc.pipeline import parse_pipeline, resolve

    spec = MeshSpec.parse(args.mesh)
    pipeline = resolve(spec, args.pipeline, _plan_arg(args), getattr(args, "schedule", "1f1b"),
                       batch=args.batch).pipeline  # the one resolver, as meshc.compile
    if getattr(args, "zero", None) is not None or getattr(args, "training", False):  # as compile(training=True)
        from meshc.training import training_pipeline

        pipeline = training_pipeline(pipeline, spec, args.zero or 0)
    parse_pipeline(pipeline)  # fail on a typo before loading anything
    loaded = load_model(args.model, batch=args.batch, seq=args.seq)
    return loaded, spec, pipeline


def _plan_arg(args):
    plan = getattr(args, "plan", "auto")
    return None if plan == "replicate" else plan


def _capture(args, loaded, spec):
    """Capture as `meshc.compile` does, as rank 0 of the mesh with the plan asked for."""
    import meshc

    program = meshc.capture(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                            dynamic_shapes=None if args.static else "auto", mesh=spec)
    if spec.size > 1:
        program.plan = _plan_arg(args) or "replicate"
    return program


def _compile_for_rank0(args, loaded, spec, pipeline) -> int:
    """Passes only (no processes): show what partitioning does to rank 0's program."""
    import meshc

    instruments = [meshc.PrintAfterChange()] if args.print_after_change else []
    if args.dump_dir:
        instruments.append(meshc.DumpDir(args.dump_dir))
    print(f"meshc compile {args.model} on mesh '{spec}' (rank 0's program; `meshc run` executes it)\n"
          f"pipeline: {pipeline}")
    program = _capture(args, loaded, spec)
    manager = meshc.PassManager(pipeline, instruments=[*instruments, timings := meshc.Timings()])
    program = manager.run(program)
    print("\n".join(["", timings.table(), "", *program.notes]))
    return 0


def cmd_compile(args) -> int:
    import meshc
    from meshc.numerics import max_abs_error

    loaded, spec, pipeline = _load(args)
    if spec.size > 1 and args.check:
        raise MeshcError(f"--check runs the model, and mesh '{spec}' needs {spec.size} processes: use "
                         f"`meshc run {args.model} --mesh {spec}` to run and compare with eager")
    if spec.size > 1:
        return _compile_for_rank0(args, loaded, spec, pipeline)
    instruments = [meshc.PrintAfterChange()] if args.print_after_change else []
    if args.dump_dir:
        instruments.append(meshc.DumpDir(args.dump_dir))
    if args.check:
        instruments += [meshc.Verify(), meshc.NumericCheck()]
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"meshc compile {args.model} ({type(loaded.model).__name__}, {n_params / 1e6:.2f}M parameters) "
          f"on mesh '{spec}'\npipeline: {pipeline}")
    t0 = time.perf_counter()
    compiled = meshc.compile(loaded.model, spec, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs, pipeline=pipeline,
                             dynamic_shapes=None if args.static else "auto", instruments=instruments,
                             backend=args.backend)
    t_compile = time.perf_counter() - t0
    print(f"\n{compiled.report}\n")
    with torch.no_grad():
        t0 = time.perf_counter()
        out = compiled(*loaded.example_inputs, **loaded.example_kwargs)
        t_call = time.perf_counter() - t0
    if args.timings:
        print(f"compile total {t_compile * 1e3:.0f} ms; first call {t_call * 1e3:.1f} ms")
    if args.dump_dir:
        print(f"IR dumps: {args.dump_dir}/000_captured.py .. one runnable file per pass")
    if not args.check:
        return 0
    failed = False
    sizes = [(args.batch, args.seq)]
    if loaded.make_inputs and not args.static:
        sizes.append((args.batch, args.seq * 2 + 1))  # a second length from the same compile
    with torch.no_grad():
        for batch, seq in sizes:
            inputs = loaded.inputs_at(batch, seq) if loaded.make_inputs else loaded.example_inputs
            ref = loaded.model(*inputs, **loaded.example_kwargs)
            err, where, _ = max_abs_error(ref, compiled(*inputs, **loaded.example_kwargs))
            ok = err <= 1e-5
            failed |= not ok
            print(f"check vs eager at batch={batch} seq={seq}: max abs error {err:.2e} at {where} "
                  f"{'ok' if ok else 'FAILED'}")
    del out
    return 1 if failed else 0


def cmd_run(args) -> int:
    from meshc.mesh import MeshSpec
    from meshc.runtime.run_on_mesh import run_on_mesh

    spec = MeshSpec.parse(args.mesh)
    print(f"meshc run {args.model} on a local mesh '{spec}' ({spec.size} processes, plan {args.plan})", flush=True)
    plan = None if args.plan == "replicate" else args.plan
    r = run_on_mesh(args.model, str(spec), plan, args.batch, (args.seq, 2 * args.seq + 1), args.iters,
                    args.timeout, args.show_program, args.pipeline, args.microbatches, args.preset)
    if r["program"]:
        print(r["program"])
    print(f"\nrank 0's compile:\n{r['report']}\n")
    failed = False
    for c in r["checks"]:
        ok = c["max_abs_error"] <= 1e-5
        failed |= not ok
        print(f"check vs eager at batch={c['batch']} seq={c['seq']}: max abs error {c['max_abs_error']:.2e} "
              f"({'ok' if ok else 'FAILED'})")
    per_rank = ", ".join(f"{b / 2**20:.2f}" for b in r["per_rank_param_bytes"])
    print(f"parameters per rank (MiB): {per_rank} of {r['full_param_bytes'] / 2**20:.2f} in the model")
    print(f"compile {r['compile_s']:.1f} s; forward median {r['forward_ms_median']:.1f} ms on rank 0")
    stages = r["predicted"]["stages_ms"]
    print(f"predicted by the cost model ({args.preset}): "
          + (f"{stages[0]:.1f} ms" if len(stages) == 1 else "stages " + ", ".join(f"{t:.1f}" for t in stages) + " ms")
          + f" per forward on rank 0 (measured: least {r['forward_ms_least']:.1f} ms, median "
          f"{r['forward_ms_median']:.1f} ms of {r['forward_calls']} calls; every preset figure is a least time)")
    if args.preset == "cpu-gloo":
        print(f"  cpu-gloo holds generic CPU figures, not this machine's; `meshc calibrate --mesh {args.mesh}` "
              f"measures it and writes cpu-calibrated.json for --preset")
    return 1 if failed else 0


def cmd_explain(args) -> int:
    import meshc
    from meshc.passes.auto_shard import explain, parse_budget, solve_sharding
    from meshc.plan import make_plan

    loaded, spec, _ = _load(args)
    program = meshc.PassManager("dce").run(meshc.capture(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                                                         dynamic_shapes="auto", mesh=spec))
    budget = parse_budget(args.budget, program)
    solution = solve_sharding(program, budget, args.preset, args.time_limit)
    baseline = solve_sharding(program, None, args.preset, args.time_limit,
                              fixed_plan=make_plan("megatron", program, spec))
    shown = "none" if budget is None else f"{budget / 2**20:.2f} MiB per rank"
    print(f"meshc explain {args.model} on mesh '{spec}' (preset {args.preset}, budget {args.budget}: {shown})\n")
    print(explain(solution, baseline, args.node))
    if spec.pp > 1 and args.node is None:  # the stages the default pipeline's pipeline_partition cuts
        staged = meshc.PassManager(f"pipeline_partition(preset={args.preset})").run(program)
        print(f"\npipeline stages on '{spec}' (pipeline_partition, before tensor-parallel sharding):")
        print("\n".join(n for n in staged.notes if "pipeline_partition" in n or n.startswith("  ")))
    if args.save:
        solution.plan.save(args.save, program)
        print(f"\nplan written to {args.save} (graph {meshc.plan.graph_hash(program)})")
    return 0


def _programs_by_step(args):
    """Capture and run the pipeline, keeping the Program after every step (0 = captured)."""
    import meshc

    loaded, spec, pipeline = _load(args)
    training = getattr(args, "training", False)
    if training and spec.pp > 1:  # before capture: fail fast
        raise MeshcError(f"meshc show --training: mesh '{spec}' has a pp dim, which the pipeline runtime trains "
                         f"stage by stage with no one training-step graph; use --after split_stages")
    if training and loaded.example_inputs[0].dtype.is_floating_point:
        raise MeshcError(f"meshc show --training traces the causal-LM loss, which needs token ids; {args.model}'s "
                         f"input is {loaded.example_inputs[0].dtype}: the model is no causal LM")
    keep = _Keep()
    program = _capture(args, loaded, spec)
    manager = meshc.PassManager(pipeline, instruments=[keep])
    program = manager.run(program)
    if not training:
        return loaded, manager, keep.programs
    from meshc.training_step import causal_lm_loss, step_pipeline, trace_training_step

    ids = loaded.example_inputs[0]  # the causal LM's target: its own input ids, shifted by the loss
    step = trace_training_step(program, program.bind_inputs(loaded.example_inputs, loaded.example_kwargs), ids,
                               causal_lm_loss)
    step_keep = _Keep()
    step_manager = meshc.PassManager(step_pipeline(program), instruments=[step_keep])
    step_manager.run(step)
    return loaded, _Joined(manager, step_manager), keep.programs + step_keep.programs


class _Joined:
    """The forward's pipeline, the tracing of the training step ('training_step'), the step's pipeline."""

    def __init__(self, forward, step):
        self.calls = [*forward.calls, argparse.Namespace(name="training_step"), *step.calls]
        self.text = f"{forward},training_step,{step}"

    def __str__(self) -> str:
        return self.text


class _Keep:
    def start(self, program, calls):
        self.programs = [program]

    def after_pass(self, index, call, before, after, seconds):
        self.programs.append(after)

    def finish(self, program):
        pass


def cmd_show(args) -> int:
    if args.after is None and not args.training:
        raise MeshcError("meshc show needs --after PASS (a pass name, a 1-based index, or 'captured'); "
                         "only --training has a default (the training step after its last pass)")
    _, manager, programs = _programs_by_step(args)
    names = [c.name for c in manager.calls]
    if args.after is None:
        step = len(names)
    elif args.after == "captured":
        step = 0
    elif args.after.isdigit() and 1 <= int(args.after) <= len(names):
        step = int(args.after)
    elif args.after in names:  # a name in both pipelines (lint): the training step's with --training
        step = len(names) - names[::-1].index(args.after) if args.training else names.index(args.after) + 1
    else:
        raise MeshcError(f"--after {args.after!r} is not in the pipeline [{', '.join(names)}]; "
                         f"give a pass name, a 1-based index, or 'captured'")
    code = programs[step].code()
    if args.diff and step > 0:
        before = programs[step - 1].code()
        label = f"after {step - 1}" if step > 1 else "captured"
        diff = difflib.unified_diff(before.splitlines(), code.splitlines(), label, f"after {names[step - 1]}",
                                    lineterm="")
        print("\n".join(diff) or f"pass {names[step - 1]!r} did not change the IR")
    else:
        if args.training and step > names.index("training_step"):
            print(f"# training step of {args.model} on mesh '{programs[step].mesh}', rank 0, zero={args.zero or 0}: "
                  f"(state, inputs, target) -> (loss, gradients)\n# loss: causal-LM cross-entropy of the shifted "
                  f"logits against the input ids (meshc.training_step.causal_lm_loss)\n# pipeline: {manager}")
        print(code)
    return 0


def cmd_kernels(args) -> int:
    from meshc.backends.triton import kernels

    _, _, programs = _programs_by_step(args)
    program = programs[-1]  # after the pipeline: rank 0's local program on a mesh
    parts = [(f"stage {st.index}: ", st.program) for st in program.split.stages] if program.split else [("", program)]
    found = [(label, k) for label, p in parts for k in kernels(p)]
    print(f"meshc kernels {args.model} on mesh '{program.mesh}': {len(found)} generated kernels\n")
    for label, k in found:
        print(f"{label}{k.name}  ({k.kind}; nodes: {', '.join('%' + n for n in k.nodes)})")
        for line in k.source_lines:
            print(f"    {line}")
        print(f"    reads:  {', '.join(k.reads)}\n    writes: {', '.join(k.writes)}")
        if args.source:
            print("\n" + k.source)
    notes = [n for _, p in parts for n in p.notes if n.startswith("triton backend")]
    print("\n".join(["", *dict.fromkeys(notes)]))
    return 0


def cmd_bisect(args) -> int:
    from meshc.numerics import max_abs_error

    loaded, manager, programs = _programs_by_step(args)
    with torch.no_grad():
        ref = loaded.model(*loaded.example_inputs, **loaded.example_kwargs)

        def bad(step: int) -> bool:
            return max_abs_error(ref, programs[step].run_example())[0] > args.atol

        if bad(0):
            raise MeshcError("the captured program already differs from eager; the fault is in capture, not a pass")
        if not bad(len(programs) - 1):
            print(f"all {len(manager.calls)} passes agree with eager within atol={args.atol:g}")
            return 0
        lo, hi = 0, len(programs) - 1  # invariant: good(lo), bad(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if not bad(mid) else (lo, mid)
        err = max_abs_error(ref, programs[hi].run_example())
    print(f"first bad pass: #{hi} '{manager.calls[hi - 1]}' (max abs error {err[0]:.3g} at {err[1]}; "
          f"passes before it agree with eager)")
    return 1


def cmd_schedule(args) -> int:
    from meshc.schedules import SCHEDULES, build_schedule, format_table, simulate

    m = args.microbatches or 2 * args.pp * args.virtual
    sched = build_schedule(args.schedule, args.pp, m, args.virtual)  # ScheduleError says what to change
    timeline = simulate(sched, p2p_time=args.p2p)
    print(f"meshc {sched}: {SCHEDULES[sched.name][2]}\n"
          f"predicted with F = I = W = 1, B = 2 time units, p2p transfer {args.p2p:g}\n")
    print(format_table(sched, timeline))
    return schedule_run(args, sched) if args.run else 0


def schedule_run(args, schedule) -> int:
    """`meshc schedule --run MODEL`: the pipeline runtime's part. Its module
    `meshc.runtime.pipeline_trace` provides `cli_run(args, schedule) -> int` (args: run, trace,
    batch, seq, timeout), which runs the schedule, writes the trace and prints measured vs predicted."""
    try:
        from meshc.runtime.pipeline_trace import cli_run
    except ImportError as e:
        if getattr(e, "name", None) not in ("meshc.runtime.pipeline_trace", None):
            raise  # a real import failure inside the runtime, not a missing module
        raise MeshcError("meshc schedule --run needs the pipeline runtime's trace module "
                         "(meshc.runtime.pipeline_trace.cli_run), which this build lacks; "
                         "drop --run to see the predicted table") from e
    return cli_run(args, schedule)


if __name__ == "__main__":
    sys.exit(main())
