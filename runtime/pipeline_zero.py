"""ZeRO stages 1 and 2 on the pipeline runtime's dp dim (`compile(mesh 'dp=2,pp=2', training=True, zero=N)`).

Entry point: `PipelineZero(params, stage, mesh, rank)`, which `PipelineModel` makes when compiled
with zero=1/2. Each dp rank updates only its flat block of every local parameter
(`meshc.redistribute.flat_block`, padded to a multiple of dp):

    stage  after a train_step's backward                    optimizer step
    1      gradient all-reduced over dp (as zero=0), .grad  this rank's block of .grad, then all-gather
    2      gradient reduce-scattered over dp: only the      the block's gradient is already there;
           block's gradient is kept (`block_grads`)         then all-gather

`make_optimizer(cls, **options)` returns a `cls` over the blocks (views into the parameters, so the
update lands in them) whose step ends with one bucketed all-gather of the updated blocks into the
full parameters that the next forward reads. Optimizer state is therefore 1/dp per rank at both
stages; gradients are 1/dp after the step at stage 2. Collectives name the group the runtime
bound (`MeshSpec.group_name`), as the dp/tp Trainer's do. Never builds or rewrites a graph.
"""

from __future__ import annotations

from typing import Any

import torch
from meshc.mesh import DP
from meshc.redistribute import c10d, flat_block, flat_shard, pad_flat
from meshc.runtime.training import gather_blocks


class PipelineZero:
    def __init__(self, params: list[torch.Tensor], stage: int, mesh, rank: int):
        self.params, self.stage = params, stage  # unique trainable leaves of this rank's stages
        self.dp, self.coord, self.group = mesh.dp, mesh.coord(rank, DP), mesh.group_name(DP)
        self.blocks = [torch.nn.Parameter(flat_block(p.detach(), self.dp, self.coord, view=True)) for p in params]
        self.block_grads: dict[int, torch.Tensor] = {}  # stage 2: id(param) -> this rank's gradient block

    def reduce_scatter(self, grads: dict[int, torch.Tensor]) -> None:
        """Stage 2: each summed-over-dp gradient's block (the mean over replicas), accumulated."""
        c = c10d()
        for p in self.params:
            g = grads.pop(id(p), None)
            g = torch.zeros_like(p) if g is None else g
            flat = pad_flat(g.detach(), flat_shard(g.numel(), self.dp)[0])
            mine = c.wait_tensor(c.reduce_scatter_tensor(flat, "sum", self.dp, self.group)) / self.dp
            mine = mine[:flat_block(p, self.dp, self.coord, view=True).numel()]
            self.block_grads[id(p)] = mine if id(p) not in self.block_grads else self.block_grads[id(p)] + mine

    def make_optimizer(self, cls: type, **options: Any) -> torch.optim.Optimizer:
        zero = self

        def zero_grad(opt, set_to_none: bool = True) -> None:
            cls.zero_grad(opt, set_to_none)
            zero.block_grads.clear()
            for p in zero.params:
                p.grad = None

        opt = type(f"ZeRO{self.stage}{cls.__name__}", (cls,), {"zero_grad": zero_grad})(self.blocks, **options)
        opt.register_step_pre_hook(lambda *_: self._before_step())
        opt.register_step_post_hook(lambda *_: gather_blocks(list(zip(self.blocks, self.params)), self.dp,
                                                             self.group))
        return opt

    def _before_step(self) -> None:
        for p, block in zip(self.params, self.blocks):
            if self.stage == 1 and p.grad is not None:
                block.grad = flat_block(p.grad.contiguous(), self.dp, self.coord, view=True).clone()
                p.grad = None
            elif self.stage == 2 and id(p) in self.block_grads:
                block.grad = self.block_grads.pop(id(p))
