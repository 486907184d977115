"""Block-reuse capture: trace two decoder blocks, copy the second for its identical siblings.

Entry point: `capture_reusing_blocks(model, args, kwargs, dynamic_shapes, mesh, force=False)`
→ Program, or None when the model has no run of identical blocks to reuse (then `capture` traces
the whole model as usual). `capture` calls it first (its `reuse_blocks` option: "auto" reuses for
models with at least `MIN_BLOCKS` identical blocks, True for any model with two or more, False never).

Why: torch.export of an 80-layer decoder traces 80 identical blocks one by one (a Llama-3-70B-
shaped model takes over a minute), although the graph of block 5 is the graph of block 4 with
block 5's weights. So the model's `nn.ModuleList` of blocks is shortened to its first two for
the trace (and restored after), and the traced block 1 is copied for blocks 2..L-1: each copy
reads the previous copy where block 1 reads block 0, its own layer's parameters where block 1
reads block 1's, and the same shared nodes (rotary tables, masks, sizes) as block 1. The result
is the graph a full capture gives (same ops in the same order, the same placeholders in the same
order, the same FQNs; only FX's node-name numbering differs); tests compare plans and outputs with
a full capture.

Reuse is refused (None: full capture) unless every block has the same type, the same parameter
and buffer names, shapes and dtypes and the same plain attributes (a per-layer sliding window or
layer type differs; `layer_idx` is allowed), and the traced block 1 reads exactly what block 0
reads, shifted by one block. Never mutates the model (the block list is restored, also on error).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

#: "auto" reuses blocks for models with at least this many identical ones.
MIN_BLOCKS = 8
_PLAIN = (int, float, bool, str, type(None))


def find_block_list(model: torch.nn.Module, minimum: int = 2) -> tuple[str, torch.nn.ModuleList] | None:
    """The largest `nn.ModuleList` whose entries are identical blocks (at least `minimum`), with its path."""
    best = None
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) >= max(minimum, 2) and (
                best is None or len(mod) > len(best[1])):
            sig = _signature(mod[0])
            if all(_signature(b) == sig for b in mod[1:]):
                best = (path, mod)
    return best


def _signature(block: torch.nn.Module) -> tuple:
    """What makes two blocks trace alike: types, parameter/buffer shapes, plain attributes."""
    parts = []
    for name, m in block.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and "layer_id" not in k and isinstance(v, _PLAIN)))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in [*m.named_parameters(recurse=False),
                                                                  *m.named_buffers(recurse=False)])
        parts.append((name, type(m).__qualname__, attrs, tensors))
    return tuple(parts)


def _uniform_config(model: torch.nn.Module) -> bool:
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return not types or len(set(types)) == 1


def capture_reusing_blocks(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None,
                           mesh: Any = None, force: bool = False):
    """The Program of a full capture, traced from two blocks (see the module docstring); None when
    the model has fewer than MIN_BLOCKS (force: 3) identical blocks or its blocks differ."""
    from meshc.capture import capture

    found = find_block_list(model, 3 if force else MIN_BLOCKS)
    if found is None or not _uniform_config(model):
        return None
    path, blocks = found
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, torch.nn.ModuleList(list(blocks)[:2]))
    try:
        program = capture(model, args, kwargs, dynamic_shapes=dynamic_shapes, mesh=mesh, reuse_blocks=False)
    except Exception:  # noqa: BLE001 - a model that cannot run on two blocks: trace it whole
        return None
    finally:
        setattr(parent, attr, blocks)
    if not _expand(program, model, path, len(blocks)):
        return None
    program.notes.append(f"capture: traced 2 of {len(blocks)} identical blocks of {path} and reused block 1's "
                         f"graph for blocks 2..{len(blocks) - 1} (meshc.capture_blocks)")
    return program


def _region(graph: fx.Graph, prefix: str) -> list[fx.Node]:
    """The contiguous nodes traced inside module `prefix` (e.g. 'model.layers.1'); [] if not contiguous."""
    from meshc.passes.sharding_strategies import module_path

    nodes = list(graph.nodes)
    inside = [i for i, n in enumerate(nodes) if n.op == "call_function"
              and (module_path(n) == prefix or module_path(n).startswith(prefix + "."))]
    if not inside:
        return []
    return nodes[inside[0]:inside[-1] + 1]


def _expand(program, model: torch.nn.Module, path: str, count: int) -> bool:
    """Rewrite `program` (traced with blocks 0 and 1) into the graph of all `count` blocks, in place.
    False (program unusable) when block 1 does not read what block 0 reads, shifted by one."""
    graph = program.graph
    b0, b1 = f"{path}.0", f"{path}.1"
    r0, r1 = _region(graph, b0), _region(graph, b1)
    if not r0 or len(r0) != len(r1) or any(a.target != b.target for a, b in zip(r0, r1)):
        return False
    nodes = list(graph.nodes)
    if nodes.index(r1[0]) != nodes.index(r0[-1]) + 1:
        return False
    in0, in1 = set(r0), set(r1)
    pos0, pos1 = {n: i for i, n in enumerate(r0)}, {n: i for i, n in enumerate(r1)}
    fqn = {n: n.meta.get("meshc_name", "") for n in graph.nodes if n.op == "placeholder"}
    for a, b in zip(r0, r1):  # block 1 reads what block 0 reads, one block later
        ua, ub = a.all_input_nodes, b.all_input_nodes
        if len(ua) != len(ub):
            return False
        for x, y in zip(ua, ub):
            ok = ((y in in1 and x in in0 and pos0[x] == pos1[y]) or (y in in0 and x not in in0 and x not in in1)
                  or (y.op == "placeholder" and fqn[y].startswith(b1 + ".") and fqn.get(x) == b0 + fqn[y][len(b1):])
                  or (x is y and not fqn.get(y, "").startswith((b0 + ".", b1 + "."))))
            if not ok:
                return False
    later = [n for n in nodes[nodes.index(r1[-1]) + 1:]]
    if any(u in in0 for n in later for u in n.all_input_nodes):
        return False  # the tail reads block 0 (e.g. all hidden states): not a chain of blocks
    # placeholders of each new block, inserted right after block 1's (full-capture order)
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    own = [n for n in graph.nodes if n.op == "placeholder" and fqn[n].startswith(b1 + ".")]
    placeholders: dict[int, dict[fx.Node, fx.Node]] = {}
    for kind in dict.fromkeys(n.meta["meshc_input"] for n in own):
        group = [n for n in own if n.meta["meshc_input"] == kind]
        anchor = group[-1]
        for j in range(2, count):
            for old in group:
                name = fqn[old].replace(b1 + ".", f"{path}.{j}.", 1)
                if name not in named:
                    return False
                with graph.inserting_after(anchor):
                    new = graph.placeholder(_rename(old.name, b1, f"{path}.{j}"))
                new.meta = {**old.meta, "meshc_name": name}
                new.type = old.type
                program.state[new.name] = named[name]
                placeholders.setdefault(j, {})[old] = new
                anchor = new
    # the copies, chained after block 1
    previous = {a: b for a, b in zip(r0, r1)}  # block-0 node -> the node the next block reads instead
    anchor = r1[-1]
    for j in range(2, count):
        env: dict[fx.Node, fx.Node] = {}

        def arg(u: fx.Node, env=env, j=j, previous=previous) -> fx.Node:
            if u in env:
                return env[u]
            if u in in0:
                return previous[u]
            return placeholders[j].get(u, u)

        for old in r1:
            with graph.inserting_after(anchor):
                new = graph.node_copy(old, arg)
            new.meta = _shift_meta(old.meta, b1, f"{path}.{j}")
            env[old] = new
            anchor = new
        previous = {a: env[b] for a, b in zip(r0, r1)}
    last = {b: previous[a] for a, b in zip(r0, r1)}
    for n in later:
        n.args, n.kwargs = fx.node.map_arg((n.args, n.kwargs), lambda u: last.get(u, u))
    graph.lint()
    program.gm.recompile()
    if any(t.is_meta for t in program.state.values()):
        from meshc.meta_buffers import rebuild_meta_buffers

        rebuild_meta_buffers(model, program.state, {n.name: fqn.get(n, n.meta.get("meshc_name", ""))
                                                    for n in graph.nodes if n.op == "placeholder"})
    return True


def _rename(name: str, old_prefix: str, new_prefix: str) -> str:
    a, b = old_prefix.replace(".", "_"), new_prefix.replace(".", "_")
    return name.replace(a, b, 1) if a in name else f"{name}_{new_prefix.rpartition('.')[2]}"


def _shift_meta(meta: dict, old_prefix: str, new_prefix: str) -> dict:
    """A copy's meta: block 1's, with its module paths moved to the new block."""
    out = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        pat = re.compile(re.escape(old_prefix) + r"(?=\.|$)")
        k_old, k_new = old_prefix.replace(".", "_"), new_prefix.replace(".", "_")
        out["nn_module_stack"] = {k.replace(k_old, k_new): (pat.sub(new_prefix, p, count=1), t)
                                  for k, (p, t) in stack.items()}
    return out


__all__ = ["MIN_BLOCKS", "capture_reusing_blocks", "find_block_list"]
