"""How much consecutive FFN blocks depend on each other (FFN Fusion, NVIDIA 2025), measured on a Program.

Entry points: `ffn_dependencies(program, ids) -> Deps` (the matrix), `choose_runs(deps, threshold)`
(the runs `ffn_fusion(runs=auto)` fuses), `auto_runs(...)` (what that pass calls),
`calibration_ids(model_name, path)`, `Deps.table()` and `heatmap(deps, path)` (what
`meshc ffn-deps` prints and draws).

    M[i, j] = 1 - mean over tokens of cos(h_j, h_j without h_i)        (i < j, FFN sub-layers)

where h_j is FFN block j's contribution to the residual stream and "without h_i" means the graph
is run again with block i's contribution replaced by zeros (everything after it recomputed,
attention included). M[i, j] near 0: block j barely reacts to block i, so computing them in
parallel from the same input changes little. FFN sub-layers come from the residual stream in the
graph (`meshc.passes.residual_stream`), numbered by decoder layer as the model numbers them. The
graph runs eagerly (torch.fx.Interpreter) with the Program's own weights; nothing is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from meshc.errors import MeshcError
from meshc.program import Program


@dataclass
class Deps:
    layers: list[int]  # decoder layer of each FFN sub-layer, in stream order
    subs: list[int]  # its sub-layer index in the residual stream (1-based)
    M: torch.Tensor  # [n, n]; M[i, j] for i < j, NaN elsewhere
    tokens: int  # calibration tokens measured

    def adjacent(self, i: int) -> bool:
        """Whether FFN i+1 directly follows FFN i in the stream (nothing between them)."""
        return self.subs[i + 1] == self.subs[i] + 1

    def table(self) -> str:
        """M as a text table: rows i (the FFN removed), columns j (the FFN measured), by layer."""
        head = "layer " + "".join(f"{lj:>8}" for lj in self.layers)
        rows = [head]
        for i, li in enumerate(self.layers):
            cells = "".join(f"{self.M[i, j].item():>8.4f}" if j > i else f"{'.':>8}" for j in range(len(self.layers)))
            rows.append(f"{li:>5} {cells}")
        return "\n".join(rows)


class _Probe(fx.Interpreter):
    """Runs the graph, recording the values of `watch` and replacing `zero`'s value by zeros."""

    def __init__(self, gm: fx.GraphModule, watch: list[fx.Node], zero: fx.Node | None):
        super().__init__(gm)
        self.watch, self.zero, self.seen = set(watch), zero, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.zero:
            out = torch.zeros_like(out)
        if n in self.watch:
            self.seen[n] = out
        return out


def ffn_dependencies(program: Program, ids: torch.Tensor) -> Deps:
    """M over every pair of FFN sub-layers of `program`, on token ids `ids` [B, S]."""
    from meshc.passes.attention_removal import stamp_layers
    from meshc.passes.residual_stream import find_residual_stream

    program = program.clone()
    stream = find_residual_stream(program)
    grouped = stamp_layers(stream)
    ffns = [(layer, k) for layer, subs in enumerate(grouped) for k in subs if not stream.attends(k)]
    if len(ffns) < 2:
        raise MeshcError(f"{program.model_name} has {len(ffns)} FFN sub-layer(s) in its residual stream; the "
                         f"dependency metric needs two or more")
    hs = [stream.hs[k - 1] for _, k in ffns]
    args = [*program.state_args(), *program.bind_inputs((ids,), {})]

    def run(zero: fx.Node | None) -> dict[fx.Node, torch.Tensor]:
        probe = _Probe(program.gm, hs, zero)
        with torch.no_grad():
            probe.run(*args)
        return probe.seen

    base = run(None)
    n = len(ffns)
    M = torch.full((n, n), float("nan"), dtype=torch.float64)
    for i in range(n - 1):
        without = run(hs[i])
        for j in range(i + 1, n):
            a, b = base[hs[j]].double(), without[hs[j]].double()
            cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
            M[i, j] = (1 - cos).mean()
    return Deps([layer for layer, _ in ffns], [k for _, k in ffns], M, int(ids.numel()))


def choose_runs(deps: Deps, threshold: float) -> list[list[int]]:
    """Runs (decoder layers) of adjacent FFNs, grown left to right while the next FFN depends on
    every FFN already in the run by less than `threshold`; runs of one are dropped."""
    runs, cur = [], [0]
    for j in range(1, len(deps.layers)):
        if deps.adjacent(j - 1) and max(deps.M[i, j].item() for i in cur) < threshold:
            cur.append(j)
        else:
            runs.append(cur)
            cur = [j]
    runs.append(cur)
    return [[deps.layers[i] for i in run] for run in runs if len(run) > 1]


def calibration_ids(model_name: str = "reference-lm", path: str | Path | None = None, tokens: int = 2048,
                    seq: int = 256, vocab: int | None = None) -> torch.Tensor:
    """Calibration token ids [tokens // seq, seq]. `path`: a file of whitespace-separated token ids,
    or text (its UTF-8 bytes are the ids: the reference LM's byte vocabulary). Without a path: the
    reference LM's training split (only the reference LM has a default)."""
    if path is None:
        if model_name not in ("reference-lm", "LlamaForCausalLM-reference"):
            raise MeshcError(f"no default calibration text for {model_name}: give --calibration FILE (text, or "
                             f"whitespace-separated token ids)")
        from meshc.reference_lm.training import training_tokens

        flat = training_tokens()[:tokens].long()
    else:
        raw = Path(path).read_bytes()
        try:
            flat = torch.tensor([int(t) for t in raw.split()], dtype=torch.long)
        except ValueError:
            flat = torch.tensor(list(raw), dtype=torch.long)
        flat = flat[:tokens]
    if vocab is not None and flat.numel() and int(flat.max()) >= vocab:
        raise MeshcError(f"calibration {path}: token id {int(flat.max())} is outside the model's vocabulary "
                         f"(size {vocab}); give token ids of this model's tokenizer")
    seq = min(seq, flat.numel())
    if seq < 2:
        raise MeshcError(f"calibration {path}: fewer than 2 tokens")
    return flat[: (flat.numel() // seq) * seq].reshape(-1, seq)


def auto_runs(program: Program, stream, grouped, threshold: float, calibration: str | None):
    """(runs of layers, a line saying how they were chosen) for `ffn_fusion(runs=auto)`."""
    if calibration:
        ids = calibration_ids(program.model_name, calibration, vocab=_vocab(program))
        source = f"calibration {calibration}"
    else:
        ex_args, ex_kwargs = program.example_inputs
        ids = next((a for a in ex_args if isinstance(a, torch.Tensor)), None)
        if ids is None:
            raise MeshcError("ffn_fusion(runs=auto) needs token ids: the Program's example inputs have none; pass "
                             "calibration=FILE")
        source = "the example inputs (pass calibration=FILE for real text)"
    deps = ffn_dependencies(program, ids)
    runs = choose_runs(deps, threshold)
    return runs, f"runs {runs or 'none'} from M on {deps.tokens} tokens of {source}"


def _vocab(program: Program) -> int | None:
    emb = next((n for n in program.placeholders("parameter") if n.meta["val"].dim() == 2), None)
    return int(emb.meta["val"].shape[0]) if emb is not None else None


def heatmap(deps: Deps, path: str | Path, title: str = "") -> Path:
    """Draw M as a PNG (needs matplotlib: pip install 'meshc[plot]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MeshcError("the heatmap needs matplotlib, which is not installed: pip install 'meshc[plot]' "
                         "(the table above does not)") from e
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(deps.layers), 0.8 + 0.5 * len(deps.layers)))
    im = ax.imshow(deps.M.numpy(), cmap="viridis")
    ax.set_xticks(range(len(deps.layers)), [str(x) for x in deps.layers])
    ax.set_yticks(range(len(deps.layers)), [str(x) for x in deps.layers])
    ax.set_xlabel("FFN j (layer): contribution measured")
    ax.set_ylabel("FFN i (layer): contribution removed")
    ax.set_title(title or "M[i, j] = cosine distance")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
