"""The Triton backend end to end on CPU (interpreter): whole models equal eager, backend choice,
the interpreter notice, clear errors, `meshc kernels`, and a sharded per-rank program."""

import sys

import pytest
import torch

pytest.importorskip("triton")

import meshc  # noqa: E402
from meshc.errors import MeshcError  # noqa: E402
from meshc.models import load_model  # noqa: E402


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", [pytest.param("llama-tiny", marks=pytest.mark.slow),  # suite time; gpt2 and
                                  "gpt2-tiny"])                                       # 9 families run by default
def test_whole_model_equals_eager_at_several_sizes(name):
    loaded = load_model(name, batch=2, seq=8)
    compiled = meshc.compile(loaded.model, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs, backend="triton")
    assert compiled.backend == "triton"
    assert "Triton interpreter" in compiled.report and "not fast" in compiled.report
    kinds = {k.kind for k in compiled._run_flat.kernels}
    assert kinds == {"pointwise", "reduction", "matmul", "attention"}, kinds
    if name == "llama-tiny":  # GQA: attention reads the 4 K/V heads, the repeat_kv copies are gone
        attention = next(k for k in compiled._run_flat.kernels if k.kind == "attention")
        assert ", 4, s" in attention.reads[1], attention.reads
        assert not any(n.target is torch.ops.aten.clone.default for n in compiled._run_flat.gm.graph.nodes)
    with torch.no_grad():
        for batch, seq in ((2, 8), (2, 5), (3, 11)):  # one compile (dynamic batch and sequence)
            inputs = loaded.inputs_at(batch, seq)
            out = compiled(*inputs, **loaded.example_kwargs).logits
            ref = loaded.model(*inputs, **loaded.example_kwargs).logits
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(120)
def test_auto_picks_aten_on_cpu_and_unknown_backends_are_errors(mlp):
    compiled = meshc.compile(mlp.model, example_inputs=mlp.example_inputs)
    assert compiled.backend == "aten"
    with pytest.raises(MeshcError, match="unknown backend 'tpu'.*aten, triton"):
        meshc.compile(mlp.model, example_inputs=mlp.example_inputs, backend="tpu")


@pytest.mark.timeout(120)
def test_backend_triton_without_triton_says_what_to_install(mlp, monkeypatch):
    program = meshc.capture(mlp.model, mlp.example_inputs)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    from meshc.backends import lower

    with pytest.raises(MeshcError, match=r"needs the `triton` package.*pip install 'triton>=3.6'"):
        lower(program, "triton")


@pytest.mark.timeout(120)
def test_fallback_reasons_go_into_the_compile_report():
    class Half(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x.double() * 2, -1).float() + 1

    x = torch.randn(3, 5)
    compiled = meshc.compile(Half(), example_inputs=(x,), backend="triton", dynamic_shapes=None)
    torch.testing.assert_close(compiled(x), Half()(x), rtol=1e-5, atol=1e-5)
    assert "left to ATen" in compiled.report and "dtype float64" in compiled.report, compiled.report


@pytest.mark.timeout(120)
def test_cli_kernels_prints_names_nodes_and_source_lines(capsys):
    from meshc.cli import main

    assert main(["kernels", "mlp", "--source"]) == 0
    out = capsys.readouterr().out
    assert "triton_mm_gelu_0  (matmul; nodes: %linear, %gelu)" in out
    assert "models.py:" in out and "self.down(torch.relu(" in out  # the user's source line
    assert "@triton.jit" in out


def _rank_main(device_mesh):
    from meshc.numerics import max_abs_error

    torch.set_num_threads(1)
    loaded = load_model("llama-tiny", batch=1, seq=8)
    compiled = meshc.compile(loaded.model, device_mesh, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs, backend="triton")
    with torch.no_grad():
        out = compiled(*loaded.example_inputs, **loaded.example_kwargs)
        ref = loaded.model(*loaded.example_inputs, **loaded.example_kwargs)
    def count(graph):
        return sum("_c10d_functional" in str(n.target) for n in graph.nodes)

    lowered, program = compiled._run_flat.gm.graph, compiled.program.graph
    return max_abs_error(ref, out)[0], compiled.backend, count(lowered), count(program)


@pytest.mark.timeout(300)
def test_sharded_tp2_program_lowers_to_triton_and_equals_eager():
    from meshc.runtime import launch

    results = launch(_rank_main, "tp=2", timeout=500)
    for err, backend, lowered_collectives, program_collectives in results:
        assert backend == "triton" and lowered_collectives == program_collectives > 0  # collectives stay ATen
        assert err <= 1e-5, results


@pytest.mark.timeout(120)
def test_cli_compile_with_the_triton_backend_checks_against_eager(capsys):
    from meshc.cli import main

    assert main(["compile", "mlp", "--backend", "triton", "--check"]) == 0
    out = capsys.readouterr().out
    assert "lowering to triton" in out and "Triton interpreter" in out
    assert out.count("check vs eager") == 2 and "FAILED" not in out
