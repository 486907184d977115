"""Generation: the decode loop over a compiled prefill Program and decode Program.

Entry points: `Decoder(programs, backend, defaults)` (built by `meshc.compile(..., max_cache_len=...)`;
lowers both Programs, owns the cache buffers) and `Decoder.generate(input_ids, ...)`, which
`CompiledModel.generate` calls with Hugging Face's names: `attention_mask` (left padding),
`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`, `pad_token_id`,
`streamer` (`put(tensor)`, `end()`). Returns prompt + new tokens, like `model.generate`.

The cache is allocated once per Decoder ([max_batch, kv_heads, max_cache_len, head_dim] per layer
and K/V); each call feeds views of its first B rows, and the graphs write them in place, so the
buffers' `data_ptr` never changes and a step allocates nothing cache-sized. Positions and the
additive attention mask over the cache are kept here (one [B, 1, 1, L] mask per call; a step
unmasks one column). A step passes the mask's first P columns, P = `read_length(filled, L)`: the
filled length rounded up to a power of two (at least MIN_READ, at most L). The decode Program
attends over those P cache positions only, so a short generation does not pay for the whole cache,
and the graph sees a few distinct sizes (log2(L / MIN_READ) + 1 of them).

The loop runs under `torch.inference_mode` (pipeline stages: `no_grad`), and does per step only
what a step needs: at batch 1 on a CPU the step is small enough that Python per token shows.

It never builds or rewrites a graph, and never calls the original model: only the lowered Programs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from meshc.errors import InputError, MeshcError

#: Hugging Face generate options meshc does not implement, with the value that means "off".
UNSUPPORTED = {"num_beams": 1, "num_beam_groups": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "num_return_sequences": 1, "length_penalty": 1.0, "min_new_tokens": 0, "min_length": 0,
               "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "penalty_alpha": None,
               "logits_processor": None, "stopping_criteria": None, "prefix_allowed_tokens_fn": None,
               "bad_words_ids": None, "force_words_ids": None, "assistant_model": None,
               "output_scores": False, "output_logits": False, "return_dict_in_generate": False}
IGNORED = {"use_cache", "generation_config"}  # accepted: a compiled decoder always uses its cache
MIN_READ = 16  # the smallest number of cache positions a decode step attends over


def read_length(filled: int, max_cache_len: int) -> int:
    """How many cache positions a decode step reads when the first `filled` are in use: the next
    power of two >= filled (and >= MIN_READ), at most max_cache_len."""
    return min(max_cache_len, max(MIN_READ, 1 << (filled - 1).bit_length()))


@dataclass
class GenerationStats:
    """What the last `generate` call measured (the CLI prints it)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Decoder:
    programs: Any  # meshc.capture_decode.DecodePrograms
    backend: str = "auto"
    defaults: dict = field(default_factory=dict)  # eos_token_id / pad_token_id of the model
    runners: dict = field(default_factory=dict)  # on a pp mesh: name -> PipelineModel running that Program

    def __post_init__(self) -> None:
        self.layout = self.programs.layout
        self.rebind()
        self.stats = GenerationStats()

    def rebind(self) -> None:
        """Lower both Programs (again after `meshc.load_checkpoint` changed their state) and
        allocate this rank's cache."""
        from meshc.backends import lower

        if self.runners:  # pipeline stages: each runner lowered its local stages
            for r in self.runners.values():
                r.rebind()
            self._prefill, self._decode = self.runners["prefill"].run_flat, self.runners["decode"].run_flat
            self.backend = self.runners["prefill"].backend
            local = _cache_read(self.runners, self.programs)
        else:
            prefill, self.backend = lower(self.programs.prefill, self.backend)
            decode, _ = lower(self.programs.decode, self.backend)
            self._prefill, self._decode = (lambda flat: prefill(flat)[0]), (lambda flat: decode(flat)[0])
            local = None
        self.cache, self.batch_split = _local_cache(self.programs, local)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, eos_token_id: Any = None,
                 pad_token_id: int | None = None, streamer: Any = None, **options: Any) -> torch.Tensor:
        _check_options(options)
        batch, prompt = self._check_inputs(input_ids, attention_mask, max_new_tokens)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        eos = self.defaults.get("eos_token_id") if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else self.defaults.get("pad_token_id")
        pad = int(eos[0]) if pad is None and len(eos) else (pad or 0)
        choose = _sampler(temperature, top_k, top_p) if do_sample else _greedy
        if streamer is not None:
            streamer.put(input_ids.cpu())
        cache = [c[:batch // self.batch_split] for c in self.cache]  # views: the graphs write them in place
        length = self.layout.max_cache_len
        minimum = torch.finfo(self.layout.dtype).min
        bias = torch.full((batch, 1, 1, length), minimum, dtype=self.layout.dtype, device=input_ids.device)
        bias[:, 0, 0, :prompt].masked_fill_(mask.bool(), 0.0)
        position = mask.sum(-1, keepdim=True)  # the next token's position per sequence
        out = [input_ids]
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        at_positions = torch.arange(length, device=input_ids.device)  # cache_position of each step: a view
        t0 = time.perf_counter()
        # inference_mode: no autograd bookkeeping per op (views cost less); what leaves the loop is
        # copied by cat. Pipeline stages keep no_grad: their runtime is shared with training.
        with torch.no_grad() if self.runners else torch.inference_mode():
            logits = self._prefill([input_ids, mask, *cache])
            for step in range(max_new_tokens):
                token = choose(logits[:, -1, :])
                if len(eos):  # without eos every sequence runs to max_new_tokens
                    token = torch.where(unfinished, token, pad)
                token = token[:, None]
                out.append(token)
                if streamer is not None:
                    streamer.put(token[:, 0].cpu())
                if step == 0:
                    t1 = time.perf_counter()
                if len(eos):
                    unfinished &= ~torch.isin(token[:, 0], eos)
                    if not bool(unfinished.any()):
                        break
                if step == max_new_tokens - 1:
                    break
                at = prompt + step
                bias[..., at] = 0.0
                logits = self._decode([token, position, at_positions[at:at + 1],
                                       bias[..., :read_length(at + 1, length)], *cache])
                position = position + 1
        t2 = time.perf_counter()
        if streamer is not None:
            streamer.end()
        self.stats = GenerationStats(prompt, len(out) - 1, t1 - t0, t2 - t1, len(out) - 2)
        return torch.cat(out, dim=1)

    def _check_inputs(self, input_ids: Any, attention_mask: Any, max_new_tokens: int) -> tuple[int, int]:
        layout = self.layout
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InputError(f"generate takes token ids of shape [batch, prompt_len] (integer dtype); got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        batch, prompt = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, prompt):
            raise InputError(f"attention_mask must have the shape of input_ids {[batch, prompt]}; "
                             f"got {list(attention_mask.shape)}")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if batch % self.batch_split:
            raise InputError(f"batch {batch} does not divide over the mesh's data-parallel size "
                             f"{self.batch_split} (mesh '{self.programs.prefill.mesh}'), which splits the batch "
                             f"and its KV cache; pass a batch that is a multiple of {self.batch_split}")
        if batch > layout.max_batch_size:
            raise InputError(f"batch {batch} is past max_batch_size={layout.max_batch_size}, the cache's batch; "
                             f"split the batch or compile with max_batch_size={batch}")
        if prompt + max_new_tokens > layout.max_cache_len:
            raise InputError(f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{prompt + max_new_tokens} is past max_cache_len={layout.max_cache_len}; "
                             f"shorten the prompt or max_new_tokens, or compile with "
                             f"max_cache_len={prompt + max_new_tokens} or more")
        return batch, prompt


class Generates:
    """`generate()` for the compiled models (CompiledModel, PipelineModel): set `self.decoder`."""

    decoder: Decoder | None = None  # a Decoder when compiled with max_cache_len=... (or generate=True)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **options: Any) -> torch.Tensor:
        """Prompt + new tokens, like Hugging Face's `model.generate` (greedy, or `do_sample=True`
        with temperature/top_k/top_p), from the compiled prefill and decode Programs and their KV cache."""
        if self.decoder is None:
            raise MeshcError(f"{self.program.model_name} was compiled without a KV cache, so it cannot "
                             f"generate; compile with meshc.compile(..., max_cache_len=N) (or generate=True)")
        if options.get("speculative"):  # Medusa tree decoding (issue 14): meshc.runtime.speculative
            from meshc.runtime.speculative import speculative_generate

            return speculative_generate(self.decoder, input_ids, attention_mask, **options)
        options.pop("speculative", None)
        return self.decoder.generate(input_ids, attention_mask, **options)


def _cache_read(runners: dict, programs: Any) -> list[bool]:
    """Per cache tensor: does one of this rank's pipeline stages read it (in both Programs alike)?"""
    reads = []
    for name in ("prefill", "decode"):
        read = runners[name].user_inputs_read()
        held = [i for i, n in enumerate(getattr(programs, name).placeholders("user")) if "meshc_held" in n.meta]
        reads.append([i in read for i in held])
    if reads[0] != reads[1]:
        raise MeshcError(f"pipeline_partition put the layers of the prefill and decode Programs on different "
                         f"stages (cache tensors read here: prefill {reads[0]}, decode {reads[1]}), so one rank "
                         f"cannot hold a layer's cache for both; compile with a pp size that divides the layers")
    return reads[0]


def _local_cache(programs: Any, local: list[bool] | None = None) -> tuple[list[torch.Tensor], int]:
    """This rank's cache buffers (each layer's K and V of max_batch_size, in the placement the
    passes gave the held inputs: heads split over tp, batch over dp; on a pp mesh only the layers
    of this rank's stages, the others a zero-stride stand-in) and how many ranks split the batch."""
    from meshc.placement import Shard, describe, local_shape

    layout, mesh = programs.layout, programs.prefill.mesh
    held = [[n.meta.get("meshc_placement") for n in p.placeholders("user") if "meshc_held" in n.meta]
            for p in (programs.prefill, programs.decode)]
    if [[describe(x) for x in pls or ()] for pls in held[0]] != [[describe(x) for x in pls or ()] for pls in held[1]]:
        raise MeshcError(f"the prefill and decode Programs place the KV cache differently ({held[0]} vs "
                         f"{held[1]}); both must follow meshc.plan.held_placements")
    pls = held[0][0] or ()
    split = 1
    for p, n in zip(pls, mesh.sizes):
        split *= n if isinstance(p, Shard) and p.dim == 0 else 1
    if layout.max_batch_size % split:
        raise MeshcError(f"max_batch_size={layout.max_batch_size} does not divide over the data-parallel size "
                         f"{split} of mesh '{mesh}'; compile with a max_batch_size that is a multiple of {split}")
    shapes = [(layout.max_batch_size, *shape) for pair in layout.kv_shapes for shape in pair]
    cache = []
    for i, (shape, p) in enumerate(zip(shapes, held[0])):
        shape = local_shape(shape, p, mesh.sizes) if p else list(shape)
        if local is None or local[i]:
            cache.append(torch.zeros(shape, dtype=layout.dtype, device=layout.device))
        else:  # another stage's layer: never read here, held at no cost
            cache.append(torch.zeros((), dtype=layout.dtype, device=layout.device).expand(shape))
    return cache, split


def _check_options(options: dict) -> None:
    for name, value in options.items():
        if name in IGNORED:
            continue
        if name not in UNSUPPORTED:
            raise MeshcError(f"generate() got an unknown option {name!r}; meshc takes attention_mask, "
                             f"max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, "
                             f"pad_token_id and streamer")
        if value != UNSUPPORTED[name]:
            raise MeshcError(f"generate({name}={value!r}) is not implemented by meshc (greedy and sampling "
                             f"with temperature/top_k/top_p only); leave {name} at {UNSUPPORTED[name]!r} or "
                             f"use the original model's generate for it")


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _sampler(temperature: float, top_k: int | None, top_p: float):
    """Hugging Face's warper order: temperature, top-k, top-p; then one multinomial draw per row."""
    if temperature <= 0:
        raise MeshcError(f"temperature must be > 0 when do_sample=True; got {temperature} (use "
                         f"do_sample=False for greedy)")

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float() / temperature
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if top_p < 1.0:
            ordered, index = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= (1 - top_p)
            drop[..., -1:] = False  # keep at least one token
            scores = scores.masked_fill(drop.scatter(-1, index, drop), -float("inf"))
        return torch.multinomial(scores.softmax(-1), 1)[:, 0]

    return choose
