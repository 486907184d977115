"""Analytic latency of a tensor-parallel decoder forward, standard vs ladder residual.

Entry points: `DecoderShape` (with `LLAMA_3_70B`, `LLAMA_3_8B`), `sublayer_costs(...)`,
`predict_ladder_speedup(shape, tp, batch, seq, preset, context=None) -> dict`.

Each sub-layer (attention, MLP) costs compute (roofline over its weight shard, its KV-cache
reads and its FLOPs, `cost_model.compute_time`, plus KERNELS_PER_SUBLAYER x the preset's
per-kernel `dispatch_overhead`) plus one all-reduce of the B·S·H activations
(`cost_model.all_reduce_time`). Standard TP serialises them: Σ (c_k + a_k). With ladder
residual, the all-reduce of sub-layer k runs under sub-layer k+1's compute:
Σ c_k + Σ_k max(0, a_k − c_{k+1}) + a_last. Embedding and lm_head are left out of both, as
they are the same in both. All formulas come from `cost_model`; nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshc.cost_model import DevicePreset, all_reduce_time, compute_time, get_preset


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    dtype_bytes: int = 2  # bf16

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


#: kernels one sub-layer launches in a fused (torch.compile) decode step: norm, projection(s),
#: rotary/cache update or activation, attention or second projection, residual add. Each costs the
#: preset's `dispatch_overhead` besides its roofline (kernel launch + minimum kernel time).
KERNELS_PER_SUBLAYER = 5

LLAMA_3_70B = DecoderShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8)
LLAMA_3_8B = DecoderShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8)


def sublayer_costs(shape: DecoderShape, tp: int, batch: int, seq: int, preset: DevicePreset | str,
                   context: int | None = None) -> list[tuple[float, float]]:
    """(compute seconds, all-reduce seconds) per sub-layer, on one rank of a `tp`-way group.

    `seq` tokens are processed per sequence (1 = decode) attending to `context` tokens (default
    `seq`: prefill)."""
    p = get_preset(preset)
    ctx = seq if context is None else context
    tokens, h, d, b = batch * seq, shape.hidden, shape.head_dim, shape.dtype_bytes
    attn_params = (2 * h * h + 2 * h * shape.kv_heads * d) / tp
    mlp_params = 3 * h * shape.intermediate / tp
    act = tokens * h * b  # one activation tensor
    kv_bytes = 2 * batch * ctx * shape.kv_heads * d * b / tp
    attn_flops = 2 * tokens * attn_params + 4 * batch * (shape.heads / tp) * seq * ctx * d
    launches = KERNELS_PER_SUBLAYER * p.dispatch_overhead  # 0 for presets without a per-kernel figure
    attn = compute_time(attn_flops, attn_params * b + kv_bytes + 4 * act, p) + launches
    mlp = compute_time(2 * tokens * mlp_params, mlp_params * b + 4 * act, p) + launches
    ar = all_reduce_time(act, tp, p)
    return [(attn, ar), (mlp, ar)] * shape.layers


def predict_ladder_speedup(shape: DecoderShape, tp: int, batch: int, seq: int, preset: DevicePreset | str,
                           context: int | None = None) -> dict:
    costs = sublayer_costs(shape, tp, batch, seq, preset, context)
    standard = sum(c + a for c, a in costs)
    exposed = sum(max(0.0, costs[k][1] - costs[k + 1][0]) for k in range(len(costs) - 1)) + costs[-1][1]
    ladder = sum(c for c, _ in costs) + exposed
    return {"standard_ms": standard * 1e3, "ladder_ms": ladder * 1e3, "speedup": standard / ladder,
            "compute_ms": sum(c for c, _ in costs) * 1e3, "allreduce_ms": sum(a for _, a in costs) * 1e3,
            "tp": tp, "batch": batch, "seq": seq, "context": seq if context is None else context,
            "preset": get_preset(preset).name}
