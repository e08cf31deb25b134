"""DP, data-parallel backpropagation: the time table's other way to use K
workers. Every worker holds the whole model; the batch of B is cut into K
shards of B/K, each worker back-propagates its shard's mean loss and the
gradients are averaged, so the step is BP's on the whole batch except that
BN normalises each shard with its own statistics.

On the distributed engine each rank is a replica and DistributedDataParallel
averages the gradients (its all-reduce overlaps the backward). On the
sequential engine the K shards run one after another through one model,
each with its own forward, loss and backward, and their gradients are
averaged in shard order (fdgbench/replicas.py: the one definition of the
mean both engines compute). BN running statistics (used only for
evaluation) differ: DDP keeps rank 0's, updated by its shard once per step;
the sequential replay updates them with every shard.
"""

from fdgbench.method import register
from fdgbench.replicas import ordered_mean
from fdgbench.stage import StageWorker

from .bp import BP


class ReplicaWorker(StageWorker):
    """One replica (``ctx.replica`` set: this process trains its own shard),
    or all of them in turn (``ctx.replica`` None: the sequential engine)."""

    def forward(self, batch, x, labels):
        shards = zip(x.chunk(self.ctx.replicas), labels.chunk(self.ctx.replicas))
        if self.ctx.replica is not None:  # this process is one replica: its own shard only
            x, labels = list(shards)[self.ctx.replica]
            return super().forward(batch, x, labels)
        self._shards = 0
        for r, (xr, yr) in enumerate(shards):  # each shard's graph is held under (batch, shard)
            super().forward((batch, r), xr, yr)
            self._shards += 1  # fewer than K where the batch is smaller than K (the memory estimate's probes)
        return None

    def backward(self, batch, grad):
        if self.ctx.replica is not None:
            return super().backward(batch, grad)
        params = [p for p in self.module.parameters() if p.requires_grad]
        per_shard = []
        for r in range(self._shards):
            for p in params:
                p.grad = None
            super().backward((batch, r), grad)
            per_shard.append([p.grad for p in params])
        for p, grads in zip(params, zip(*per_shard)):
            p.grad = ordered_mean(grads)
        return None


@register
class DP(BP):
    name = "dp"
    summary = "data-parallel BP: K replicas of the whole model, batch split K ways, gradients averaged"
    data_parallel = True

    def make_worker(self, ctx):
        return ReplicaWorker(ctx)
