"""Non-persistent buffers of a model built on 'meta' are recomputed at capture by the model's own
initialiser; buffers no initialiser writes stay on 'meta' (and load_checkpoint names them)."""

import pytest
import torch
from meshc.meta_buffers import rebuild_meta_buffers


class Rotary(torch.nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.register_buffer("unset", torch.empty(3), persistent=False)  # nobody initialises it
        self.register_buffer("saved", torch.empty(2))  # persistent: a checkpoint holds it
        self.reset_parameters()

    def reset_parameters(self):
        self.inv_freq.copy_(1.0 / 10000 ** (torch.arange(0, self.dim, 2).float() / self.dim))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rope = Rotary()
        self.proj = torch.nn.Linear(4, 4)


def _state(model):
    fqns = {f"b{i}": name for i, (name, _) in enumerate(model.named_buffers())}
    return {ph: model.get_buffer(fqn) for ph, fqn in fqns.items()}, fqns


def test_reset_parameters_rebuilds_what_it_writes_and_nothing_else():
    with torch.device("meta"):
        model = Net()
    state, fqns = _state(model)
    failed = rebuild_meta_buffers(model, state, fqns)
    by_fqn = {fqns[ph]: t for ph, t in state.items()}
    assert failed == ["rope.unset"]
    torch.testing.assert_close(by_fqn["rope.inv_freq"], Rotary().inv_freq)
    assert by_fqn["rope.unset"].is_meta and by_fqn["rope.saved"].is_meta  # the checkpoint's job
    assert model.rope.inv_freq.is_meta  # the model itself is untouched


@pytest.mark.timeout(120)
def test_hugging_face_init_weights_rebuilds_rotary_and_embedding_scale():
    from meshc.families import FAMILIES

    real = FAMILIES["gemma-tiny"].build()
    with torch.device("meta"):
        model = type(real)(real.config)
    state, fqns = _state(model)
    assert rebuild_meta_buffers(model, state, fqns) == []
    for ph, t in state.items():
        torch.testing.assert_close(t, real.get_buffer(fqns[ph]), msg=fqns[ph])
