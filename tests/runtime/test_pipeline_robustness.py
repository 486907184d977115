"""The pipeline runtime on many configurations and on a model captured on 'meta': 60 random
(schedule, virtual, micro-batches) on pp=2 each fail validation or run exactly (none hangs); a
meta-captured GPT-2 loads only its stages' tensors per rank and equals the eager model."""

import pytest
import torch
from meshc.runtime import launch


def _random_configs_rank(device_mesh, configs):
    """Every config on the same 2 ranks: a ScheduleError before any transfer, or a step whose
    gradients equal gradient accumulation (an MLP, so each config takes well under a second)."""
    import meshc
    from meshc.errors import ScheduleError
    from meshc.models import load_model
    from meshc.runtime.pipeline import pipeline_model
    from meshc.schedules import build_schedule

    torch.set_num_threads(1)
    mlp = load_model("mlp", batch=2, seq=4)
    captured = meshc.capture(mlp.model, mlp.example_inputs, dynamic_shapes="auto", mesh="pp=2")
    captured.rank = device_mesh.get_rank()
    mse = lambda y, t: (y - t).pow(2).mean()
    out = []
    for name, v, m in configs:
        try:
            sched = build_schedule(name, 2, m, v)
        except ScheduleError as e:
            out.append(("invalid", str(e)[:80]))
            continue
        program = meshc.PassManager(f"dce,pipeline_partition(virtual={v},schedule={name},microbatches={m},"
                                    f"cuts=all),split_stages").run(captured.clone())
        pipe = pipeline_model(program, device_mesh, sched)
        x = torch.randn(2 * m, 4, 64, generator=torch.Generator().manual_seed(m))
        t = torch.randn(2 * m, 4, 64, generator=torch.Generator().manual_seed(m + 1))
        for p in mlp.model.parameters():
            p.grad = None
        if not sched.training:
            with torch.no_grad():
                ref = torch.cat([program.run(x[2 * i:2 * i + 2]) for i in range(m)])
                out.append(("ran", torch.equal(pipe(x), ref)))
            continue
        pipe.train_step((x,), t, mse)
        got = {n: p.grad.clone() for n, p in pipe.local_parameters().items()}
        for p in mlp.model.parameters():
            p.grad = None
        for i in range(m):
            (mse(mlp.model(x[2 * i:2 * i + 2]), t[2 * i:2 * i + 2]) / m).backward()
        ref = dict(mlp.model.named_parameters())
        out.append(("ran", all(torch.allclose(g, ref[n].grad, rtol=1e-5, atol=1e-7) for n, g in got.items())))
    return out


@pytest.mark.timeout(300)
def test_random_configurations_finish_or_fail_validation():
    import random

    rng = random.Random(0)
    names = ["forward", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]
    configs = []
    for _ in range(60):  # mostly valid (v=2 for interleaved, else 1), some deliberately not
        name = rng.choice(names)
        v = 2 if name == "interleaved-1f1b" else 1
        configs.append((name, 3 - v if rng.random() < 0.15 else v, rng.randint(1, 6)))
    results = launch(_random_configs_rank, "pp=2", configs, timeout=500)
    for config, *per_rank in zip(configs, *results):
        kinds = {r[0] for r in per_rank}
        assert len(kinds) == 1, (config, per_rank)  # every rank decided alike
        for kind, value in per_rank:
            assert value is True if kind == "ran" else "needs" in value or "virtual" in value, (config, value)
    ran = sum(r[0] == "ran" for r in results[0])
    assert ran >= 30, ran  # most configurations are valid ones (m < p included)


def _meta_pipeline_rank(device_mesh, folder: str):
    import meshc
    from meshc.runtime.sharded import local_state_bytes
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config.from_pretrained(folder)).eval()
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    pipe = meshc.compile(model, device_mesh, example_inputs=(ids[:2],), example_kwargs={"use_cache": False},
                         microbatches=2)
    meshc.load_checkpoint(pipe, folder)  # reads only the tensors this rank's stages use
    ref = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        same = torch.equal(pipe(ids, use_cache=False).logits,
                           torch.cat([ref(ids[i:i + 2], use_cache=False).logits for i in (0, 2)]))
    full = sum(p.numel() * p.element_size() for p in ref.parameters())
    return same, local_state_bytes(pipe) / full, any(t.is_meta for t in pipe.program.state.values())


@pytest.mark.timeout(300)
def test_meta_captured_model_loads_only_its_stages(tmp_path):
    from meshc.models import load_model

    load_model("gpt2-tiny").model.save_pretrained(tmp_path)
    for same, fraction, still_meta in launch(_meta_pipeline_rank, "pp=2", str(tmp_path), timeout=240):
        assert same and not still_meta
        assert fraction < 0.8, fraction  # its stages' layers (+ the tied embedding), not the whole model
