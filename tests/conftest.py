"""Shared fixtures: small Hugging Face models built from configs (random weights, no download)."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")


@pytest.fixture(scope="session")
def llama():
    from meshc.models import load_model

    return load_model("llama-tiny")


@pytest.fixture(scope="session")
def gpt2():
    from meshc.models import load_model

    return load_model("gpt2-tiny")


@pytest.fixture(scope="session")
def mlp():
    from meshc.models import load_model

    return load_model("mlp")


@pytest.fixture
def temp_pass():
    """Register passes for one test only: temp_pass(name, fn, preserves_semantics=True)."""
    from meshc.pipeline import all_passes, register_pass

    added = []

    def add(name, fn, preserves_semantics=True):
        register_pass(name, description=f"test pass {name}", preserves_semantics=preserves_semantics)(fn)
        added.append(name)
        return fn

    yield add
    for name in added:
        all_passes().pop(name)


def ids(batch: int, seq: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seq))
