"""compile() on one device equals eager (fp32, max abs error <= 1e-6) on real model definitions."""

import meshc
import pytest
import torch
from meshc.errors import InputError, MeshError
from meshc.numerics import max_abs_error

from ..conftest import ids


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_decoder_two_lengths_one_compile(name, request):
    m = request.getfixturevalue(name)
    compiled = meshc.compile(m.model, example_inputs=(ids(2, 16),), example_kwargs={"use_cache": False})
    with torch.no_grad():
        for batch, seq in [(2, 16), (3, 37)]:
            x = ids(batch, seq)
            err, where, _ = max_abs_error(m.model(x, use_cache=False), compiled(x))
            assert err <= 1e-6, (batch, seq, where, err)


def test_hf_with_attention_mask_kwarg(llama):
    x = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    compiled = meshc.compile(llama.model, example_inputs=(x,),
                             example_kwargs={"attention_mask": mask, "use_cache": False})
    with torch.no_grad():
        ref = llama.model(x, attention_mask=mask, use_cache=False)
        out = compiled(input_ids=x, attention_mask=mask)  # keyword call of a positional capture
        x2, mask2 = ids(2, 20), torch.ones(2, 20, dtype=torch.long)
        out2 = compiled(x2, attention_mask=mask2, use_cache=False)
        ref2 = llama.model(x2, attention_mask=mask2, use_cache=False)
    assert max_abs_error(ref, out)[0] <= 1e-6
    assert max_abs_error(ref2, out2)[0] <= 1e-6


def test_plain_mlp(mlp):
    compiled = meshc.compile(mlp.model, example_inputs=mlp.example_inputs)
    for batch, seq in [(2, 16), (5, 3)]:
        x = mlp.inputs_at(batch, seq)[0]
        assert (compiled(x) - mlp.model(x)).abs().max() <= 1e-6
    assert isinstance(compiled, torch.nn.Module)
    assert compiled.program.history == ["dce", "propagate_shapes", "lint"]


def test_input_errors_name_the_input(llama):
    compiled = meshc.compile(llama.model, example_inputs=(ids(2, 16),), example_kwargs={"use_cache": False},
                             dynamic_shapes=None)
    with pytest.raises(InputError, match=r"args\[0\]: dim 1 was captured static with size 16, got 9"):
        compiled(ids(2, 9))
    with pytest.raises(InputError, match=r"args\[0\]: expected int64"):
        compiled(ids(2, 16).float())
    with pytest.raises(InputError, match="use_cache.*captured as the constant False"):
        compiled(ids(2, 16), use_cache=True)
    with pytest.raises(InputError, match=r"\['output_attentions'\] were not given at capture"):
        compiled(ids(2, 16), output_attentions=True)


@pytest.mark.parametrize("mesh", ["tp=2", "dp=2,tp=2"])
def test_multi_device_mesh_outside_a_launch_is_a_clear_error(mlp, mesh):
    with pytest.raises(MeshError, match="needs [24] processes. Run the compile inside meshc.launch"):
        meshc.compile(mlp.model, mesh, example_inputs=mlp.example_inputs)


def test_mesh_forms():
    from meshc.mesh import MeshSpec

    assert MeshSpec.parse("dp=2,tp=2") == MeshSpec(("dp", "tp"), (2, 2))
    assert MeshSpec.parse(None).size == 1
    assert str(MeshSpec.parse(" tp = 4 ")) == "tp=4"
    for bad, match in [("tp", "write NAME=SIZE"), ("tp=2,tp=2", "twice"), ("tp=0", "sizes must be >= 1")]:
        with pytest.raises(MeshError, match=match):
            MeshSpec.parse(bad)
    with pytest.raises(MeshError, match="DeviceMesh"):
        MeshSpec.parse(4)


def test_device_mesh_is_accepted(mlp, tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        compiled = meshc.compile(mlp.model, mesh, example_inputs=mlp.example_inputs)
        assert str(compiled.program.mesh) == "tp=1"
    finally:
        dist.destroy_process_group()


def test_one_device_mesh_runs(mlp):
    compiled = meshc.compile(mlp.model, "tp=1", example_inputs=mlp.example_inputs)
    x = mlp.example_inputs[0]
    assert (compiled(x) - mlp.model(x)).abs().max() <= 1e-6
