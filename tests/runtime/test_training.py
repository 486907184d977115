"""Training on dp/tp meshes (meshc.runtime.training, the zero pass) against plain single-process
training: 20 AdamW steps with gradient accumulation and clipping give the same losses and
parameters for ZeRO stages 0-3; the public compile(training=True, zero=N) path; clear errors.
Distributed cases run on real gloo meshes spawned by meshc.launch, each with a timeout."""

from __future__ import annotations

import pytest
import torch

STEPS, BATCH, SEQ, LR, CLIP = 20, 4, 8, 1e-3, 0.5


def loss_fn(out, target):
    return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target.flatten())


VOCAB = {"reference-lm": 256}  # token ids below the model's vocabulary (default 512)
STEPS_OF = {"reference-lm": 5}  # the 6.5M-parameter byte LM: 5 steps


def batches(step: int, vocab: int = 512, batch: int = BATCH):
    """The step's micro-batches: odd steps accumulate two halves (gradient accumulation)."""
    g = torch.Generator().manual_seed(100 + step)
    ids, target = torch.randint(0, vocab, (batch, SEQ), generator=g), torch.randint(0, vocab, (batch, SEQ), generator=g)
    if step % 2 == 0:
        return [(ids, target)]
    h = batch // 2
    return [(ids[:h], target[:h]), (ids[h:], target[h:])]


def reference(model_name: str, halves: bool = False, batch: int = BATCH) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain single-process training: losses per step (mean over micro-batches) and final
    parameters. `halves`: every micro-batch accumulated as two halves (another summation order)."""
    from meshc.models import load_model

    model = load_model(model_name, batch=batch, seq=SEQ).model
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS_OF.get(model_name, STEPS)):
        mbs = batches(step, VOCAB.get(model_name, 512), batch)
        if halves:
            mbs = [(i[j:j + len(i) // 2], t[j:j + len(i) // 2]) for i, t in mbs for j in (0, len(i) // 2)]
        total = 0.0
        for ids, target in mbs:
            loss = loss_fn(model(ids, use_cache=False), target) / len(mbs)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def train(compiled, model_name: str = "llama-tiny", batch: int = BATCH) -> list[float]:
    opt = compiled.make_optimizer(torch.optim.AdamW, lr=LR)
    losses = []
    for step in range(STEPS_OF.get(model_name, STEPS)):
        mbs = batches(step, VOCAB.get(model_name, 512), batch)
        total, k = 0.0, len(mbs)

        def mean_loss(out, target, k=k):
            return loss_fn(out, target) / k

        for ids, target in mbs:
            total += float(compiled.train_step((ids,), target, mean_loss, {"use_cache": False}))
        compiled.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _stages_rank(device_mesh, model_name: str, stages: list[int], batch: int = BATCH, show: bool = False):
    """Every rank: capture once, then for each ZeRO stage the pipeline `compile(training=True,
    zero=stage)` runs, on fresh copies of the captured weights; 20 steps; losses and the full parameters.
    `show`: at zero=3 one more step, with the causal-LM loss; the code of the step Program it ran."""
    import meshc
    from meshc.mesh import MeshSpec
    from meshc.models import load_model
    from meshc.pipeline import resolve
    from meshc.runtime.compiled_model import CompiledModel
    from meshc.runtime.mesh import bind
    from meshc.training import training_pipeline

    torch.set_num_threads(1)
    loaded = load_model(model_name, batch=batch, seq=SEQ)
    spec = MeshSpec.parse(device_mesh)
    captured = meshc.capture(loaded.model, loaded.example_inputs, loaded.example_kwargs, dynamic_shapes="auto",
                             mesh=spec)
    out = {}
    for stage in stages:
        program = captured.clone()
        copies: dict[int, torch.Tensor] = {}
        program.state = {k: copies.setdefault(id(v), v.detach().clone()) for k, v in program.state.items()}
        if device_mesh is not None:
            program.rank, program.plan = device_mesh.get_rank(), "auto"
        program = meshc.PassManager(training_pipeline(resolve(spec).pipeline, spec, stage)).run(program)
        if device_mesh is not None:
            bind(program, device_mesh)
        compiled = CompiledModel(program, "aten")
        losses = train(compiled, model_name, batch)
        full = {n: t.numpy().copy() for n, t in compiled.trainer.full_parameters().items()}  # plain arrays
        # on a tp dim: rank 0's tp shards, and where they sit (the reference is cut the same way)
        where = ({program.fqn(n.name): n.meta.get("meshc_placement") for n in program.placeholders()},
                 program.mesh.coords(program.rank), program.mesh.sizes)
        code = None
        if show and stage == 3:  # the step `meshc show --training` prints: its loss, the example batch as target
            from meshc.training_step import causal_lm_loss

            ids, kwargs = loaded.example_inputs[0], loaded.example_kwargs
            compiled.train_step((ids,), ids, causal_lm_loss, kwargs)
            code = compiled.training_program((ids,), ids, causal_lm_loss, kwargs).code()  # the one it ran
        out[stage] = (losses, full if device_mesh is None or device_mesh.get_rank() == 0 else None, where, code)
    return out


def check(model_name: str, per_rank: list[dict], stages, exact: bool = False, batch: int = BATCH) -> None:
    """Losses equal plain training (rtol 1e-5, atol 1e-7) on every rank. Parameters: `exact`
    (one device, same arithmetic) to rtol 1e-5, atol 1e-7; on a dp mesh, whose gradient sums run
    in another order, no further from plain training than plain training itself moves when only
    its summation order changes (the same batches accumulated as halves; `summation_control`),
    with a margin of 4x: AdamW divides by sqrt(v), so a near-cancelled gradient's rounding shows."""
    from meshc.models import load_model
    from meshc.placement import local_shard

    ref_losses, ref_params = reference(model_name, batch=batch)
    atol = 1e-7 if exact else 4 * summation_control(model_name, ref_params, batch)
    names = {n for n, _ in load_model(model_name).model.named_parameters()}
    for stage in stages:
        for results in per_rank:  # the same loss on every rank
            losses = results[stage][0]
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7,
                                       msg=lambda m, s=stage: f"zero={s} losses: {m}")
        _, params, (placements, coords, sizes), _ = per_rank[0][stage]
        missing = {n for n in names if n not in params and TWIN.get(n) not in params}  # tied: either name
        assert not missing, (stage, missing)
        for name, p in params.items():
            ref = ref_params[name]
            if placements.get(name) is not None:  # this rank's tp shard of it (dp: replicated)
                ref = local_shard(ref, placements[name], coords, sizes)
            torch.testing.assert_close(torch.from_numpy(p), ref, rtol=1e-5, atol=atol,
                                       msg=lambda m, s=stage, n=name: f"zero={s} {n}: {m}")


def summation_control(model_name: str, ref_params: dict, batch: int = BATCH) -> float:
    """Max |parameter - plain| after plain training with every micro-batch accumulated as two
    halves: the same mathematics, another order of summation (what dp changes)."""
    _, params = reference(model_name, halves=True, batch=batch)
    return max(float((params[n] - p).abs().max()) for n, p in ref_params.items())


#: tied weights: the compiled program trains the one tensor under whichever name it reads
TWIN = {"transformer.wte.weight": "lm_head.weight", "lm_head.weight": "transformer.wte.weight"}


def test_one_device_training_equals_plain_training():
    check("llama-tiny", [_stages_rank(None, "llama-tiny", [0])], [0], exact=True)


@pytest.mark.timeout(400)
def test_dp2_every_zero_stage_equals_plain_training(capsys):
    """Also: what `meshc show --training` prints for rank 0 is the step Program rank 0 ran."""
    from meshc.cli import main
    from meshc.runtime import launch

    from .test_training_step import _layer_gathers

    stages = [0, 1, 2, 3]
    per_rank = launch(_stages_rank, "dp=2", "llama-tiny", stages, BATCH, True, timeout=300)
    check("llama-tiny", per_rank, stages)
    capsys.readouterr()  # zero=3: the prefetched layer gathers, their reduce-scatters
    assert main(["show", "llama-tiny", "--mesh", "dp=2", "--training", "--zero", "3", "--batch", str(BATCH),
                 "--seq", str(SEQ)]) == 0
    header, _, code = capsys.readouterr().out.partition("\nclass GraphModule")
    assert "# loss: causal-LM cross-entropy of the shifted logits" in header, header
    assert "class GraphModule" + code == per_rank[0][3][3] + "\n"
    assert _layer_gathers(code)[1] < code.index("aten.mm.default(")  # prefetch: layer 1's before layer 0's matmul


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dp2_gpt2_every_zero_stage_equals_plain_training():  # tied weights; slow: the suite's time budget
    from meshc.runtime import launch

    stages = [0, 1, 2, 3]
    check("gpt2-tiny", launch(_stages_rank, "dp=2", "gpt2-tiny", stages, timeout=300), stages)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reference_lm_five_steps_on_dp2_zero3():
    from meshc.runtime import launch

    check("reference-lm", launch(_stages_rank, "dp=2", "reference-lm", [3], timeout=800), [3])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mesh", ["dp=4", "dp=2,tp=2", "tp=2"])
def test_more_meshes_every_zero_stage_equals_plain_training(mesh):
    from meshc.runtime import launch

    stages = [0, 1, 2, 3] if "dp" in mesh else [0]
    batch = 2 * BATCH if mesh == "dp=4" else BATCH  # each accumulated half-batch divides over dp=4
    check("llama-tiny", launch(_stages_rank, mesh, "llama-tiny", stages, batch, timeout=800), stages, batch=batch)


# ---- the public path, schedulers, errors (the MLP: seconds) -------------------------------------------

def _mlp_public_rank(device_mesh, zero: int, die: bool = False, pipeline: str = "default"):
    """meshc.compile(training=True, zero=N) + an LR scheduler, 6 steps; rank 1 may die mid-run."""
    import os

    import meshc
    import meshc.passes.zero as zero_pass
    from meshc.models import load_model

    torch.set_num_threads(1)
    regathers = []
    plain = zero_pass.regather
    zero_pass.regather = lambda *a: regathers.append(1) or plain(*a)  # count backward's re-gathers
    loaded = load_model("mlp", batch=4, seq=8)
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs, training=True,
                             zero=zero, pipeline=pipeline)
    opt = compiled.make_optimizer(torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    losses, lrs = [], []
    for step in range(6):
        x, = load_model("mlp", batch=4, seq=8 + step).example_inputs
        if die and step == 3 and device_mesh.get_rank() == 1:
            os._exit(3)  # a rank that dies mid-run: the other waits in a collective
        losses.append(float(compiled.train_step((x,), x, torch.nn.functional.mse_loss)))
        opt.step()
        opt.zero_grad()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    x, = load_model("mlp", batch=4, seq=8).example_inputs
    code = compiled.training_program((x,), x, torch.nn.functional.mse_loss).gm.code
    try:  # a batch dp does not divide: a clear error before any collective
        compiled.train_step((x[:3],), x[:3], torch.nn.functional.mse_loss)
        batch_error = None
    except meshc.InputError as e:
        batch_error = str(e)
    return losses, lrs, compiled.report, len(regathers), code, batch_error


def _mlp_reference(schedule: bool = True):
    """Plain training of the mlp model, 6 AdamW steps (with a StepLR schedule unless told not to):
    (losses, the trained model)."""
    from meshc.models import load_model

    model = load_model("mlp").model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if schedule else None
    losses = []
    for step in range(6):
        x, = load_model("mlp", batch=4, seq=8 + step).example_inputs
        loss = torch.nn.functional.mse_loss(model(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
        losses.append(float(loss))
    return losses, model


@pytest.mark.timeout(200)
@pytest.mark.parametrize("pipeline", [  # default-suite time: the recompute variant under -m slow
    "default", pytest.param("dce,auto_shard,spmd_partition,zero(stage=3,recompute=true),lint", marks=pytest.mark.slow)])
def test_public_compile_with_zero3_and_an_lr_scheduler_trains_like_plain_training(pipeline):
    """The training-step Program (saving gathered parameters for backward, or gathering them again)."""
    from meshc.runtime import launch

    ref, _ = _mlp_reference()
    for losses, lrs, report, regathers, code, batch_error in launch(_mlp_public_rank, "dp=2", 3, False, pipeline,
                                                                    timeout=150):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-7)
        assert lrs == [1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3, 1.25e-3]
        assert batch_error == ("input args[0]: dim 0 of size 3 is split over mesh dim 'dp'=2 (mesh 'dp=2'), which "
                               "does not divide it; pass a size that is a multiple of 2"), batch_error
        assert "zero: stage 3 on dp=2: 6 parameters" in report
        assert "zero: parameters bucketed per layer into 3 collectives each way" in report
        # recompute: the weights backward saves are gathered again, traced once per input shape (6):
        # mid's and down's (up's input needs no gradient, so autograd saves no weight there; biases never)
        assert regathers == (0 if pipeline == "default" else 2 * 6), regathers
        # one graph: the forward's layer all-gathers (and the regathers) and the backward's reduce-scatters
        assert code.count("all_gather_into_tensor.default(") == 3 + 1 + (2 if regathers else 0), code
        assert code.count("reduce_scatter_tensor.default(") == 3 + 1, code  # their adjoints, the output's


@pytest.mark.timeout(120)
def test_a_rank_that_dies_mid_training_ends_every_rank():
    import time

    from meshc.runtime import LaunchError, launch

    t0 = time.perf_counter()
    with pytest.raises(LaunchError, match="rank 1"):
        launch(_mlp_public_rank, "dp=2", 2, True, timeout=30)
    assert time.perf_counter() - t0 < 100


def test_misuse_is_a_clear_error():
    import meshc
    from meshc.errors import MeshcError
    from meshc.mesh import MeshSpec
    from meshc.models import load_model
    from meshc.training import training_pipeline

    with pytest.raises(MeshcError, match=r"zero=2 shards over the 'dp' dim, but mesh 'tp=2' has none"):
        training_pipeline("dce,spmd_partition,lint", MeshSpec.parse("tp=2"), 2)
    with pytest.raises(MeshcError, match=r"zero=3 on a pp mesh .* not implemented yet"):
        training_pipeline("dce,lint", MeshSpec.parse("dp=2,pp=2"), 3)
    with pytest.raises(MeshcError, match=r"zero=1 shards over the 'dp' dim, but mesh 'pp=2' has none"):
        training_pipeline("dce,lint", MeshSpec.parse("pp=2"), 1)
    assert training_pipeline("dce,lint", MeshSpec.parse("dp=2,pp=2"), 2) == "dce,lint"  # the runtime's (pipeline_zero)
    with pytest.raises(MeshcError, match=r"zero=5 is not a ZeRO stage"):
        training_pipeline("dce,lint", MeshSpec.parse("dp=2"), 5)
    assert training_pipeline("dce,spmd_partition,lint", MeshSpec.parse("dp=2"), 3) == \
        "dce,spmd_partition,differentiable_collectives,zero(stage=3),lint"
    mlp = load_model("mlp")
    inference = meshc.compile(mlp.model, example_inputs=mlp.example_inputs)
    with pytest.raises(MeshcError, match=r"compiled for inference; compile with meshc.compile\(..., training=True"):
        inference.make_optimizer(torch.optim.AdamW)
    trained = meshc.compile(mlp.model, example_inputs=mlp.example_inputs, training=True)
    with pytest.raises(MeshcError, match=r"loss_fn must return a scalar tensor"):
        trained.train_step(mlp.example_inputs, None, lambda out, t: out)
    triton = meshc.compile(mlp.model, example_inputs=mlp.example_inputs, training=True, backend="triton")
    with pytest.raises(MeshcError, match=r"train_step runs on the aten backend only"):
        triton.train_step(mlp.example_inputs, None, lambda out, t: out.sum())


# ---- sharded checkpoints ------------------------------------------------------------------------------

def _mlp_steps(compiled, opt, steps: range) -> list[float]:
    from meshc.models import load_model

    losses = []
    for step in steps:
        x, = load_model("mlp", batch=4, seq=8 + step).example_inputs
        losses.append(float(compiled.train_step((x,), x, torch.nn.functional.mse_loss)))
        opt.step()
        opt.zero_grad()
    return losses


def _mlp_compiled(device_mesh, zero: int):
    import meshc
    from meshc.models import load_model

    torch.set_num_threads(1)
    loaded = load_model("mlp", batch=4, seq=8)
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs, training=True, zero=zero)
    return compiled, compiled.make_optimizer(torch.optim.AdamW, lr=1e-2)


def _save_rank(device_mesh, folder: str):
    """zero=2: 3 steps, save, 3 more (the losses a resume must reproduce); then zero=3, fresh
    weights, resumed from the files: the same 3 losses."""
    compiled, opt = _mlp_compiled(device_mesh, 2)
    _mlp_steps(compiled, opt, range(3))
    compiled.save_sharded(folder, opt)
    after = _mlp_steps(compiled, opt, range(3, 6))
    other, opt3 = _mlp_compiled(device_mesh, 3)
    other.load_sharded(folder, opt3)
    return after, _mlp_steps(other, opt3, range(3, 6))


@pytest.mark.timeout(200)
def test_sharded_checkpoint_resumes_on_another_stage_and_dp_size(tmp_path):
    import json

    from meshc.runtime import launch

    per_rank = launch(_save_rank, "dp=2", str(tmp_path), timeout=150)
    after, resumed = per_rank[0]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(after), rtol=1e-6, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "rank00000.safetensors",
                                                          "rank00001.safetensors"]
    assert json.loads((tmp_path / "index.json").read_text())["zero"] == 2
    one, opt = _mlp_compiled(None, 0)  # one device (dp=1) resumes the dp=2 files
    one.load_sharded(tmp_path, opt)
    torch.testing.assert_close(torch.tensor(_mlp_steps(one, opt, range(3, 6))), torch.tensor(after),
                               rtol=1e-5, atol=1e-7)


def _consolidate_rank(device_mesh, model_name: str, folder: str):
    """dp=2 zero=3: 3 steps, save the shards; the compiled model's logits after training."""
    import meshc
    from meshc.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_name, batch=BATCH, seq=SEQ)
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs, training=True, zero=3)
    opt = compiled.make_optimizer(torch.optim.AdamW, lr=LR)
    for step in range(3):
        for ids, target in batches(step):
            compiled.train_step((ids,), target, loss_fn, {"use_cache": False})
        opt.step()
        opt.zero_grad()
    compiled.save_sharded(folder, opt)
    with torch.no_grad():  # a plain array: a tensor would travel as shared memory its exited rank frees
        return compiled(loaded.example_inputs[0], use_cache=False).logits.numpy().copy()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("model_name", ["llama-tiny", "gpt2-tiny"])  # gpt2: lm_head tied to the embedding
def test_consolidated_shards_load_into_hugging_face_with_the_trained_logits(tmp_path, model_name):
    """A model trained 3 steps on dp=2 zero=3 consolidates (into a model built on 'meta') to a
    save_pretrained folder that from_pretrained loads and that gives the compiled model's logits."""
    from meshc.models import load_model
    from meshc.runtime import launch
    from meshc.runtime.train_checkpoint import consolidate

    logits = launch(_consolidate_rank, "dp=2", model_name, str(tmp_path / "shards"), timeout=300)
    plain = load_model(model_name, batch=BATCH, seq=SEQ)
    with torch.device("meta"):
        empty = type(plain.model)(plain.model.config)
    consolidate(tmp_path / "shards", empty, tmp_path / "hf")
    hf = type(plain.model).from_pretrained(tmp_path / "hf").eval()
    ids = plain.example_inputs[0]
    with torch.no_grad():
        got, before = hf(ids, use_cache=False).logits, plain.model(ids, use_cache=False).logits
    for rank_logits in logits:
        torch.testing.assert_close(got, torch.from_numpy(rank_logits), rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the trained weights, not the initial ones
    if model_name == "gpt2-tiny":
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def _from_checkpoint_rank(device_mesh, folder: str, stages: list[int]):
    """Per ZeRO stage: a model built on 'meta' from the folder's config, compiled for training,
    filled by meshc.load_checkpoint, and the same model built on CPU by from_pretrained; 3
    steps each. (on_meta_before, losses, parameters) of each."""
    import meshc
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    ids = batches(0)[0][0]
    out = {}
    for stage in stages:
        runs = []
        for on_meta in (True, False):
            if on_meta:
                with torch.device("meta"):
                    model = LlamaForCausalLM(LlamaConfig.from_pretrained(folder)).eval()
            else:
                model = LlamaForCausalLM.from_pretrained(folder).eval()
            compiled = meshc.compile(model, device_mesh, example_inputs=(ids,), example_kwargs={"use_cache": False},
                                     training=True, zero=stage)
            on_meta_before = any(t.is_meta for t in compiled.program.state.values())
            if on_meta:
                meshc.load_checkpoint(compiled, folder)
            opt = compiled.make_optimizer(torch.optim.AdamW, lr=LR)
            losses = []
            for step in range(3):
                losses.append(sum(float(compiled.train_step((i,), t, loss_fn, {"use_cache": False}))
                                  for i, t in batches(step)))
                opt.step()
                opt.zero_grad()
            params = {n: t.numpy().copy() for n, t in compiled.trainer.full_parameters().items()}  # plain arrays
            runs.append((on_meta_before, losses, params))
        out[stage] = runs
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hugging_face_checkpoint_loads_into_a_meta_built_training_model(tmp_path):
    """meta-built + load_checkpoint, then dp=2 zero=2/3 training, equals the CPU-built model's
    training exactly (zero=2 holds a full copy beside the shard, zero=3 only the shard)."""
    from meshc.models import load_model
    from meshc.runtime import launch

    load_model("llama-tiny").model.save_pretrained(tmp_path)
    for per_stage in launch(_from_checkpoint_rank, "dp=2", str(tmp_path), [2, 3], timeout=500):
        for stage, ((meta_before, meta_losses, meta_params), (cpu_before, cpu_losses, cpu_params)) in per_stage.items():
            assert meta_before and not cpu_before, stage
            assert meta_losses == cpu_losses, (stage, meta_losses, cpu_losses)
            assert meta_params.keys() == cpu_params.keys()
            for name, p in meta_params.items():
                assert (p == cpu_params[name]).all(), (stage, name)


def _pp_zero_rank(device_mesh, stages: list[int]):
    """dp=2,pp=2, MLP: per ZeRO stage, 6 AdamW steps through the pipeline runtime; losses, this
    rank's parameters, and the optimizer state's and the parameters' element counts."""
    out = {}
    for zero in stages:
        compiled, opt = _mlp_compiled(device_mesh, zero)
        losses = _mlp_steps(compiled, opt, range(6))
        params = {n: p.detach().numpy().copy() for n, p in compiled.local_parameters().items()}
        state = sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
        out[zero] = losses, params, state, sum(p.size for p in params.values())
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_zero1_and_zero2_on_the_pipelines_dp_dim_train_like_plain_training():
    from meshc.runtime import launch

    ref, model = _mlp_reference(schedule=False)
    plain = dict(model.named_parameters())
    for per_stage in launch(_pp_zero_rank, "dp=2,pp=2", [0, 1, 2], timeout=300):
        for zero, (losses, params, state, numel) in per_stage.items():
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-7,
                                       msg=lambda m, z=zero: f"zero={z} losses: {m}")
            assert params, zero  # every pp rank holds some layers
            for name, p in params.items():
                # zero=1/2 do zero=0's arithmetic (a sum of two, elementwise AdamW on blocks): equal;
                # zero=0 moves from plain training by what dp's summation order moves (2.3e-5 measured:
                # AdamW divides by sqrt(v), so a nearly cancelled gradient's rounding shows)
                torch.testing.assert_close(torch.from_numpy(p), torch.from_numpy(per_stage[0][1][name]), rtol=0,
                                           atol=0, msg=lambda m, z=zero, n=name: f"zero={z} vs zero=0 {n}: {m}")
                torch.testing.assert_close(torch.from_numpy(p), plain[name].detach(), rtol=1e-5, atol=1e-4,
                                           msg=lambda m, z=zero, n=name: f"zero={z} {n}: {m}")
            # AdamW's two moments: of every parameter (zero=0), of this rank's half (zero=1/2)
            assert state == (2 * numel if zero == 0 else sum(2 * -(-p.size // 2) for p in params.values())), zero


def test_meshc_show_prints_the_zero3_schedule(capsys):
    """Rank 0's training program, without processes: one gather per layer bucket, prefetched."""
    from meshc.cli import main

    assert main(["show", "mlp", "--mesh", "dp=2", "--zero", "3", "--after", "zero"]) == 0
    code = capsys.readouterr().out
    gathers = [line for line in code.splitlines() if "zero_layer(" in line]
    assert len(gathers) == 3, code  # up, mid, down: weight + bias each
    # prefetch: mid's bucket is gathered before up's linear runs
    assert code.index("(p_mid_weight, p_mid_bias)") < code.index("aten.linear.default(narrow")  # x's dp block


def test_bf16_mixed_precision_equals_plain_autocast_training_with_fp32_master_weights():
    """One device, MLP: compile(mixed_precision='bf16') equals plain training whose forward runs
    under torch.autocast(bfloat16) (fp32 weights and AdamW); and it differs from fp32 training."""
    import meshc
    from meshc.models import load_model

    def plain(autocast: bool) -> list[float]:
        model = load_model("mlp").model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(4):
            x, = load_model("mlp", batch=4, seq=8 + step).example_inputs
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.mse_loss(model(x), x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return losses

    mlp = load_model("mlp")
    compiled = meshc.compile(mlp.model, example_inputs=mlp.example_inputs, training=True, mixed_precision="bf16")
    opt = compiled.make_optimizer(torch.optim.AdamW, lr=1e-2)
    got = _mlp_steps(compiled, opt, range(4))
    assert all(p.dtype == torch.float32 for p in opt.param_groups[0]["params"])  # fp32 master weights
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain(True)), rtol=1e-5, atol=1e-7)
    fp32 = torch.tensor(plain(False))
    assert (torch.tensor(got) - fp32).abs().max() > 1e-5  # bf16 was really used
    torch.testing.assert_close(torch.tensor(got), fp32, rtol=2e-2, atol=0)
