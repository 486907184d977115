import subprocess
import sys

import meshc
import pytest
import torch
from meshc.errors import NodeError, PassError
from meshc.passes.propagate_shapes import propagate_shapes


@pytest.fixture(scope="module")
def program(request):
    llama = request.getfixturevalue("llama")
    return meshc.capture(llama.model, llama.example_inputs, llama.example_kwargs, dynamic_shapes="auto")


def _first(program, target):
    return next(n for n in program.graph.nodes if n.op == "call_function" and n.target == target)


def scale_first_linear(program, *, by: float = 1.0):
    """Insert mul(linear, by) after the first linear: semantics kept only when by == 1."""
    lin = _first(program, torch.ops.aten.linear.default)
    with program.graph.inserting_after(lin):
        mul = program.graph.call_function(torch.ops.aten.mul.Tensor, (lin, by))
    lin.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
    mul.meta.update(stack_trace=lin.meta.get("stack_trace"), nn_module_stack=lin.meta.get("nn_module_stack"))
    program.gm.recompile()
    return propagate_shapes(program)


def test_input_program_is_never_mutated_and_new_nodes_are_stamped(program, temp_pass):
    temp_pass("scale", scale_first_linear)
    code = program.gm.code
    out = meshc.PassManager("scale,dce").run(program)
    assert program.gm.code == code and program.history == []
    assert out.history == ["scale", "dce"]
    stamped = [n for n in out.graph.nodes if n.meta.get("meshc_pass") == "scale"]
    assert [n.target for n in stamped] == [torch.ops.aten.mul.Tensor]


def test_error_names_pass_predecessors_node_and_source_line(program, temp_pass):
    def explode(program):
        node = _first(program, torch.ops.aten.scaled_dot_product_attention.default)
        raise NodeError(node, "pattern X did not match")

    temp_pass("explode", explode)
    with pytest.raises(PassError) as e:
        meshc.PassManager("dce,lint,explode").run(program)
    msg = str(e.value)
    assert "pass 'explode' failed (passes that ran before it: [dce, lint])" in msg
    assert "pattern X did not match" in msg
    assert "%scaled_dot_product_attention" in msg
    assert "modeling_llama.py" in msg and "module 'model.layers.0.self_attn'" in msg
    assert e.value.node is not None


def test_numeric_check_catches_a_pass_that_lies(program, temp_pass):
    temp_pass("scale", scale_first_linear)  # declared semantics-preserving
    meshc.PassManager("scale(by=1.0)", instruments=[meshc.NumericCheck()]).run(program)
    with pytest.raises(PassError, match=r"numeric check failed: pass 'scale\(by=1.5\)'"):
        meshc.PassManager("dce,scale(by=1.5)", instruments=[meshc.NumericCheck()]).run(program)


def test_numeric_check_skips_architecture_changes(program, temp_pass):
    temp_pass("rescale", scale_first_linear, preserves_semantics=False)
    check = meshc.NumericCheck()
    meshc.PassManager("rescale(by=2.0),dce", instruments=[check]).run(program)
    assert check.results[0] == ("rescale(by=2.0)", None) and check.results[1][1] == 0.0


def test_verify_catches_stale_shapes(program, temp_pass):
    def stale(program):
        node = _first(program, torch.ops.aten.linear.default)
        node.meta["val"] = node.meta["val"].to(torch.float16)
        return program

    temp_pass("stale", stale)
    meshc.PassManager("dce,lint", instruments=[meshc.Verify()]).run(program)
    with pytest.raises(PassError, match="recorded value torch.float16.*a pass forgot to update"):
        meshc.PassManager("stale", instruments=[meshc.Verify()]).run(program)


def test_dump_dir_files_are_runnable(program, tmp_path):
    meshc.PassManager("dce,lint", instruments=[meshc.DumpDir(tmp_path)]).run(program)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000_captured.py", "001_dce.py", "002_lint.py"]
    r = subprocess.run([sys.executable, str(tmp_path / "001_dce.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    nodes = program.num_nodes() - sum(  # dce removed the metadata asserts
        1 for n in program.graph.nodes if n.target == torch.ops.aten._assert_tensor_metadata.default)
    assert f"rebuilt graph: {nodes} nodes" in r.stdout
    assert "output 0: (2, 16, 512)" in r.stdout


def test_print_after_change_and_timings(program, capsys):
    timings = meshc.Timings()
    meshc.PassManager("dce,lint", instruments=[meshc.PrintAfterChange(), timings]).run(program)
    out = capsys.readouterr().out
    assert "# ---- IR after pass 1 'dce' ----" in out and "# ---- pass 2 'lint': no change ----" in out
    table = timings.table()
    assert "nodes before" in table and table.count("\n") == 3
    assert timings.rows[0][2] > timings.rows[0][3]  # dce removed nodes
