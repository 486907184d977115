"""Imported once, by `meshc.launch`'s forkserver (by name: the runtime builds no graph itself): a
tiny capture on 'meta', so every rank forked from the server starts with torch.export initialised.

A process's first capture pays lazy set-up that later ones skip (torch's export, dynamo and
functorch modules, fake-tensor and symbolic-shape state): about 1.5 s on a 2-core CPU, per rank,
per launch. The server pays it once. The capture runs on 'meta' only — no kernel runs, so no
thread pool starts before the server forks (OpenMP pools do not survive a fork). If it fails,
ranks simply start cold.
"""

from __future__ import annotations

import torch


class _Tiny(torch.nn.Module):
    """What decoders use: a linear, a reshape, a dtype cast, attention, a norm."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        h = self.proj(x).reshape(x.shape[0], x.shape[1], 2, 4).transpose(1, 2).to(torch.float32)
        return self.norm(torch.nn.functional.scaled_dot_product_attention(h, h, h, is_causal=True)
                         .transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))


def _warm_up() -> None:
    from meshc.capture import capture

    with torch.device("meta"):
        model, x = _Tiny(), torch.empty(2, 4, 8)
    capture(model, (x,), dynamic_shapes="auto")


try:
    _warm_up()
except Exception:  # noqa: BLE001 - an optimisation only: ranks then start cold
    pass
