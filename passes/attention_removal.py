"""attention_removal: the attention sub-layer of chosen decoder layers, with its norm, is removed.

Entry point: the pass `attention_removal(layers=...)` (not semantics-preserving). For a listed
layer whose sub-layers are (attention, FFN), x <- x + Attn(Norm(x)) becomes x <- x: the residual
stream passes through unchanged, so the FFNs of consecutive listed layers follow one another with
nothing between them -- the runs `ffn_fusion` turns into one wide FFN (FFN Fusion, NVIDIA 2025).
Layers are numbered from 0 as in the model, found from the residual stream in the graph
(`residual_stream.py`), never from module names; every residual add is stamped with its original
layer (`meta['meshc_layer']`) so later passes keep the numbering. The removed sub-layers' weights
leave the Program. A parallel block (attention and MLP in one sub-layer) cannot lose only its
attention: the error names the layer.
"""

from __future__ import annotations

from meshc.errors import MeshcError
from meshc.passes.dce import dce
from meshc.passes.graph_params import drop_unused_state, erase_unused
from meshc.passes.layer_select import select_layers
from meshc.passes.residual_stream import ResidualStream, find_residual_stream
from meshc.pipeline import register_pass
from meshc.program import Program


def stamp_layers(stream: ResidualStream) -> list[list[int]]:
    """Stamp every residual add with its decoder layer (kept if already stamped); the layers."""
    grouped = stream.layers()
    for layer, subs in enumerate(grouped):
        for k in subs:
            stream.adds[k - 1].meta.setdefault("meshc_layer", layer)
    return grouped


@register_pass("attention_removal", preserves_semantics=False,
               description="remove the attention sub-layer (and its norm) of chosen decoder layers")
def attention_removal(program: Program, *, layers: str = "") -> Program:
    if not layers.strip():
        raise MeshcError("attention_removal: name the decoder layers whose attention goes, e.g. layers=2-5 or "
                         "layers='3,5,7' (meshc ffn-deps / examples/convert_ffn_fusion.py help choose)")
    program = dce(program)  # export's asserts would keep removed nodes alive
    stream = find_residual_stream(program)
    grouped = stamp_layers(stream)
    chosen = select_layers(layers, len(grouped))
    removed, dead = [], set()
    for layer in chosen:
        attn = [k for k in grouped[layer] if stream.attends(k)]
        if not attn:
            raise MeshcError(f"attention_removal: decoder layer {layer} has no attention sub-layer left (sub-layers "
                             f"{grouped[layer]} of the residual stream do not attend); drop it from layers={layers}")
        if len(grouped[layer]) == len(attn):
            raise MeshcError(f"attention_removal: decoder layer {layer} is a parallel block (its attention and MLP "
                             f"read the stream in one sub-layer, %{stream.hs[attn[0] - 1].name}), so its attention "
                             f"cannot be removed alone")
        for k in attn:
            add, x = stream.adds[k - 1], stream.xs[k - 1]
            dead |= stream.body(k) | {add}
            add.replace_all_uses_with(x)
            removed.append(k)
    erase_unused(program, dead)
    program.graph.eliminate_dead_code()
    dropped = drop_unused_state(program)
    program.gm.recompile()
    program.notes.append(f"attention_removal: removed the attention of layers {chosen} (sub-layers {removed} of "
                         f"{len(stream)}); {len(dropped)} weights dropped")
    return program
