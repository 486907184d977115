"""Model specs for the CLI and tests: built-in small models and user factories.

Entry point: `load_model(spec, batch=2, seq=16) -> LoadedModel`. A spec is a built-in name
(`llama-tiny`, `gpt2-tiny`, `mlp`, `reference-lm`, and the decoder families of `meshc.families`
such as `falcon-tiny`), `path/to/file.py:factory`, or
`package.module:factory`. A factory returns `(model, example_inputs)` or
`(model, example_inputs, example_kwargs)`. Built-ins are Hugging Face models from small configs
with random weights (seeded); nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from meshc.errors import MeshcError
from meshc.families import FAMILIES
from meshc.families import VOCAB as FAMILY_VOCAB


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: tuple
    example_kwargs: dict = field(default_factory=dict)
    make_inputs: Callable[[int, int], tuple] | None = None  # (batch, seq) -> example_inputs

    def inputs_at(self, batch: int, seq: int) -> tuple:
        """Example inputs of another size (built-ins only), e.g. for checking dynamic shapes."""
        if self.make_inputs is None:
            raise MeshcError("this model spec has no input generator; only built-in models can resize inputs")
        return self.make_inputs(batch, seq)


def _token_ids(vocab: int) -> Callable[[int, int], tuple]:
    def make(batch: int, seq: int) -> tuple:
        g = torch.Generator().manual_seed(1000 * batch + seq)
        return (torch.randint(0, vocab, (batch, seq), generator=g),)

    return make


def llama_tiny() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def gpt2_tiny() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=512, n_embd=128, n_layer=4, n_head=4, n_positions=512,
                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


class MLP(torch.nn.Module):
    """A plain 3-layer MLP (no transformers), for the simplest capture path."""

    def __init__(self, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.mid(torch.nn.functional.gelu(self.up(x)))))


def _mlp_inputs(batch: int, seq: int) -> tuple:
    return (torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(seq)),)


def _builtin(name: str) -> tuple[torch.nn.Module, Callable[[int, int], tuple], dict]:
    no_cache = {"use_cache": False}
    if name == "llama-tiny":
        return llama_tiny(), _token_ids(512), no_cache
    if name == "gpt2-tiny":
        return gpt2_tiny(), _token_ids(512), no_cache
    if name == "mlp":
        torch.manual_seed(0)
        return MLP().eval(), _mlp_inputs, {}
    if name == "reference-lm":
        from meshc.reference_lm import load_reference_lm

        return load_reference_lm(), _token_ids(256), no_cache
    if name in FAMILIES:
        return FAMILIES[name].build(), _token_ids(FAMILY_VOCAB), no_cache
    raise KeyError(name)


BUILTIN_MODELS = ("llama-tiny", "gpt2-tiny", "mlp", "reference-lm", *FAMILIES)


def load_model(spec: str, batch: int = 2, seq: int = 16) -> LoadedModel:
    try:
        return _resolve(spec, batch, seq)
    except ModuleNotFoundError as e:  # the Hugging Face models are an install extra
        if (e.name or "").partition(".")[0] != "transformers":
            raise
        raise MeshcError(f"model {spec!r} needs Hugging Face transformers, which is not installed: "
                         f"pip install 'meshc[hf]'") from e


def _resolve(spec: str, batch: int, seq: int) -> LoadedModel:
    if spec in BUILTIN_MODELS:
        model, make, kwargs = _builtin(spec)
        return LoadedModel(model, make(batch, seq), dict(kwargs), make)
    if ":" not in spec:
        raise MeshcError(f"cannot resolve model {spec!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), "
                         f"'path/to/file.py:factory' or 'package.module:factory'")
    where, _, attr = spec.rpartition(":")
    factory = getattr(_import(where, spec), attr, None)
    if not callable(factory):
        raise MeshcError(f"cannot resolve model {spec!r}: {where} has no callable {attr!r}")
    return _from_factory_result(spec, factory())


def _import(where: str, spec: str) -> Any:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise MeshcError(f"cannot resolve model {spec!r}: file {where} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise MeshcError(f"cannot resolve model {spec!r}: cannot import {where!r} ({e})") from e


def _from_factory_result(spec: str, result: Any) -> LoadedModel:
    if isinstance(result, torch.nn.Module):
        raise MeshcError(f"factory {spec!r} returned a module without example inputs; return "
                         f"(model, example_inputs) or (model, example_inputs, example_kwargs)")
    if not isinstance(result, tuple) or len(result) not in (2, 3) or not isinstance(result[0], torch.nn.Module):
        raise MeshcError(f"factory {spec!r} must return (model, example_inputs[, example_kwargs]); "
                         f"got {type(result).__name__}")
    model, inputs, *rest = result
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    return LoadedModel(model, inputs, dict(rest[0]) if rest else {})
