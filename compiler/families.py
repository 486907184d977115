"""The decoder families meshc is tested on: tiny Hugging Face `transformers` models whose
attention, positions, norms, residual wiring and MLPs differ from Llama's and GPT-2's.

Entry points: `FAMILIES` (name -> `Family`: a builder returning the seeded, eval-mode model and a
one-line note of what it exercises) and `build(name)`. Every family is also a built-in model name of
`meshc.models.load_model` (`meshc run falcon-tiny --mesh tp=2`). Configs are tiny (hidden 64, 2
layers, 4 heads, vocab 256) so a forward takes milliseconds; nothing is downloaded. Heads, KV heads
and widths are even wherever the family allows, so tp=2 can shard them; falcon-tiny keeps its single
KV head (multi-query) by design. The order matters to the tests: mesh i of the family matrix runs
families 3i..3i+2 by default (tp=2, pp=2, dp=2,tp=2), so the cheapest go to the four-rank mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VOCAB = 256
_DIMS = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_LLAMA_LIKE = {**_DIMS, "intermediate_size": 128, "num_key_value_heads": 2, "max_position_embeddings": 128,
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    note: str


def _seeded(config_cls: str, model_cls: str, **config) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(cfg).eval()

    return build


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("falcon-tiny", _seeded("FalconConfig", "FalconForCausalLM", **_DIMS, multi_query=True, parallel_attn=True,
                                  new_decoder_architecture=False, alibi=False, bias=False, bos_token_id=1,
                                  eos_token_id=2),
           "multi-query attention (1 KV head); attention and MLP in parallel off one LayerNorm; rotary"),
    Family("olmo2-tiny", _seeded("Olmo2Config", "Olmo2ForCausalLM", **_LLAMA_LIKE),
           "post-norm: RMSNorm on each sub-layer's output before the residual add; q/k RMSNorm"),
    Family("gemma-tiny", _seeded("GemmaConfig", "GemmaForCausalLM", **_LLAMA_LIKE, head_dim=16),
           "embedding scaled by a buffer; (1 + w) RMSNorm; GeGLU MLP; tied lm_head"),
    Family("opt-tiny", _seeded("OPTConfig", "OPTForCausalLM", **_DIMS, ffn_dim=128, max_position_embeddings=128,
                               word_embed_proj_dim=64, do_layer_norm_before=True, bos_token_id=1, eos_token_id=2,
                               pad_token_id=0),
           "learned positions computed from the attention mask (cumsum); ReLU MLP with biases"),
    Family("gptj-tiny", _seeded("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                n_inner=128, rotary_dim=8, n_positions=128, bos_token_id=1, eos_token_id=2),
           "interleaved (rotate-every-two) partial rotary from a sinusoid buffer; parallel attention+MLP"),
    Family("qwen2-tiny", _seeded("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE, use_sliding_window=True,
                                 sliding_window=4, max_window_layers=1),
           "q/k/v biases; sliding-window attention (window 4) on the second layer, full on the first"),
    Family("bloom-tiny", _seeded("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=64, n_layer=2,
                                 n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
           "ALiBi position bias (baddbmm on symbolic sizes); fused per-head query_key_value; embedding LayerNorm"),
    Family("gptneox-tiny", _seeded("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DIMS, intermediate_size=128,
                                   max_position_embeddings=128, use_parallel_residual=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.25},
                                   bos_token_id=1, eos_token_id=2),
           "parallel residual (two LayerNorms, one add per layer); partial rotary (25%); fused per-head qkv"),
    Family("phi3-tiny", _seeded("Phi3Config", "Phi3ForCausalLM", **_LLAMA_LIKE),
           "fused projections: qkv_proj (GQA) and gate_up_proj split in forward; RMSNorm"),
]}


def build(name: str) -> torch.nn.Module:
    """The seeded, eval-mode model of family `name`."""
    return FAMILIES[name].build()
