"""Speculative decoding with Medusa heads: tree candidates, one verification call, acceptance,
cache compaction.

Entry point: `speculative_generate(decoder, input_ids, ...)` (what `compiled.generate(...,
speculative="medusa", tree=...)` calls). The decode Program must carry the heads of the
`speculative_heads` pass (its output has `medusa_logits`). Each step:

1. Candidates: the base model's next token (root) and, for every tree path (i_1, ..., i_d) in
   Medusa's format (e.g. `MC_SIM_7B_63`), head d-1's top-(i_d + 1)-th token at the path's parent.
2. Verification: exactly one call of the compiled decode Program on the T = 1 + len(paths) tree
   tokens — position ids = next position + depth, K/V written at cache slots cur..cur+T-1, and an
   additive mask over the cache where a node sees the committed tokens, its ancestors and itself
   (over the filled prefix rounded up to a bucket, `generate.read_length`, as plain decode reads).
3. Acceptance: greedy (default, lossless) keeps the longest path whose every token equals the base
   model's argmax at its parent; `acceptance="typical"` (Medusa's ε, δ: accept a token whose
   probability under the base model at temperature τ exceeds min(ε, δ·exp(-entropy))) is not
   lossless — it trades exactness for longer accepted paths.
4. Compaction: the accepted nodes' K/V move to slots cur, cur+1, ... (the rest are left behind,
   masked, and overwritten later); the next root is the base model's token after the path.

Batch 1 only. `Tree` builds the index tensors from paths; `default_tree(size, accuracy)` picks the
`size` nodes of highest expected acceptance from per-head top-k accuracies (Medusa's greedy tree
construction). It never builds or rewrites a graph and never calls the original model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from meshc.errors import InputError, MeshcError
from meshc.runtime.generate import read_length

#: Medusa's tree for Vicuna-7B (medusa/model/medusa_choices.py): 63 paths, depth 4, top-10.
MC_SIM_7B_63 = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,),
    (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0),
    (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0),
    (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1),
    (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0)]

#: Medusa-1's published per-head top-1 accuracy on Vicuna-7B (a prior when no heads were measured).
VICUNA_7B_TOP1 = (0.56, 0.32, 0.20, 0.15, 0.12)


@dataclass(frozen=True)
class Tree:
    """A candidate tree from Medusa-format paths; node 0 is the root (the base model's token)."""

    paths: tuple[tuple[int, ...], ...]

    @staticmethod
    def of(paths: Any) -> Tree:
        """Sorted by (depth, path) so that parents come first; every prefix of a path must be a path."""
        clean = sorted({tuple(int(i) for i in p) for p in paths}, key=lambda p: (len(p), p))
        have = set(clean)
        for p in clean:
            if not p or min(p) < 0:
                raise MeshcError(f"tree path {list(p)} is empty or has a negative top-k index; a path lists "
                                 f"top-k ranks (0 = the head's best), one per head, e.g. [0, 1]")
            if len(p) > 1 and p[:-1] not in have:
                raise MeshcError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree; Medusa trees "
                                 f"list every prefix of every path")
        return Tree(tuple(clean))

    @property
    def size(self) -> int:
        return 1 + len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def topk(self) -> int:
        return 1 + max((p[-1] for p in self.paths), default=0)

    @cached_property
    def parents(self) -> list[int]:
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        return [-1] + [index.get(p[:-1], 0) for p in self.paths]

    @cached_property
    def depths(self) -> torch.Tensor:
        return torch.tensor([0] + [len(p) for p in self.paths])

    @cached_property
    def visible(self) -> torch.Tensor:
        """[T, T] bool: node i sees node j iff j is i or an ancestor of i."""
        t = self.size
        out = torch.eye(t, dtype=torch.bool)
        for i in range(1, t):
            out[i] |= out[self.parents[i]]
        return out

    def truncated(self, nodes: int) -> Tree:
        """The first `nodes` nodes (still a tree: parents come first)."""
        return Tree(self.paths[: max(0, nodes - 1)])


def default_tree(size: int, accuracy: list[list[float]] | None = None) -> Tree:
    """The `size`-node tree (root included) of highest expected accepted length: a node's chance is
    the product of accuracy[d][rank] along its path, where accuracy[d][k] is how often head d's
    top-(k+1)-th token is the right one; greedily add the likeliest child (Medusa's construction).
    Without measured accuracies, Medusa-1's Vicuna-7B top-1 figures with a 1/(k+1) decay over ranks."""
    if size < 1:
        raise MeshcError(f"tree size must be >= 1 (the root alone is plain decoding); got {size}")
    if accuracy is None:
        accuracy = [[a / (k + 1) for k in range(10)] for a in VICUNA_7B_TOP1]
    chosen: dict[tuple[int, ...], float] = {(): 1.0}
    while len(chosen) < size:
        best, score = None, -1.0
        for p, prob in chosen.items():
            d = len(p)
            if d >= len(accuracy):
                continue
            rank = sum(1 for q in chosen if len(q) == d + 1 and q[:-1] == p)  # next unused rank under p
            if rank < len(accuracy[d]) and prob * accuracy[d][rank] > score:
                best, score = p + (rank,), prob * accuracy[d][rank]
        if best is None:
            break
        chosen[best] = score
    return Tree.of([p for p in chosen if p])


@dataclass
class SpeculativeStats:
    """What the last speculative `generate` measured: verification calls, accepted tokens per call
    (the base model's own token included), wall time."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # verification calls of the decode Program
    tree_size: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def accepted_per_step(self) -> float:
        return (self.new_tokens - 1) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


def heads_of(program: Any) -> int:
    """How many Medusa heads a (decode) Program outputs; 0 if it has none."""
    return sum(n.meta.get("meshc_name", "").endswith(".proj.weight") and
               n.meta.get("meshc_name", "").startswith("medusa_heads.") for n in program.placeholders("parameter"))


def trained_tree(program: Any, size: int | None = None) -> Tree:
    """The default tree of a Program whose heads came from a weights file: the file's measured
    accuracies (metadata 'accuracy', written by examples/train_medusa.py) and tree size; else the prior."""
    from meshc.pipeline import parse_pipeline

    weights = next((c.options.get("weights") for h in program.history if h.startswith("speculative_heads")
                    for c in parse_pipeline(h)), None)
    meta = {}
    if weights:
        from safetensors import safe_open

        with safe_open(weights, "pt") as f:
            meta = f.metadata() or {}
    accuracy = json.loads(meta["accuracy"]) if "accuracy" in meta else None
    return default_tree(size or int(meta.get("tree_size", 16)), accuracy)


def speculative_generate(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         speculative: str = "medusa", tree: Any = None, max_new_tokens: int = 20,
                         acceptance: str = "greedy", epsilon: float = 0.09, delta: float = 0.3,
                         temperature: float = 0.7, eos_token_id: Any = None, pad_token_id: int | None = None,
                         streamer: Any = None, **options: Any) -> torch.Tensor:
    """Prompt + new tokens by Medusa tree decoding on `decoder`'s compiled Programs (see the module doc).
    tree: None (the heads' default tree), an int (that many nodes of the default tree), or Medusa paths."""
    programs = decoder.programs
    if speculative != "medusa":
        raise MeshcError(f"speculative={speculative!r} is not a speculation method meshc has; use 'medusa'")
    heads = heads_of(programs.decode)
    if not heads:
        raise MeshcError(f"{programs.decode.model_name} was compiled without Medusa heads, so it cannot speculate; "
                         f"compile with pipeline 'speculative_heads(weights=HEADS.safetensors),<the default "
                         f"pipeline>' (train heads with examples/train_medusa.py)")
    bad = {k: v for k, v in options.items() if k not in ("do_sample", "use_cache") or (k == "do_sample" and v)}
    if bad:
        raise MeshcError(f"speculative generate takes max_new_tokens, tree, acceptance ('greedy' or 'typical' with "
                         f"epsilon, delta, temperature), eos_token_id, pad_token_id, streamer; not {sorted(bad)}")
    if acceptance not in ("greedy", "typical"):
        raise MeshcError(f"acceptance={acceptance!r}: use 'greedy' (lossless) or 'typical' (Medusa's ε, δ; "
                         f"not lossless)")
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise InputError(f"speculative decoding runs batch 1 (one tree per step); got batch {input_ids.shape[0]}. "
                         f"Call generate once per sequence, or without speculative= for a batch")
    _, prompt = decoder._check_inputs(input_ids, attention_mask, max_new_tokens)
    tree = _resolve_tree(tree, programs.decode, heads)
    if acceptance == "typical" and temperature <= 0:
        raise MeshcError(f"typical acceptance samples at temperature > 0; got {temperature} (use acceptance='greedy')")
    dev, dtype, length = input_ids.device, decoder.layout.dtype, decoder.layout.max_cache_len
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    eos = decoder.defaults.get("eos_token_id") if eos_token_id is None else eos_token_id
    eos = set([eos] if isinstance(eos, int) else list(eos or []))
    choose = _greedy if acceptance == "greedy" else _typical(epsilon, delta, temperature)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    cache = [c[:1] for c in decoder.cache]  # views: the graphs write the buffers in place
    minimum = torch.finfo(dtype).min
    committed = torch.full((length,), minimum, dtype=dtype, device=dev)  # mask row of the committed tokens
    committed[:prompt].masked_fill_(mask[0].bool(), 0.0)
    cur, position = prompt, int(mask.sum())  # next cache slot, next token's position
    new: list[int] = []
    run = runners(decoder)
    steps, t0 = 0, time.perf_counter()
    with torch.no_grad():
        out = run.prefill([input_ids, mask, *cache])
        token = int(choose(out[0][0, -1:])[0])
        medusa = out[1][:, 0, -1]  # [heads, V]
        t1 = time.perf_counter()
        new.append(token)
        _emit(streamer, [token])
        while len(new) < max_new_tokens and token not in eos:
            step_tree = tree.truncated(min(tree.size, length - cur))
            if step_tree.size < 1:
                break
            tokens = _candidates(token, medusa, step_tree)
            t = step_tree.size
            width = read_length(cur + t, length)  # attend over the filled prefix only, as plain decode does
            bias = torch.full((1, 1, t, width), minimum, dtype=dtype, device=dev)
            bias[0, 0, :, :cur] = committed[:cur]
            bias[0, 0, :, cur:cur + t].masked_fill_(step_tree.visible.to(dev), 0.0)
            out = run.decode([tokens[None], (position + step_tree.depths.to(dev))[None],
                                   torch.arange(cur, cur + t, device=dev), bias, *cache])
            steps += 1
            path = _accept(out[0][0], tokens, step_tree, acceptance, choose)
            slots = torch.tensor(path, device=dev) + cur
            if path != list(range(len(path))):  # move the accepted nodes' K/V to cur, cur+1, ...
                for c in cache:
                    c.index_copy_(2, torch.arange(cur, cur + len(path), device=dev), c.index_select(2, slots))
            committed[cur:cur + len(path)] = 0.0
            cur, position = cur + len(path), position + len(path)
            last = path[-1]
            accepted = [int(tokens[i]) for i in path[1:]] + [int(choose(out[0][0, last:last + 1])[0])]
            accepted = _until(accepted, eos, max_new_tokens - len(new))
            new.extend(accepted)
            _emit(streamer, accepted)
            token, medusa = accepted[-1], out[1][:, 0, last]
    t2 = time.perf_counter()
    if streamer is not None:
        streamer.end()
    decoder.speculative_stats = SpeculativeStats(prompt, len(new), steps, tree.size, t1 - t0, t2 - t1)
    return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=dev)], dim=1)


@dataclass
class Runners:
    """The decoder's prefill and decode Programs lowered to return every flat output (logits and
    medusa_logits), for the Decoder as lowered now (`key`: its plain decode callable)."""

    prefill: Any
    decode: Any
    key: Any


def runners(decoder: Any) -> Runners:
    """Lower the decoder's Programs once (again after `Decoder.rebind`), returning all outputs."""
    from meshc.backends import lower

    found = getattr(decoder, "medusa_runners", None)
    if found is not None and found.key is decoder._decode:
        return found
    if getattr(decoder, "runners", None):
        raise MeshcError("speculative decoding on a pipeline-parallel (pp) mesh is not implemented; use one "
                         "device or a tp mesh")
    prefill, _ = lower(decoder.programs.prefill, decoder.backend)
    decode, _ = lower(decoder.programs.decode, decoder.backend)
    decoder.medusa_runners = Runners(prefill, decode, decoder._decode)
    return decoder.medusa_runners


def _resolve_tree(tree: Any, program: Any, heads: int) -> Tree:
    if tree is None or isinstance(tree, int):
        out = trained_tree(program, tree)
    else:
        out = tree if isinstance(tree, Tree) else Tree.of(tree)
    if out.depth > heads:
        raise MeshcError(f"the tree is {out.depth} deep but the model has {heads} Medusa head(s); a path may be at "
                         f"most {heads} long")
    return out


def _candidates(root: int, medusa: torch.Tensor, tree: Tree) -> torch.Tensor:
    """Tree tokens [T]: the root, then for each path head (depth-1)'s top-(rank+1) token."""
    top = medusa.topk(max(1, tree.topk), dim=-1).indices  # [heads, k]
    out = [root] + [int(top[len(p) - 1, p[-1]]) for p in tree.paths]
    return torch.tensor(out, dtype=torch.long, device=medusa.device)


def _accept(logits: torch.Tensor, tokens: torch.Tensor, tree: Tree, acceptance: str, choose) -> list[int]:
    """Node indices of the longest accepted path from the root (root included)."""
    parents = torch.tensor(tree.parents[1:], dtype=torch.long, device=logits.device)
    if acceptance == "greedy":
        ok = tokens[1:] == logits.argmax(-1)[parents]
    else:
        ok = choose.accepts(logits[parents], tokens[1:])
    accepted = [True] + [False] * (tree.size - 1)
    best = 0
    for i in range(1, tree.size):  # parents come first
        accepted[i] = bool(ok[i - 1]) and accepted[tree.parents[i]]
        if accepted[i] and len(tree.paths[i - 1]) > (len(tree.paths[best - 1]) if best else 0):
            best = i
    path = [best]
    while path[-1] != 0:
        path.append(tree.parents[path[-1]])
    return path[::-1]


def _until(tokens: list[int], eos: set, room: int) -> list[int]:
    tokens = tokens[:room]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def _emit(streamer: Any, tokens: list[int]) -> None:
    if streamer is not None:
        for t in tokens:
            streamer.put(torch.tensor([t]))


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _typical(epsilon: float, delta: float, temperature: float):
    """Medusa's typical acceptance: p(x) > min(ε, δ·exp(-H(p))) under the base model at temperature τ;
    the next token is sampled from the tokens that pass that test."""

    def threshold(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = (logits.float() / temperature).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1, keepdim=True)
        return probs, torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs, limit = threshold(logits)
        keep = probs.masked_fill(probs < limit, 0.0)
        keep = torch.where(keep.sum(-1, keepdim=True) > 0, keep, probs)
        return torch.multinomial(keep, 1)[:, 0]

    def accepts(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        probs, limit = threshold(logits)
        return probs.gather(-1, tokens[:, None])[:, 0] > limit[:, 0]

    choose.accepts = accepts
    return choose


def expected_length(tree: Tree, accuracy: list[list[float]]) -> float:
    """Expected accepted tokens per step of `tree` under independent per-head accuracies (root = 1)."""
    total = 1.0
    for p in tree.paths:
        total += math.prod(accuracy[d][r] if d < len(accuracy) and r < len(accuracy[d]) else 0.0
                           for d, r in enumerate(p))
    return total
