"""The functional collectives meshc emits, named once: what a rank's program may contain.

Entry points: `COLLECTIVES` (op names of `torch.ops._c10d_functional`), `collective_name(node)`,
`count_collectives(program)`. In a Program, a collective's last argument is the mesh dim name
('tp'); `meshc.runtime.sharded.prepare_rank` binds it to the process group of that dim.
"""

from __future__ import annotations

import torch.fx as fx

COLLECTIVES = frozenset({"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"})


def collective_name(node: fx.Node) -> str | None:
    """'all_reduce' etc. if `node` issues a functional collective, else None."""
    name = getattr(node.target, "_opname", None) if node.op == "call_function" else None
    return name if name in COLLECTIVES else None


def count_collectives(program) -> dict[str, int]:
    """'all_reduce@tp' -> how many times the program issues it per forward."""
    out: dict[str, int] = {}
    for n in program.graph.nodes:
        name = collective_name(n)
        if name:
            key = f"{name}@{n.args[-1]}"
            out[key] = out.get(key, 0) + 1
    return out
