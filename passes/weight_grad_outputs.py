"""weight_grad_outputs: zero-bubble's W — each stage also returns what its weight gradients need.

Entry point: the pass `weight_grad_outputs` (on a pipelined Program, after `split_stages`). For
every node of a stage that reads a trainable weight, the stage graph also returns that node's
output q and its other arguments, and `stage.readers` (`meshc.stages.WeightReaders`) says which
is which. The runtime's I step then asks autograd for the stage inputs' gradients and for dq of
every reader (graph kept); W computes each weight's gradient from (dq, the saved arguments) with
the formulas in `meshc.runtime.pipeline_weight_grads` — the weight-gradient matmuls only.

This is exact only when each weight has a single reader in the stage; otherwise the stage keeps
no readers (and says so) and W differentiates the whole stage w.r.t. its weights again. Never
changes what a stage computes: the extra outputs are values the graph already has.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from meshc.errors import MeshError
from meshc.pipeline import register_pass
from meshc.program import Program, trainable
from meshc.stages import Reader, Stage, WeightReaders


@register_pass("weight_grad_outputs", preserves_semantics=True,
               description="stages also return each weight reader's output and arguments (zero-bubble W)")
def weight_grad_outputs(program: Program) -> Program:
    if program.split is None:
        raise MeshError("weight_grad_outputs works on a pipelined Program: run split_stages before it")
    with_readers = []
    for st in program.split.stages:
        names = {n.name for n in st.program.placeholders() if trainable(n)}
        if _add_outputs(st, names):
            with_readers.append(str(st.index))
    program.notes.append(f"weight_grad_outputs: stages with per-reader weight gradients: "
                         f"{', '.join(with_readers) or 'none'} (others recompute W over the whole stage)")
    return program


def _add_outputs(st: Stage, trainable: set[str]) -> bool:
    graph = st.program.graph
    output = next(n for n in graph.nodes if n.op == "output")
    by_reader: dict[fx.Node, list[str]] = {}
    for ph in st.program.placeholders():
        if ph.name not in trainable:
            continue
        if len(ph.users) != 1 or not isinstance(next(iter(ph.users)).meta.get("val"), torch.Tensor):
            return False  # read twice (the local vjp is not the whole gradient) or a multi-output reader
        by_reader.setdefault(next(iter(ph.users)), []).append(ph.name)
    slots: list[fx.Node] = []
    readers = []
    for node, names in by_reader.items():
        args, weights = [], []
        for i, a in enumerate(node.args):
            if isinstance(a, fx.Node):
                if a.name in names:
                    weights.append((i, a.name))
                slots.append(a)
                args.append(("slot", len(slots) - 1))
            else:
                args.append(a)
        readers.append(Reader(node.target, tuple(args), dict(node.kwargs), tuple(weights)))
    output.args = ((*output.args[0], *by_reader, *slots),)
    st.program.gm.recompile()
    st.readers = WeightReaders(tuple(readers), len(slots))
    return True
