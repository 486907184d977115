"""attention_removal, ffn_fusion and parallel_blocks against their defining equations on real HF
models (Llama: RMSNorm + SwiGLU, no biases; GPT-2: LayerNorm + GELU, biases), the wide FFN's
shape in the graph (one norm, three or two matmuls), the tolerance the dependency metric
predicts, one all-reduce per fused run under tp=2, the shared layer-list parser, and the errors."""

from __future__ import annotations

import pytest
import torch
from meshc import MeshSpec, PassManager, capture
from meshc.collectives import collective_name
from meshc.errors import MeshcError, PassError, PipelineError
from meshc.ffn_deps import choose_runs, ffn_dependencies
from meshc.passes.layer_select import select_layers, select_runs
from meshc.passes.residual_stream import find_residual_stream
from meshc.pipeline import parse_pipeline

aten = torch.ops.aten
LINEARS = (aten.linear.default, aten.addmm.default, aten.mm.default)


@pytest.fixture(scope="module")
def captured(llama, gpt2):
    """One capture per model (capture does not depend on the mesh; each test sets its own)."""
    return {id(m): PassManager("dce").run(capture(m.model, m.example_inputs, m.example_kwargs, dynamic_shapes="auto"))
            for m in (llama, gpt2)}


@pytest.fixture
def _capture(captured):
    def get(loaded, mesh=None):
        program = captured[id(loaded)].clone()
        program.mesh = MeshSpec.parse(mesh)
        return program

    return get


def _logits(program, ids):
    with torch.no_grad():
        return program.run(ids).logits


# ---- the hand-written forms ---------------------------------------------------------------------

def _llama_parts(model):
    m = model.model

    def start(ids):
        x = m.embed_tokens(ids)
        return x, m.rotary_emb(x, torch.arange(ids.shape[1])[None])

    def attn(i, x, cs):
        layer = m.layers[i]
        return layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=cs, attention_mask=None)[0]

    def ffn(i, x):
        return m.layers[i].mlp(m.layers[i].post_attention_layernorm(x))

    return start, attn, ffn, lambda x: model.lm_head(m.norm(x)), len(m.layers)


def _gpt2_parts(model):
    t = model.transformer

    def start(ids):
        return t.wte(ids) + t.wpe(torch.arange(ids.shape[1])[None]), None

    def attn(i, x, _):
        return t.h[i].attn(t.h[i].ln_1(x))[0]

    def ffn(i, x):
        return t.h[i].mlp(t.h[i].ln_2(x))

    return start, attn, ffn, lambda x: model.lm_head(t.ln_f(x)), len(t.h)


PARTS = {"llama": _llama_parts, "gpt2": _gpt2_parts}


def reference(model_name, model, ids, removed=(), ffn_runs=(), block_runs=()):
    """x <- x + Attn_i(x) (unless removed), x <- x + FFN_i(x); a fused FFN run adds sum_i FFN_i(x);
    a parallel-block run adds sum_i f_i(x), f_i(x) = a_i + FFN_i(x + a_i), a_i = Attn_i(x)."""
    start, attn, ffn, head, n = PARTS[model_name](model)
    with torch.no_grad():
        x, cs = start(ids)
        ffn_run = {run[0]: run for run in ffn_runs}
        block_run = {run[0]: run for run in block_runs}
        ffn_later = {i for run in ffn_runs for i in run[1:]}
        block_later = {i for run in block_runs for i in run[1:]}
        for i in range(n):
            if i in block_run:
                total = 0
                for j in block_run[i]:
                    a = attn(j, x, cs)
                    total = total + a + ffn(j, x + a)
                x = x + total
                continue
            if i in block_later:
                continue
            if i not in removed:
                x = x + attn(i, x, cs)
            if i in ffn_run:
                x = x + sum(ffn(j, x) for j in ffn_run[i])
            elif i not in ffn_later:
                x = x + ffn(i, x)
        return head(x)


# ---- the shared layer-list parser -------------------------------------------------------------

def test_layer_lists_and_quoted_pipeline_options():
    assert select_layers("'3,5,7'", 8) == [3, 5, 7] and select_layers("1-2,4-6", 8) == [1, 2, 4, 5, 6]
    assert select_runs("1-2,4-6", 8) == [[1, 2], [4, 5, 6]] and select_runs("last:3", 8) == [[5, 6, 7]]
    assert select_layers("all", 3) == [0, 1, 2] and select_layers("first:2", 8) == [0, 1]
    for bad, why in [("1-9", "outside"), ("2-1", "outside"), ("1-3,3-4", "named twice"), ("x", "cannot read")]:
        with pytest.raises(MeshcError, match=why):
            select_runs(bad, 8)
    (call,) = parse_pipeline("ffn_fusion(runs='1-2,4-6',threshold=0.2)")
    assert call.options == {"runs": "1-2,4-6", "threshold": 0.2}
    assert str(call) == 'ffn_fusion(runs="1-2,4-6",threshold=0.2)'  # replayable inside '...' in a shell
    assert parse_pipeline(str(call))[0].options == call.options
    with pytest.raises(PipelineError, match="unmatched quote"):
        parse_pipeline("attention_removal(layers='3,5)")


# ---- attention_removal -------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_attention_removal_is_the_stream_passing_through(model, request, _capture):
    loaded = request.getfixturevalue(model)
    program = PassManager("dce,attention_removal(layers='1,3')").run(_capture(loaded))
    ids = loaded.inputs_at(2, 16)[0]
    ref = reference(model, loaded.model, ids, removed={1, 3})
    assert (_logits(program, ids) - ref).abs().max().item() <= 1e-5
    assert not any("layers.1.attn" in n or "layers.1.self_attn" in n or "h.1.attn" in n
                   for n in (p.meta["meshc_name"] for p in program.placeholders()))
    stream = find_residual_stream(program)
    assert stream.layers() == [[1, 2], [3], [4, 5], [6]]  # numbered as in the model, one sub-layer is fine
    # ladder_residual after it still numbers layers as the model does
    PassManager("ladder_residual(layers=3)").run(program)


# ---- ffn_fusion --------------------------------------------------------------------------------

@pytest.mark.parametrize("model, matmuls", [("llama", 3), ("gpt2", 2)])
def test_fused_is_the_parallel_form_as_one_wide_ffn(model, matmuls, request, _capture):
    loaded = request.getfixturevalue(model)
    program = PassManager("dce,attention_removal(layers=2-3),ffn_fusion(runs=1-3)").run(_capture(loaded))
    for seq in (16, 33):
        ids = loaded.inputs_at(2, seq)[0]
        ref = reference(model, loaded.model, ids, removed={2, 3}, ffn_runs=[[1, 2, 3]])
        got = _logits(program, ids)
        assert (got - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
        sequential = reference(model, loaded.model, ids, removed={2, 3})
        assert (got - sequential).abs().max().item() > 1e-3  # it really computes something else
    stream = find_residual_stream(program)
    assert stream.layers() == [[1, 2], [3, 4], [], []]  # layers 2 and 3 live in layer 1's fused FFN
    body = stream.body(4)
    assert sum(n.target in LINEARS for n in body) == matmuls  # one wide FFN
    assert sum(n.target in (aten.rsqrt.default, aten.layer_norm.default) for n in body) == 1  # one norm
    widths = {n.meta["val"].shape[-1] for n in body if n.target in LINEARS}
    intermediate = 352 if model == "llama" else 512
    assert 3 * intermediate in widths


def test_fused_checkpoint_names_and_biases(gpt2, _capture):
    program = PassManager("dce,attention_removal(layers=2),ffn_fusion(runs=1-2)").run(_capture(gpt2))
    names = {p.meta["meshc_name"] for p in program.placeholders("parameter")}
    assert {"transformer.h.1-2.mlp.c_fc.weight", "transformer.h.1-2.mlp.c_fc.bias",
            "transformer.h.1-2.mlp.c_proj.weight", "transformer.h.1-2.mlp.c_proj.bias"} <= names
    assert not any(n.startswith(("transformer.h.1.mlp", "transformer.h.2.mlp", "transformer.h.2.ln"))
                   for n in names)


def test_weakly_dependent_run_fuses_within_the_tolerance_the_metric_predicts(llama, _capture):
    """FFNs whose contributions are tiny barely depend on each other: M < 1e-3 for every pair, and
    the fused stream stays within sum_j |h_j| sum_(i<j) sqrt(2 M[i, j]) of the sequential one."""
    program = _capture(llama)
    for node in program.placeholders("parameter"):
        if any(f"layers.{i}.mlp.down_proj" in node.meta["meshc_name"] for i in (1, 2, 3)):
            program.state[node.name] = program.state[node.name] * 0.02
    removed = PassManager("attention_removal(layers=2-3)").run(program)
    loaded = llama
    ids = loaded.inputs_at(2, 24)[0]
    deps = ffn_dependencies(removed, ids)
    run = [deps.layers.index(i) for i in (1, 2, 3)]
    m = deps.M[run][:, run]
    assert all(m[i, j] < 1e-3 for i in range(3) for j in range(i + 1, 3))
    assert choose_runs(deps, 1e-3) == [[1, 2, 3]]
    fused = PassManager("ffn_fusion(runs=1-3)").run(removed)
    x_seq, hs = _stream_end(removed, ids, run_subs=[deps.subs[i] for i in run])
    x_par, _ = _stream_end(fused, ids, run_subs=[])
    # per token: |sum_j (h_j(x) - h_j(x_(j-1)))| <= sum_j |h_j| * sum_(i<j) sqrt(2 M[i, j]) (first order)
    bound = sum(hs[j].norm(dim=-1) * sum((2 * m[i, j]) ** 0.5 for i in range(j)) for j in range(1, 3))
    err = (x_par - x_seq).norm(dim=-1)
    assert err.max().item() > 0
    assert (err <= 2 * bound + 1e-5).all(), (err.max().item(), bound.max().item())
    auto = PassManager("ffn_fusion(runs=auto,threshold=0.001)").run(removed)  # M on the example inputs
    assert "runs [[1, 2, 3]]" in auto.notes[-2]
    assert torch.equal(_logits(auto, ids), _logits(fused, ids))


def _stream_end(program, ids, run_subs):
    """The value of the last residual add after the run (the stream entering the final norm), and
    the run's FFN contributions h_j."""
    from meshc.ffn_deps import _Probe

    stream = find_residual_stream(program)
    watch = [stream.xs[-1], *[stream.hs[k - 1] for k in run_subs]]
    probe = _Probe(program.gm, watch, None)
    with torch.no_grad():
        probe.run(*program.state_args(), *program.bind_inputs((ids,), {}))
    return probe.seen[watch[0]], [probe.seen[n] for n in watch[1:]]


def test_under_tp2_a_fused_run_costs_one_all_reduce(llama, _capture):
    def reduces(pipeline):
        out = PassManager(pipeline).run(_capture(llama, "tp=2"))
        return sum(collective_name(n) == "all_reduce" for n in out.graph.nodes)

    removed = reduces("dce,attention_removal(layers=2-3),spmd_partition")
    fused = reduces("dce,attention_removal(layers=2-3),ffn_fusion(runs=1-3),spmd_partition")
    assert removed == 6 and fused == removed - 2  # 3 FFNs -> 1: one all-reduce instead of three


def test_errors_say_what_is_in_the_way(llama, gpt2, _capture):
    with pytest.raises(PassError, match=r"attention of layer\(s\) \[2\].*attention_removal\(layers=2\)"):
        PassManager("ffn_fusion(runs=1-2)").run(_capture(llama))
    with pytest.raises(PassError, match="nothing to fuse"):
        PassManager("ffn_fusion(runs=1)").run(_capture(llama))
    with pytest.raises(PassError, match="no attention sub-layer left"):
        PassManager("attention_removal(layers=1),attention_removal(layers=1)").run(_capture(gpt2))
    fused = PassManager("attention_removal(layers=2),ffn_fusion(runs=1-2)").run(_capture(llama))
    with pytest.raises(PassError, match="layer 2 has 0 FFN"):
        PassManager("attention_removal(layers=3),ffn_fusion(runs=2-3)").run(fused)


# ---- parallel_blocks ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_parallel_blocks_is_the_hand_written_form(model, request, _capture):
    loaded = request.getfixturevalue(model)
    program = PassManager("dce,parallel_blocks(runs=1-2)").run(_capture(loaded))
    ids = loaded.inputs_at(2, 16)[0]
    ref = reference(model, loaded.model, ids, block_runs=[[1, 2]])
    got = _logits(program, ids)
    assert (got - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    assert (got - reference(model, loaded.model, ids)).abs().max().item() > 1e-3
    assert find_residual_stream(program).layers() == [[1, 2], [3], [], [4, 5]]


# ---- meshc ffn-deps ----------------------------------------------------------------------------

def test_ffn_deps_cli_prints_the_table_the_runs_and_draws_the_heatmap(tmp_path, capsys):
    from meshc.cli import main

    ids = torch.randint(0, 512, (600,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids.tolist())))
    png = tmp_path / "deps.png"
    assert main(["ffn-deps", "llama-tiny", "--calibration", str(tmp_path / "ids.txt"), "--tokens", "512",
                 "--pipeline", "attention_removal(layers=2-3)", "--threshold", "2", "--png", str(png)]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert "512 calibration tokens" in lines[0] and lines[1].split() == ["layer", "0", "1", "2", "3"]
    # threshold 2 > any cosine distance: all adjacent FFNs fuse (layer 1's attention separates FFN 0)
    assert "ffn_fusion(runs='1-3')" in out.out
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 1000
    except ImportError:
        assert "pip install 'meshc[plot]'" in out.err
    assert main(["ffn-deps", "llama-tiny"]) == 2
    assert "give --calibration FILE" in capsys.readouterr().err
