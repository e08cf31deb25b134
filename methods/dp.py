"""DP, data-parallel backpropagation: the time table's other way to use K
workers. Every worker holds the whole model; the batch of B is cut into K
shards of B/K, each worker back-propagates its shard's mean loss and the
gradients are averaged, so the step is BP's on the whole batch except that
BN normalises each shard with its own statistics.

On the distributed engine each rank is a replica and DistributedDataParallel
averages the gradients (its all-reduce overlaps the backward). On the
sequential engine the K shards run one after another through one model and
the mean of their losses is back-propagated: the same gradient, summed in a
different order. BN running statistics (used only for evaluation) differ:
DDP keeps rank 0's, updated by its shard once per step; the sequential
replay updates them with every shard.
"""
from dataclasses import replace

import torch
from torch import nn

from fdgbench.method import register
from fdgbench.stage import StageWorker

from .bp import BP


class ShardedForward(nn.Module):
    """All K replicas in one process: each shard goes through the model on
    its own (its own BN batch statistics), the outputs are concatenated."""

    def __init__(self, module: nn.Module, shards: int):
        super().__init__()
        self.module, self.shards = module, shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.module(part) for part in x.chunk(self.shards)])


class ReplicaWorker(StageWorker):
    def __init__(self, ctx):
        if ctx.replica is None:
            ctx = replace(ctx, module=ShardedForward(ctx.module, ctx.replicas))
        super().__init__(ctx)

    def forward(self, batch, x, labels):
        if self.ctx.replica is not None:  # this process is one replica: its own shard only
            x = x.chunk(self.ctx.replicas)[self.ctx.replica]
            labels = labels.chunk(self.ctx.replicas)[self.ctx.replica]
        return super().forward(batch, x, labels)


@register
class DP(BP):
    name = "dp"
    summary = "data-parallel BP: K replicas of the whole model, batch split K ways, gradients averaged"
    data_parallel = True

    def make_worker(self, ctx):
        return ReplicaWorker(ctx)
