import pytest
from meshc.errors import PipelineError
from meshc.pipeline import all_passes, parse_pipeline


def test_every_pass_declares_description_and_semantics():
    for p in all_passes().values():
        assert p.description and isinstance(p.preserves_semantics, bool)
    assert {"dce", "propagate_shapes", "lint"} <= set(all_passes())


def test_parse_with_options(temp_pass):
    def opt(program, *, layers: str = "all", delay: int = 1, scale: float = 1.0, on: bool = False):
        return program

    temp_pass("opt", opt)
    calls = parse_pipeline(" dce , opt(layers=last:4, delay=0,scale=0.5,on=true),lint")
    assert [c.name for c in calls] == ["dce", "opt", "lint"]
    assert calls[1].options == {"layers": "last:4", "delay": 0, "scale": 0.5, "on": True}
    assert str(calls[1]) == "opt(layers=last:4,delay=0,scale=0.5,on=True)"


@pytest.mark.parametrize("text, match", [
    ("dce,nope", r"unknown pass 'nope'.*Valid passes: .*dce.*lint"),
    ("dce(x=1)", r"pass 'dce' has no option 'x'; its options: none"),
    ("dce,,lint", "cannot parse pipeline"),
    ("dce(", "cannot parse pipeline"),
])
def test_bad_pipelines_fail_before_running(text, match):
    with pytest.raises(PipelineError, match=match):
        parse_pipeline(text)


def test_option_type_errors(temp_pass):
    temp_pass("typed", lambda program, *, delay=0: program)
    temp_pass("typed2", _typed2)
    with pytest.raises(PipelineError, match="delay='x' is not a valid int"):
        parse_pipeline("typed2(delay=x)")
    with pytest.raises(PipelineError, match="needs a value"):
        parse_pipeline("typed2(delay)")


def _typed2(program, *, delay: int = 0):
    return program
