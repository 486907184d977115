"""Zero-bubble's W: weight gradients from the gradient of each weight reader's output.

Entry point: `weight_grads(reader, argvals, dq) -> {placeholder: grad} | None`. The stage graphs
return each reader's output and arguments (the `weight_grad_outputs` pass made them so); I asks
autograd for the stage inputs' gradients and for dq of every reader (graph kept); W then computes
each weight's gradient from (dq, the reader's saved arguments) with the formula in `VJPS` - the
weight-gradient matmuls only, no second pass over the stage - or, for an op without a formula,
with autograd on that one reader. Arithmetic on tensors only: no graph is built here.
"""

from __future__ import annotations

import torch
from meshc.stages import Reader

aten = torch.ops.aten


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.sum_to_size(like.shape) if t.shape != like.shape else t


def _linear(a, dq, pos):  # y = x w^T (+ b)
    d = dq.reshape(-1, dq.shape[-1])
    if pos == 1:
        return d.t() @ a[0].reshape(-1, a[0].shape[-1])
    return d.sum(0) if pos == 2 else None


def _addmm(a, dq, pos):  # y = b + x w
    return a[1].t() @ dq if pos == 2 else _sum_to(dq, a[0]) if pos == 0 else None


def _mm(a, dq, pos):  # y = x w
    return a[0].t() @ dq if pos == 1 else None


def _mul(a, dq, pos):  # y = u v
    other = a[1 - pos]
    return _sum_to(dq * other, a[pos])


def _add(a, dq, pos):  # y = u + v
    return _sum_to(dq, a[pos])


def _embedding(a, dq, pos):  # y = w[ids]; padding_idx rows get no gradient
    if pos != 0 or (len(a) > 3 and a[3]):  # scale_grad_by_freq: no formula here
        return None
    w, ids = a[0], a[1]
    d, idx = dq.reshape(-1, w.shape[1]), ids.reshape(-1)
    pad = a[2] if len(a) > 2 else -1
    if pad >= 0:
        keep = idx != pad
        d, idx = d[keep], idx[keep]
    return torch.zeros_like(w).index_add_(0, idx, d)


def _layer_norm(a, dq, pos):  # y = norm(x) w + b over the trailing normalized_shape dims
    x, shape = a[0], list(a[1])
    lead = tuple(range(dq.dim() - len(shape)))
    if pos == 3:
        return dq.sum(lead)
    if pos == 2:
        return (dq * torch.nn.functional.layer_norm(x, shape, eps=a[4] if len(a) > 4 else 1e-5)).sum(lead)
    return None


#: reader op -> its weight-gradient formula (args, dq, position of the weight) -> grad or None
VJPS = {aten.linear.default: _linear, aten.addmm.default: _addmm, aten.mm.default: _mm,
        aten.mul.Tensor: _mul, aten.add.Tensor: _add, aten.embedding.default: _embedding,
        aten.layer_norm.default: _layer_norm}


def weight_grads(reader: Reader, argvals: list, dq: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """{placeholder name: gradient} of the reader's weights, or None when no formula applies."""
    rule = VJPS.get(reader.target)
    if rule is None or reader.kwargs:
        return None
    args = [argvals[a[1]] if isinstance(a, tuple) and a[:1] == ("slot",) else a for a in reader.args]
    out: dict[str, torch.Tensor] = {}
    for pos, name in reader.weights:
        g = rule(args, dq, pos)
        if g is None:
            return None
        out[name] = out[name] + g if name in out else g
    return out
