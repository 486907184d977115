"""What a user meets first: parse errors as one `meshc: error:` line (exit status 2), a missing
install extra named, replay commands that name the model and mesh, failing ranks reported once."""

import re
import sys

import meshc
import pytest
from meshc import cli
from meshc.errors import MeshcError, MeshError, PassError, SpecError


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("meshc: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["explain", "llama-tiny", "--mesh", "tp=2", "--preset", "typo"], "unknown device preset 'typo'"),
    (["explain", "mlp", "--mesh", "tp=2", "--preset", "h100-nvlnk"], "did you mean 'h100-nvlink'"),
    (["compile", "mlp", "--mesh", "tp=two"], "cannot parse mesh dim 'tp=two'"),
    (["run", "mlp", "--mesh", "tp=2,tp=2"], "names dim 'tp' twice"),
    (["compile", "no-such-model"], "cannot resolve model 'no-such-model'"),
    (["run", "mlp", "--mesh", "tp=2", "--plan", "megatrn"], "unknown plan 'megatrn' (did you mean 'megatron'?)"),
])
def test_parse_errors_are_one_line_with_status_2(argv, match, capsys):
    assert cli.main(argv) == 2
    assert match in one_error_line(capsys)


@pytest.mark.parametrize("text", ["S(x)", "IS(1)", "Shard(0)", "Q"])
def test_a_bad_placement_is_a_meshc_error_naming_the_forms(text):
    from meshc.placement import parse_placement

    with pytest.raises(SpecError, match=rf"cannot parse placement '{re.escape(text)}'.*R, P, S\(d\) or IS\(d,groups\)"):
        parse_placement(text)


@pytest.fixture(scope="module")
def mlp_on_tp2(request):
    mlp = request.getfixturevalue("mlp")
    return meshc.capture(mlp.model, mlp.example_inputs, dynamic_shapes="auto", mesh="tp=2")


def test_a_bad_placement_in_a_plan_or_a_pin_is_a_meshc_error(mlp_on_tp2):
    from meshc.passes.auto_shard import solve_sharding
    from meshc.plan import make_plan

    with pytest.raises(SpecError, match="cannot parse placement 'S0'"):
        make_plan({"up.weight": "S0"}, mlp_on_tp2, mlp_on_tp2.mesh)
    with pytest.raises(SpecError, match="cannot parse placement 'col'"):
        solve_sharding(mlp_on_tp2, None, pin={"up.weight": "col"})


def test_a_real_bug_still_shows_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_passes", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["passes"])


def test_missing_transformers_names_the_install_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as after `pip install .` without [hf]
    assert cli.main(["compile", "llama-tiny"]) == 2
    assert "model 'llama-tiny' needs Hugging Face transformers" in one_error_line(capsys)
    assert cli.main(["compile", "mlp"]) == 0  # the plain-PyTorch built-in needs no extra


def test_a_failed_pass_replays_with_the_model_spec_the_user_typed_and_its_mesh(capsys):
    assert cli.main(["compile", "mlp", "--mesh", "tp=2", "--pipeline", "dce,auto_shard(preset=typo),lint"]) == 2
    err = capsys.readouterr().err
    assert "unknown device preset 'typo'" in err and "Traceback" not in err
    assert ("Replay with: meshc compile mlp --mesh tp=2 --pipeline 'dce,auto_shard(preset=typo)' "
            "--print-after-change") in err


def test_a_failed_pass_replays_with_the_programs_model_without_the_cli(mlp_on_tp2, temp_pass):
    def boom(program):
        raise RuntimeError("boom")

    temp_pass("boom", boom)
    with pytest.raises(PassError) as err:
        meshc.PassManager("dce,boom").run(mlp_on_tp2)
    assert "Replay with: meshc compile MLP --mesh tp=2 --pipeline 'dce,boom'" in str(err.value)
    assert "meshc compile my_model.py:make --mesh" in str(err.value.replay_for("my_model.py:make"))
    megatron = mlp_on_tp2.clone()
    megatron.plan = "megatron"
    with pytest.raises(PassError, match="meshc compile MLP --mesh tp=2 --plan megatron --pipeline 'boom'"):
        meshc.PassManager("boom").run(megatron)


def test_needing_processes_names_the_model_when_known(monkeypatch):
    from meshc.mesh import MeshSpec
    from meshc.runtime.mesh import device_mesh_for

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MeshError, match="`meshc run llama-tiny --mesh tp=2`"):
        device_mesh_for(MeshSpec.parse("tp=2"), model="llama-tiny")
    with pytest.raises(MeshError, match="`meshc run MODEL --mesh tp=2`"):
        device_mesh_for(MeshSpec.parse("tp=2"))


@pytest.mark.timeout(180)
def test_a_failing_rank_under_meshc_run_prints_its_root_cause_once(tmp_path, capsys):
    f = tmp_path / "buggy.py"
    f.write_text("def make():\n    sizes = {}\n    return sizes['hidden']\n")
    assert cli.main(["run", f"{f}:make", "--mesh", "tp=2", "--timeout", "60"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshc: error: mesh 'tp=2' failed: rank 0 raised KeyError: 'hidden'"), err
    assert f"at {f}:3 in make: return sizes['hidden']" in err  # the user's line, not meshc's
    assert "(rank 1 failed the same way)" in err and "Traceback" not in err and err.count("KeyError") == 1
    assert "(MESHC_TRACEBACK=1 prints rank 0's full traceback)" in err


def test_spec_errors_are_value_errors_too():
    assert issubclass(SpecError, MeshcError) and issubclass(SpecError, ValueError)
