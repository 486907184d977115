"""propagate_shapes: recompute every node's `val` (FakeTensor) from the placeholders' values.

Entry points: the pass `propagate_shapes`, and `check_recorded_shapes(program)` used by the
Verify instrument to prove a pass left shapes and dtypes consistent. Symbolic sizes (sympy) are
kept: the placeholders' FakeTensors carry the ShapeEnv from capture. Propagation runs under torch's
Python dispatcher, as torch.export does: some meta kernels call composite ops on symbolic sizes
(e.g. `aten.baddbmm` expands its bias, as ALiBi attention does), which the C++ kernels reject
("SymIntArrayRef expected to contain only concrete integers").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from meshc.errors import NodeError
from meshc.pipeline import register_pass
from meshc.program import Program
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def fake_values(program: Program, unchanged: dict[fx.Node, tuple[Any, dict[str, Any]]] | None = None
                ) -> dict[str, Any]:
    """Run the graph on fake tensors; returns node name -> value. Errors name the failing node.

    unchanged: node -> (its value before a rewrite, {name of a node it reads: the value it read
    then}). Such a node is not run again when every node it reads has a value like the one it read
    (dtype, device, sizes, strides; equal numbers): an op's fake value depends on nothing else
    (spmd_partition: most nodes a rank computes at their global shape, from global-shape inputs)."""
    inputs = [n.meta.get("val") for n in program.placeholders()]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    prop = _Recorder(program.gm, mode, unchanged or {})
    try:
        with enable_python_dispatcher():
            prop.propagate_dont_convert_inputs(*inputs)
    except Exception as e:
        raise NodeError(prop.current, f"shape propagation failed: {type(e).__name__}: {e}") from e
    return prop.values


def same_value(a: Any, b: Any) -> bool:
    """Whether two fake values are alike for any op that reads them: tensors of the same dtype,
    device, sizes, strides, offset and requires_grad (symbolic sizes as written); equal numbers."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and a.device == b.device and a.requires_grad == b.requires_grad
                and str(a.shape) == str(b.shape) and str(a.stride()) == str(b.stride())
                and str(a.storage_offset()) == str(b.storage_offset()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a is None or b is None:
        return False
    return type(a) is type(b) and str(a) == str(b)


class _Recorder(FakeTensorProp):
    def __init__(self, gm: fx.GraphModule, mode, unchanged: dict[fx.Node, tuple[Any, dict[str, Any]]]):
        super().__init__(gm, mode)
        self.values: dict[str, Any] = {}
        self.current: fx.Node | None = None
        self.unchanged = unchanged

    def run_node(self, n):
        self.current = n
        before = self.unchanged.get(n) if n.op == "call_function" else None
        if before is not None and all(a.name in before[1] and same_value(self.env[a], before[1][a.name])
                                      for a in n.all_input_nodes):
            out = before[0]
        else:
            out = fx.Interpreter.run_node(self, n)  # FakeTensorProp's own run_node writes meta["val"]
        self.values[n.name] = out
        return out


@register_pass("propagate_shapes", description="recompute shapes and dtypes of every node with fake tensors",
               preserves_semantics=True)
def propagate_shapes(program: Program) -> Program:
    values = fake_values(program)
    for node in program.graph.nodes:
        if node.op not in ("placeholder", "output") and node.name in values:
            node.meta["val"] = values[node.name]
    return program


def check_recorded_shapes(program: Program) -> None:
    """Raise NodeError on the first node whose recorded shape/dtype differs from re-propagation."""
    values = fake_values(program)
    for node in program.graph.nodes:
        recorded, fresh = node.meta.get("val"), values.get(node.name)
        if not isinstance(recorded, torch.Tensor) or not isinstance(fresh, torch.Tensor):
            continue
        if recorded.dtype != fresh.dtype or str(recorded.shape) != str(fresh.shape):
            raise NodeError(node, f"recorded value {recorded.dtype}{list(recorded.shape)} but the graph "
                                  f"computes {fresh.dtype}{list(fresh.shape)}; a pass forgot to update meta['val']")
