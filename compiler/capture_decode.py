"""Capture for decoding: a causal LM → a prefill Program and a decode Program whose KV cache is an
explicit, fixed-size graph input written in place.

Entry point: `capture_decode(model, max_batch_size, max_cache_len) -> DecodePrograms`.

* prefill(input_ids [B,S], attention_mask [B,S], cache) → logits of the last position [B,1,V];
  positions (from the mask, as Hugging Face's generate computes them) and the 4-D additive mask
  over the prompt are computed in the graph; the prompt's K/V land at cache positions 0..S-1 and
  attention reads those S positions only.
* decode(input_ids [B,T], position_ids [B,T], cache_position [T], attention_mask [B,1,T,P],
  cache) → logits [B,T,V]; T ≥ 1 new tokens per sequence (T > 1 and a tree mask for speculative
  verification), their K/V written at `cache_position` (< P). Attention reads only the first P
  cache positions, P ≤ max_cache_len taken from the mask's size, so a step costs what the filled
  prefix costs, not the whole cache (the runtime rounds P up to a few bucket sizes).

`cache` is a list [K0, V0, K1, V1, ...] of [B, kv_heads, max_cache_len, head_dim] tensors of the
model's dtype, marked `meshc_held` (batch dim 0, heads dim 1): the passes place it with
`meshc.plan.held_placements` and the runtime holds each rank's shard. The model runs on a
transformers `Cache` whose layers are those tensors; its `index_copy_` writes stay in the graph
as in-place ops on the cache placeholders (`capture(..., input_writes=True)`), so the runtime's
buffers keep their `data_ptr` and no step allocates a cache-sized tensor; attention reads a view
of the written cache's first P (prefill: S) positions along the sequence dim. Batch, prompt
length, T and P are dynamic; max_cache_len is static.

It never runs the model outside capture (one eager probe for the K/V shapes aside), holds no
per-family code, and builds no runtime state: the runtime owns the buffers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from meshc.capture import capture
from meshc.errors import CaptureError
from meshc.program import Program
from torch.export import Dim

EXAMPLE_BATCH, EXAMPLE_PROMPT, EXAMPLE_T = 2, 5, 2  # > 1, so torch.export keeps them symbolic


@dataclass(frozen=True)
class CacheLayout:
    """What the cache is: per layer the K and V shape after the batch dim, the dtype, the limits."""

    kv_shapes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # ((H, L, Dk), (H, L, Dv)) per layer
    dtype: torch.dtype
    device: torch.device
    max_batch_size: int
    max_cache_len: int

    def allocate(self, batch: int | None = None) -> list[torch.Tensor]:
        """Zeroed cache tensors [K0, V0, K1, V1, ...] of batch `batch` (default max_batch_size)."""
        b = self.max_batch_size if batch is None else batch
        return [torch.zeros(b, *shape, dtype=self.dtype, device=self.device)
                for pair in self.kv_shapes for shape in pair]


@dataclass
class DecodePrograms:
    prefill: Program
    decode: Program
    layout: CacheLayout


def capture_decode(model: torch.nn.Module, max_batch_size: int, max_cache_len: int) -> DecodePrograms:
    """Capture `model` (a Hugging Face-style causal LM taking `cache=`/`past_key_values=`) twice:
    the prefill and the decode step, the cache sized `max_batch_size` x `max_cache_len`."""
    layout = probe_layout(model, max_batch_size, max_cache_len)
    dev, ex = layout.device, layout.allocate(EXAMPLE_BATCH)
    ids = torch.ones(EXAMPLE_BATCH, EXAMPLE_PROMPT, dtype=torch.long, device=dev)
    mask = torch.ones_like(ids)
    cache_dims = [{0: Dim.AUTO}] * len(ex)
    auto2 = {0: Dim.AUTO, 1: Dim.AUTO}
    prefill = _capture_step(model, "prefill", _Prefill(model, layout), (ids, mask, ex),
                            {"input_ids": auto2, "attention_mask": auto2, "cache": cache_dims})
    t = EXAMPLE_T
    ids = torch.ones(EXAMPLE_BATCH, t, dtype=torch.long, device=dev)
    pos = torch.arange(t, device=dev).expand(EXAMPLE_BATCH, t).contiguous()
    bias = torch.zeros(EXAMPLE_BATCH, 1, t, _example_read(max_cache_len), dtype=layout.dtype, device=dev)
    inputs = (ids, pos, torch.arange(t, device=dev), bias, layout.allocate(EXAMPLE_BATCH))
    decode = _capture_step(model, "decode", _Decode(model, layout), inputs,
                           {"input_ids": auto2, "position_ids": auto2, "cache_position": {0: Dim.AUTO},
                            "attention_mask": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}, "cache": cache_dims})
    for p in (prefill, decode):
        p.model_name = type(model).__name__
        for node in p.placeholders("user")[-len(ex):]:  # the cache: held by the runtime, written in place
            node.meta["meshc_held"] = (0, 1)  # [batch, heads, max_cache_len, head_dim]
        _batch_from_ids(p)
        for node in p.placeholders("user"):
            if node.meta["meshc_name"] == "args[2]" and p is decode:  # cache_position [T]
                node.meta["meshc_unbatched"] = True
        for node in p.placeholders():  # the model's own parameter names, not the wrapper's
            if node.meta["meshc_input"] != "user":
                node.meta["meshc_name"] = node.meta["meshc_name"].removeprefix("model.")
            elif node.meta["val"].is_leaf and node.meta["val"].requires_grad:
                node.meta["val"].requires_grad_(False)  # tracing the writes marked the cache as needing grad
    return DecodePrograms(prefill, decode, layout)


def _batch_from_ids(program: Program) -> None:
    """torch.export may read the batch size from any input that has it, a cache tensor too; read it
    from input_ids instead, so each cache tensor's only reader is its layer's write (a pp stage then
    never reads another stage's layers' cache)."""
    ids = program.placeholders("user")[0]
    for node in program.graph.nodes:
        if node.target is torch.ops.aten.sym_size.int and "meshc_held" in node.args[0].meta and node.args[1] == 0:
            node.args = (ids, 0)  # the cache's other dims are static
    program.gm.recompile()


def _example_read(max_cache_len: int) -> int:
    """The example P: below max_cache_len (so the read stays a symbolic slice of the cache, not the
    whole of it) and unlike the other example sizes (so torch.export gives it its own symbol)."""
    taken = {0, 1, EXAMPLE_BATCH, EXAMPLE_PROMPT, EXAMPLE_T, max_cache_len}
    return next((p for p in range(max_cache_len - 1, 1, -1) if p not in taken), max_cache_len)


def _capture_step(model: torch.nn.Module, step: str, wrapper: torch.nn.Module, inputs: tuple,
                  dynamic_shapes: dict) -> Program:
    """Capture one generation step; a model that cannot run on a static cache with a 4-D mask is a
    CaptureError naming the model, the step and the cause (never a bare traceback from inside it)."""
    try:
        return capture(wrapper, inputs, input_writes=True, dynamic_shapes=dynamic_shapes)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with what it means for the user
        raise CaptureError(
            f"cannot capture the {step} step of {type(model).__name__} for generation: {type(e).__name__}: {e}. "
            f"meshc decodes with a static cache and a 4-D attention mask over it; models that build their own "
            f"position bias from a 2-D mask (e.g. Bloom's ALiBi) are not supported yet. Compile without "
            f"max_cache_len to get the forward only.") from e


def probe_layout(model: torch.nn.Module, max_batch_size: int, max_cache_len: int) -> CacheLayout:
    """Run the model once on one token with its own cache to learn each layer's K/V shape."""
    param = next(model.parameters())
    with torch.no_grad():
        out = model(torch.zeros(1, 1, dtype=torch.long, device=param.device), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise CaptureError(
            f"{type(model).__name__} returned no per-layer KV cache from forward(ids, use_cache=True); "
            f"meshc generates with Hugging Face-style causal LMs whose forward returns a transformers "
            f"Cache. Compile without max_cache_len to get the forward only.")
    shapes = tuple(((layer.keys.shape[1], max_cache_len, layer.keys.shape[-1]),
                    (layer.values.shape[1], max_cache_len, layer.values.shape[-1])) for layer in layers)
    return CacheLayout(shapes, layers[0].keys.dtype, param.device, max_batch_size, max_cache_len)


def _cache_of(tensors: list[torch.Tensor], write_at: torch.Tensor, read: int):
    """A transformers Cache over the cache inputs that writes the new K/V at `write_at` and gives
    attention the first `read` positions (a view; `read` is symbolic in the graph)."""
    from transformers import Cache
    from transformers.cache_utils import StaticLayer

    class InputLayer(StaticLayer):
        """A static layer over graph inputs: writes the new K/V at `write_at`, returns the first `read`."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values, self.is_initialized = keys, values, True
            self.device, self.batch_size, self.num_heads = keys.device, keys.shape[0], keys.shape[1]
            self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, write_at, key_states)
            self.values.index_copy_(2, write_at, value_states)
            return self.keys[:, :, :read], self.values[:, :, :read]

        def get_seq_length(self) -> int:
            return 0

    return Cache(layers=[InputLayer(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)])


class _Step(torch.nn.Module):
    """The model with its cache as inputs; subclasses say how positions and masks arrive."""

    def __init__(self, model: torch.nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" in params

    def run(self, input_ids, position_ids, write_at, bias, cache, last_only: bool):
        extra = {"logits_to_keep": 1} if last_only and self.keep_kw else {}
        read = bias.shape[-1]  # the mask spans the cache positions attention reads
        bias = self.per_layer_type(bias, write_at)
        out = self.model(input_ids=input_ids, attention_mask=bias, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: _cache_of(cache, write_at, read)}, **extra)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:] if last_only and not extra else logits

    def per_layer_type(self, bias: torch.Tensor, write_at: torch.Tensor):
        """A model with sliding-window layers (config.layer_types) takes a mask per layer type, as
        Hugging Face's own mask mapping: the sliding one also hides keys `sliding_window` or more
        cache positions behind the query."""
        config = getattr(self.model, "config", None)
        window = getattr(config, "sliding_window", None)
        if not window or "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
            return bias
        key = torch.arange(bias.shape[-1], device=bias.device)
        near = key[None, None, None, :] > write_at[None, None, :, None] - window
        return {"full_attention": bias, "sliding_attention": torch.where(near, bias, torch.finfo(bias.dtype).min)}


class _Prefill(_Step):
    def forward(self, input_ids, attention_mask, cache):
        s = input_ids.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        query = torch.arange(s, device=input_ids.device)  # = the keys: attention reads cache positions 0..S-1
        allowed = (query[None, :] <= query[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        dtype = cache[0].dtype
        bias = torch.where(allowed, torch.zeros((), dtype=dtype, device=input_ids.device),
                           torch.full((), torch.finfo(dtype).min, dtype=dtype, device=input_ids.device))
        return self.run(input_ids, position_ids, query, bias, cache, last_only=True)


class _Decode(_Step):
    def forward(self, input_ids, position_ids, cache_position, attention_mask, cache):
        return self.run(input_ids, position_ids, cache_position, attention_mask, cache, last_only=False)
