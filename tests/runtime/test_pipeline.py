"""The pipeline runtime on real gloo meshes (spawned by meshc.launch, each with a timeout):
forward-only outputs equal the single-process forward on the same micro-batches, one training
step's gradients equal single-process gradient accumulation for every schedule, pp x tp
composes, and misuse fails with a clear error before any rank waits."""

from __future__ import annotations

import pytest
import torch
from meshc.runtime import launch

from ..capture_once import captured

TRAIN_SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)]


def loss_fn(out, target):
    return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target.flatten())


def build(device_mesh, model_name: str, batch: int = 4, seq: int = 8):
    """Every rank: the model (same seed) and its captured Program."""
    import meshc
    from meshc.mesh import MeshSpec
    from meshc.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_name, batch=batch, seq=seq)
    program = meshc.capture(loaded.model, loaded.example_inputs, loaded.example_kwargs, dynamic_shapes="auto",
                            mesh=MeshSpec.parse(device_mesh))
    return loaded, meshc.PassManager("dce").run(program)


def pipelined(device_mesh, program, schedule: str, microbatches: int, virtual: int):
    """The Program through the pipeline the resolver gives (pipeline_partition, spmd_partition on a
    tp dim, split_stages, ...), and its PipelineModel."""
    import meshc
    from meshc.pipeline import resolve
    from meshc.runtime.pipeline import pipeline_model

    resolved = resolve(program.mesh, plan="megatron", schedule=schedule, microbatches=microbatches, virtual=virtual)
    program = program.clone()
    program.rank, program.plan = device_mesh.get_rank(), "megatron"
    program = meshc.PassManager(resolved.pipeline).run(program)
    pipe = pipeline_model(program, device_mesh, resolved.schedule)  # its program keeps only this rank's state
    return (program if program.mesh.tp == 1 else pipe.program), pipe


def forward_check(device_mesh, loaded, program, schedule, microbatches, virtual, pipe=None):
    """(pipeline == the same graph run in one process on each micro-batch, bit for bit (None under
    tp, whose all-reduces sum in another order; for a compiled pipe, whose program holds only its
    rank's state, the reference is the eager model); max error vs eager; same output type)."""
    program, pipe = (None, pipe) if pipe else pipelined(device_mesh, program, schedule, microbatches, virtual)
    ids = loaded.example_inputs[0]
    out = pipe(ids, use_cache=False)
    b = ids.shape[0] // microbatches
    with torch.no_grad():
        eager_outs = [loaded.model(ids[i * b:(i + 1) * b], use_cache=False) for i in range(microbatches)]
        eager = torch.cat([o.logits for o in eager_outs])
        if pipe.program.mesh.tp > 1:
            ref = None
        elif program is None:
            ref = eager
        else:
            ref = torch.cat([program.run(ids[i * b:(i + 1) * b], use_cache=False).logits for i in range(microbatches)])
    exact = torch.equal(out.logits, ref) if ref is not None else None
    return exact, float((out.logits - eager).abs().max()), type(out) is type(eager_outs[0])


def train_check(device_mesh, loaded, program, schedule, microbatches, virtual, pipe=None):
    """One train_step vs single-process gradient accumulation: (loss, reference loss, worst excess
    over |g - ref| <= 1e-5 |ref|, local parameters without a gradient, parameters with one)."""
    from meshc.placement import local_shard

    program, pipe = (pipe.program, pipe) if pipe else pipelined(device_mesh, program, schedule, microbatches, virtual)
    program = pipe.program  # placements (tp) and names of this rank's tensors
    ids = loaded.example_inputs[0]
    target = torch.randint(0, 512, ids.shape, generator=torch.Generator().manual_seed(7))
    model = loaded.model
    for p in model.parameters():
        p.grad = None
    loss = pipe.train_step((ids,), target, loss_fn, {"use_cache": False})
    got = {name: t.grad.detach().clone() for name, t in pipe.local_parameters().items() if t.grad is not None}
    for p in model.parameters():  # single-process gradient accumulation over the same micro-batches
        p.grad = None
    b, ref_loss = ids.shape[0] // microbatches, 0.0
    for i in range(microbatches):
        part = loss_fn(model(ids[i * b:(i + 1) * b], use_cache=False), target[i * b:(i + 1) * b]) / microbatches
        part.backward()
        ref_loss += float(part.detach())
    full = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}  # tied weights: one name
    placements = {program.fqn(n.name): n.meta.get("meshc_placement") for n in program.placeholders()}
    coords, sizes = program.mesh.coords(program.rank), program.mesh.sizes
    worst = 0.0
    for name, g in got.items():
        ref = full[name].grad
        if placements.get(name) is not None:
            ref = local_shard(ref, placements[name], coords, sizes)
        worst = max(worst, float(((g - ref).abs() - 1e-5 * ref.abs()).max()))
    missing = [name for name in pipe.local_parameters() if name not in got]
    for p in model.parameters():
        p.grad = None
    return float(loss), ref_loss, worst, missing, sorted({canonical[id(full[n])] for n in got})


def _rank(device_mesh, model_name, forward_cases, train_cases):
    loaded, program = build(device_mesh, model_name)
    return ([forward_check(device_mesh, loaded, program, *c) for c in forward_cases],
            [train_check(device_mesh, loaded, program, *c) for c in train_cases])


def run_cases(model_name, mesh, forward_cases=(), train_cases=(), timeout=240):
    per_rank = launch(_rank, mesh, model_name, list(forward_cases), list(train_cases), timeout=timeout)
    return [r[0] for r in per_rank], [r[1] for r in per_rank]


def check_forward(per_rank, exact=True):
    for results in per_rank:
        for is_exact, eager_err, same_type in results:
            assert is_exact or (is_exact is None and not exact), "pipeline forward differs from the single-process one"
            assert eager_err <= 1e-5 and same_type  # and the model's own output structure


#: Gradient tolerance beyond rtol 1e-5. Without tp the pipeline sums the same products in the same order
#: (1e-7); under tp, all-reduces and reduce-scatters sum the ranks' partial products in another order, which
#: moves near-zero fp32 gradients by ~1e-7 (1.05e-7 seen on pp=2,tp=2): 1e-6 there, still 10x tighter than
#: torch.testing's float32 default (atol 1e-5).
ATOL, TP_ATOL = 1e-7, 1e-6


def check_training(model_name, per_rank, cases, atol=ATOL):
    from meshc.models import load_model

    every = {n for n, _ in load_model(model_name).model.named_parameters()}
    for k, case in enumerate(cases):
        names = set()
        for results in per_rank:
            loss, ref_loss, worst, missing, got = results[k]
            assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (case, loss, ref_loss)
            assert worst <= atol, (case, worst)  # |g - ref| <= 1e-5 |ref| + atol, elementwise
            assert not missing, (case, missing)
            names |= set(got)
        assert names == every, (case, every - names)  # every parameter got its gradient on some rank


@pytest.mark.timeout(300)
def test_pp2_gpt2_forward_exact_and_every_schedule_trains_like_gradient_accumulation():
    train = [(s, 4, v) for s, v in TRAIN_SCHEDULES]
    fwd, tr = run_cases("gpt2-tiny", "pp=2", [("forward", 2, 1), ("1f1b", 4, 1)], train)
    check_forward(fwd)
    check_training("gpt2-tiny", tr, train)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pp2_llama_forward_exact_and_1f1b_trains():
    train = [("1f1b", 2, 1), ("zb-h1", 4, 1)]
    fwd, tr = run_cases("llama-tiny", "pp=2", [("forward", 4, 1)], train)
    check_forward(fwd)
    check_training("llama-tiny", tr, train)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model_name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("mesh, forward_mbs, exact", [("pp=4", 4, True), ("pp=2,tp=2", 2, False)])
def test_forward_and_every_schedule_on_four_ranks(mesh, forward_mbs, exact, model_name):
    """exact: bit-identical forward (not under tp, whose all-reduces sum in another order)."""
    train = [(s, 4, v) for s, v in TRAIN_SCHEDULES]
    fwd, tr = run_cases(model_name, mesh, [("forward", forward_mbs, 1)], train, timeout=500)
    check_forward(fwd, exact=exact)
    check_training(model_name, tr, train, atol=ATOL if exact else TP_ATOL)


# ---- meshc.compile on a pp mesh, errors, timeouts ----------------------------------------------------

def _compiled_rank(device_mesh):
    import meshc
    from meshc.errors import InputError

    loaded, _ = build(device_mesh, "llama-tiny")
    pipe = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                         example_kwargs=loaded.example_kwargs, schedule="zb-h1", microbatches=4)
    fwd = forward_check(device_mesh, loaded, None, None, 4, 1, pipe=pipe)
    train = train_check(device_mesh, loaded, None, None, 4, 1, pipe=pipe)
    try:
        pipe(torch.randint(0, 512, (6, 8)), use_cache=False)
        error = None
    except InputError as e:
        error = str(e)
    return fwd, train, pipe.program.history, error


@pytest.mark.slow  # default-suite time (20 min on 2 cores): covered by faster cases
@pytest.mark.timeout(300)
def test_compile_on_a_pp_mesh_returns_a_pipeline_model():
    results = launch(_compiled_rank, "pp=2", timeout=240)
    check_forward([[r[0]] for r in results])
    check_training("llama-tiny", [[r[1]] for r in results], ["zb-h1"])
    for _, _, history, error in results:
        assert [h.split("(")[0] for h in history] == ["dce", "pipeline_partition", "split_stages",
                                                      "weight_grad_outputs", "lint"]
        assert "batch of 6 does not divide into 4 micro-batches" in error


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compile_on_pp2_tp2_with_the_auto_shard_plan():
    """compile()'s default plan on a tp dim is auto_shard, whose plan also all-gathers: the
    all_gather <-> reduce_scatter adjoint is exercised here."""
    results = launch(_compiled_rank, "pp=2,tp=2", timeout=360)
    check_forward([[r[0]] for r in results], exact=False)
    check_training("llama-tiny", [[r[1]] for r in results], ["zb-h1"], atol=TP_ATOL)
    for _, _, history, _ in results:
        assert [h.split("(")[0] for h in history] == ["dce", "pipeline_partition", "auto_shard", "spmd_partition",
                                                      "split_stages", "differentiable_collectives",
                                                      "weight_grad_outputs", "lint"]


def test_invalid_schedule_fails_before_any_process_is_needed():
    import meshc
    from meshc.errors import ScheduleError
    from meshc.models import load_model

    mlp = load_model("mlp")
    with pytest.raises(ScheduleError, match="multiple of pp=2"):  # not the MeshError 'needs 2 processes'
        meshc.compile(mlp.model, "pp=2", example_inputs=mlp.example_inputs, schedule="interleaved-1f1b",
                      microbatches=3, virtual=2)


def _local_program(mesh=None, stages=2, batch=4, model="llama-tiny"):
    """The model and its split Program (captured once per session: tests/capture_once.py)."""
    import meshc
    from meshc.models import load_model

    lm = load_model(model, batch=batch, seq=8)
    program = captured(lm.model, lm.example_inputs, lm.example_kwargs, dynamic_shapes="auto", mesh=mesh)
    return lm, meshc.PassManager(f"dce,pipeline_partition(stages={stages},virtual={stages},"
                                 f"schedule=interleaved-1f1b,microbatches=2),split_stages").run(program)


def test_misuse_is_a_clear_error_in_one_process():
    """pp=1 with 2 virtual stages runs in this process: the same runtime, no communication."""
    from meshc.errors import InputError, MeshError, ScheduleError
    from meshc.runtime.pipeline import PipelineModel
    from meshc.schedules import build_schedule

    lm, program = _local_program()
    pipe = PipelineModel(program, build_schedule("interleaved-1f1b", 1, 2, virtual=2))
    ids = lm.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(pipe(ids, use_cache=False).logits,
                           torch.cat([program.run(ids[i:i + 2], use_cache=False).logits for i in (0, 2)]))
    longer = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(3))  # one compile, any length
    with torch.no_grad():
        assert torch.equal(pipe(longer, use_cache=False).logits,
                           torch.cat([program.run(longer[i:i + 1], use_cache=False).logits for i in (0, 1)]))
    with pytest.raises(InputError, match="batch of 3 does not divide into 2 micro-batches"):
        pipe(ids[:3], use_cache=False)
    with pytest.raises(InputError, match="batch of 3 does not divide"):
        pipe.train_step((ids,), torch.zeros(3, 8, dtype=torch.long), loss_fn, {"use_cache": False})
    one_stage = __import__("meshc").PassManager("pipeline_partition(stages=1,schedule=forward,microbatches=2),"
                                                "split_stages").run(lm_program_without_split(program))
    with pytest.raises(ScheduleError, match="has no backward"):
        PipelineModel(one_stage, build_schedule("forward", 1, 2)).train_step((ids,), ids, loss_fn)
    with pytest.raises(MeshError, match="the program has 2 stages but"):
        PipelineModel(program, build_schedule("1f1b", 1, 2))
    with pytest.raises(ScheduleError, match="is for pp=1 but mesh 'pp=2' has pp=2"):
        PipelineModel(program.clone().__class__(**{**program.clone().__dict__, "mesh": __import__(
            "meshc").MeshSpec.parse("pp=2")}), build_schedule("1f1b", 1, 2))
    unsplit = program.clone()
    unsplit.split = None
    with pytest.raises(MeshError, match="run the passes pipeline_partition and split_stages first"):
        PipelineModel(unsplit, build_schedule("interleaved-1f1b", 1, 2, virtual=2))


def lm_program_without_split(program):
    out = program.clone()
    out.split = None
    for n in out.graph.nodes:
        n.meta.pop("meshc_stage", None)
    return out


def test_split_stages_errors_name_the_cause():
    import meshc
    from meshc.errors import PassError

    _, program = _local_program()
    late = program.clone()
    late.split = None
    first = next(n for n in late.graph.nodes if n.op == "call_function" and n.meta.get("meshc_stage") == 0
                 and any(u.meta.get("meshc_stage") == 0 for u in n.users))
    first.meta["meshc_stage"] = 1
    with pytest.raises(PassError, match="from the later stage 1"):
        meshc.PassManager("split_stages").run(late)
    unstaged = late.clone()
    for n in unstaged.graph.nodes:
        n.meta.pop("meshc_stage", None)
    with pytest.raises(PassError, match="run the pipeline_partition pass"):
        meshc.PassManager("split_stages").run(unstaged)


def test_dp_pp_tp_mesh_or_a_tp_that_cannot_shard_is_an_error():
    import meshc
    from meshc.errors import MeshError, PassError
    from meshc.models import load_model
    from meshc.runtime.pipeline import PipelineModel
    from meshc.schedules import build_schedule

    _, program = _local_program("dp=2,pp=2,tp=2", stages=2, model="mlp")
    with pytest.raises(MeshError, match="'dp' together with 'pp' and 'tp' is not supported yet"):
        PipelineModel(program, build_schedule("gpipe", 2, 2))
    _, program = _local_program("pp=2,sp=2", stages=2, model="mlp")
    with pytest.raises(MeshError, match="also has sp=2"):
        PipelineModel(program, build_schedule("gpipe", 2, 2))
    lm = load_model("mlp")  # hidden 256: tp=3 cannot shard it
    program = meshc.capture(lm.model, lm.example_inputs, lm.example_kwargs, dynamic_shapes="auto", mesh="pp=2,tp=3")
    program.plan = {"up.weight": "S(0)"}  # asks for what tp=3 cannot do (megatron would replicate it)
    with pytest.raises(PassError, match=r"up.weight \[256, 64\]: dim 0 \(size 256\) does not divide over mesh dim"):
        meshc.PassManager("dce,pipeline_partition,spmd_partition").run(program)


def _dp_pp_rank(device_mesh):
    loaded, program = build(device_mesh, "llama-tiny", batch=4)
    _, pipe = pipelined(device_mesh, program, "1f1b", 2, 1)  # each replica: 2 samples in 2 micro-batches
    forward = forward_check(device_mesh, loaded, None, None, 4, 1, pipe=pipe)
    train = train_check(device_mesh, loaded, None, None, 4, 1, pipe=pipe)  # reference: 4 micro-batches of 1
    return forward, train


@pytest.mark.slow  # default-suite time (20 min on 2 cores): covered by faster cases
@pytest.mark.timeout(300)
def test_dp2_pp2_replicas_split_the_batch_and_average_gradients():
    per_rank = launch(_dp_pp_rank, "dp=2,pp=2", timeout=240)
    for (_, eager_err, same_type), _ in per_rank:
        assert eager_err <= 1e-5 and same_type  # every rank returns the whole batch's output
    check_training("llama-tiny", [[r[1]] for r in per_rank], ["1f1b on dp=2,pp=2"])


def _stalled_rank(device_mesh):
    import time

    from meshc.runtime.pipeline import PipelineModel
    from meshc.schedules import build_schedule

    lm, program = _local_program("pp=2", stages=2, model="mlp")
    program.rank = device_mesh.get_rank()
    pipe = PipelineModel(program, build_schedule("forward", 2, 2), device_mesh, timeout=3)
    if device_mesh.get_rank() == 0:
        time.sleep(10)  # never sends: rank 1's receive must time out, not hang
        return None
    t0 = time.perf_counter()
    try:
        pipe(*lm.example_inputs)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return type(e).__name__, str(e)[:300], time.perf_counter() - t0
    return "no error", "", time.perf_counter() - t0


@pytest.mark.timeout(120)
def test_a_receive_that_never_arrives_times_out():
    _, (kind, message, seconds) = launch(_stalled_rank, "pp=2", timeout=60)
    assert kind != "no error" and 2.5 <= seconds <= 9, (kind, message, seconds)
