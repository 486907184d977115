import pytest
from meshc.cli import main

from ..capture_once import capture_once


@pytest.fixture
def captures():
    """`meshc show` / `meshc compile --mesh` capture once per session (tests/capture_once.py): these tests
    are about what the commands print after capture."""
    with capture_once() as memo:
        yield memo


def test_passes_table(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "preserves semantics" in out and "dce" in out


def test_compile_main_job(tmp_path, capsys):
    assert main(["compile", "llama-tiny", "--dump-dir", str(tmp_path), "--timings", "--check"]) == 0
    out = capsys.readouterr().out
    assert "nodes before" in out and "capture" in out and "first call" in out
    assert out.count(" ok") == 2  # two sequence lengths checked against eager
    assert (tmp_path / "003_lint.py").exists()


def test_show_after_and_diff(captures, capsys):
    assert main(["show", "gpt2-tiny", "--after", "dce", "--diff"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- captured") and "-" in out and "_assert_tensor_metadata" in out
    assert main(["show", "mlp", "--after", "captured"]) == 0
    assert "class GraphModule" in capsys.readouterr().out


def test_bisect_finds_the_bad_pass(temp_pass, capsys):
    from .test_pass_manager import scale_first_linear

    temp_pass("scale", scale_first_linear)
    assert main(["bisect", "mlp", "--pipeline", "dce,lint,scale(by=3.0),lint"]) == 1
    assert "first bad pass: #3 'scale(by=3.0)'" in capsys.readouterr().out
    assert main(["bisect", "mlp", "--pipeline", "dce,lint"]) == 0


def test_model_from_file_factory(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\n"
                 "def make():\n    return torch.nn.Linear(8, 4), (torch.randn(3, 8),)\n"
                 "def bare():\n    return torch.nn.Linear(8, 4)\n")
    assert main(["compile", f"{f}:make", "--check"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["compile", f"{f}:bare"]) == 2
    assert "without example inputs" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["compile", "llama-tiny", "--pipeline", "dce,nope"], "unknown pass 'nope'"),
    (["compile", "no-such-model"], "cannot resolve model 'no-such-model'"),
    (["compile", "no_such_pkg.mod:f"], "cannot import 'no_such_pkg.mod'"),
    (["compile", "mlp", "--mesh", "tp=2", "--check"], "use `meshc run mlp --mesh tp=2`"),
    (["show", "mlp", "--after", "ladder_residual"], "not in the pipeline"),
])
def test_cli_errors_are_one_clear_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshc: error:") and match in err and "Traceback" not in err


@pytest.mark.timeout(300)
def test_run_on_a_pipeline_mesh_picks_micro_batches_that_divide_the_batch(capsys):
    assert main(["run", "llama-tiny", "--mesh", "pp=2", "--iters", "1", "--timeout", "200"]) == 0
    out = capsys.readouterr().out
    assert "pipeline_partition(virtual=1,schedule=1f1b,microbatches=2)" in out  # batch 2: 2, not 2 x stages
    assert out.count("max abs error 0.00e+00 (ok)") == 2  # forward-only pipeline output is exact
    assert "predicted by the cost model (cpu-gloo): stages " in out  # next to the measured forward
    assert "`meshc calibrate --mesh pp=2` measures it" in out  # and how to price this machine instead


@pytest.mark.timeout(300)
def test_a_mesh_that_divides_nothing_compiles_replicated_and_says_why(captures, capsys):
    """tp=3 divides none of llama-tiny's head counts and widths: shard what divides (nothing),
    replicate the rest, and name the sizes, the per-rank bytes and the sizes that would shard."""
    from meshc.cli import main
    from meshc.runtime.run_on_mesh import run_on_mesh

    assert main(["compile", "llama-tiny", "--mesh", "tp=3"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.*.self_attn.k_proj (3 does not divide 4 heads or 64 features)" in out
    assert "model.layers.*.mlp.up_proj (3 does not divide 352 features)" in out
    assert "Parameters per rank: 3.32 of 3.32 MiB; tp sizes that would shard more: 2, 4, 8" in out
    r = run_on_mesh("mlp", "tp=3", seqs=(4,), iters=1, timeout=120)  # and it runs, equal to eager
    assert r["max_abs_error"] <= 1e-5


@pytest.mark.slow  # compiles reference-lm's decode graphs (25 s)
@pytest.mark.timeout(300)
def test_generate_prints_the_continuation_and_the_speed(capsys):
    from meshc.cli import main

    assert main(["generate", "reference-lm", "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and len(out.out.rstrip("\n")) > len("def ")
    assert "time to first token" in out.err and "tokens/s" in out.err


@pytest.mark.slow  # a tp=2 compile of three graphs on two processes
@pytest.mark.timeout(600)
def test_generate_on_a_mesh_prints_what_one_device_prints(capsys):
    from meshc.cli import main

    args = ["generate", "llama-tiny", "--prompt", "5,6,7,8", "--max-new-tokens", "6"]
    assert main(args) == 0
    alone = capsys.readouterr()
    assert main([*args, "--mesh", "tp=2"]) == 0
    meshed = capsys.readouterr()
    assert meshed.out == alone.out and len(meshed.out.split()) == 6
    assert "on mesh 'tp=2'" in meshed.err and "tokens/s" in meshed.err
