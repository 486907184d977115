"""The functional collectives meshc emits, named once: what a rank's program may contain.

Entry points: `COLLECTIVES` (op names of `torch.ops._c10d_functional`), `collective_name(node)`,
`count_collectives(program)`, `emitted_collectives(program)` (what a rank's graph issues, with
bytes, in the units of `meshc.redistribute.Step`). In a Program, a collective's last argument
names its mesh dim (`MeshSpec.group_name`, e.g. 'tp@tp=2'); `meshc.runtime.mesh.bind_groups`
registers the process group of that dim under that name, so the graph is never rewritten.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
from meshc.mesh import MeshSpec

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
            key = f"{name}@{MeshSpec.dim_of_group(n.args[-1])}"
            out[key] = out.get(key, 0) + 1
    return out


def emitted_collectives(program) -> Counter:
    """Multiset of (collective, mesh dim, bytes) the program's graph issues per call. Bytes as
    `meshc.redistribute.Step.nbytes`: the operand for all_reduce / reduce_scatter / all_to_all,
    the gathered result for all_gather."""
    from meshc.cost_model import value_bytes

    out: Counter = Counter()
    for n in program.graph.nodes:
        name = collective_name(n)
        if not name:
            continue
        nbytes = value_bytes(n.args[0])
        if name == "all_gather_into_tensor":
            nbytes *= n.args[1]
        out[(name, MeshSpec.dim_of_group(n.args[-1]), nbytes)] += 1
    return out

