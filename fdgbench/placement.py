"""Where a run executes: K stages x R replicas of each (placement), and how
the replicas of a stage train as one.

A run's workers form a grid. Stage k of replica r is rank ``r * K + k`` on
the distributed engine, so each replica is a pipeline of consecutive ranks
(neighbours are rank - 1 and rank + 1) and replica 0 is ranks 0..K-1. Every
batch of B images is cut into R shards of B/R (``torch.chunk``: shard r is
the r-th slice); replica r trains shard r through its pipeline, its stages
exchanging messages with replica r's neighbours only. At each UPDATE the R
replicas of a stage apply the mean of their gradients, so they keep equal
weights, and the step equals the stage's step on the whole batch except
that batch norm normalises each shard with its own statistics. BN running
statistics (used only for evaluation) stay each replica's own; replica 0's
pipeline scores the test set.

R = 1 is every pipelined method as before. Data-parallel BP (``dp``) is the
other corner: one stage, K replicas (``Method.placement``). Any pipelined
method with R > 1 is the hybrid a user with more GPUs than useful stages
runs (FDG x DP).

The mean is one definition both engines compute, so they agree bit for bit:
``ordered_mean``, (g_0 + g_1 + ... + g_{R-1}) / R added in replica order
(float32 addition is not associative, so "the mean" is one number only when
the order is fixed).

- The sequential engine replays the R shards one after another through one
  copy of each stage (``replay_shards``): every action runs once per shard,
  each shard's gradients accumulate apart, and UPDATE applies their
  ``ordered_mean``. Each replica's buffers (BN running statistics and batch
  counts, its own modules' included) are kept apart too: the module holds
  replica 0's between actions and replica r's only while r's shard runs.
- On the distributed engine each rank is one replica (``sync_replicas``):
  UPDATE all-reduces the stage's gradients over its replica group (one flat
  buffer: a sum, then / R) before stepping. For R = 2 that is
  ``ordered_mean`` exactly (a + b = b + a, and / 2 is exact); for R > 2 the
  all-reduce adds in its own order, which differs in the last bits. With
  ``--deterministic`` every rank gathers all R gradients and adds them in
  replica order instead (R/2 times a ring all-reduce's bytes).

Gradients are combined at UPDATE, not during the backward as
DistributedDataParallel does: a pipelined stage runs several forwards
before their backwards, which DDP's reducer cannot follow, and a stage may
accumulate several backwards (local losses, ADL) into one update. The
all-reduce therefore does not overlap the backward.

Not supported with R > 1 (refused in plan.check_config): methods whose own
nets step outside the stage's update (DNI's synthetic-gradient nets: their
replicas would drift apart), and --diagnose (its probe reads one
accumulated gradient where there are R).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Placement:
    stages: int
    replicas: int = 1

    @property
    def ranks(self) -> int:
        return self.stages * self.replicas

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    def describe(self) -> str:
        return f"{self.stages} stage(s) x {self.replicas} replica(s)"


def ordered_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(t_0 + t_1 + ... + t_{n-1}) / n, added left to right (a new tensor)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total.div_(len(tensors))


class ReplicaStream:
    """Replica r's view of the batch stream: shard r of every batch."""

    def __init__(self, stream: Any, replicas: int, replica: int):
        self._stream, self.replicas, self.replica = stream, replicas, replica
        self.batch_size = stream.batch_size // replicas
        self.steps_per_epoch = stream.steps_per_epoch

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = self._stream.batch(t)
        return x.chunk(self.replicas)[self.replica], labels.chunk(self.replicas)[self.replica]

    def labels(self, t: int) -> torch.Tensor:
        return self._stream.labels(t).chunk(self.replicas)[self.replica]


def replica_groups(placement: Placement, device: torch.device) -> Any:
    """Create every stage's replica group (every rank creates all of them, in
    one order, as torch.distributed requires) and use this rank's once, so
    its connections exist before training (the groups are disjoint: no rank
    waits on another group); returns this rank's group."""
    mine = None
    for k in range(placement.stages):
        group = dist.new_group([placement.rank_of(k, r) for r in range(placement.replicas)])
        if placement.stage_of(dist.get_rank()) == k:
            mine = group
    dist.all_reduce(torch.ones(1, device=device), group=mine)
    return mine


def trained_parameters(worker: Any) -> list[torch.nn.Parameter]:
    """The parameters a worker's UPDATE steps: its stage's and those of the
    method's own modules that step with it (StageWorker.add_local)."""
    params = [p for p in worker.module.parameters() if p.requires_grad]
    for local in worker.locals.values():
        if local.steps_with_stage:
            params += [p for p in local.module.parameters() if p.requires_grad]
    return params


def replica_buffers(worker: Any) -> list[tuple[nn.Module, str]]:
    """Where the buffers each replica keeps its own live (BN running
    statistics and batch counts), as (module, buffer name): the stage's and
    those of the method's own modules."""
    modules = [worker.module, *(local.module for local in worker.locals.values())]
    return [(m, name) for top in modules for m in top.modules() for name, b in m._buffers.items() if b is not None]


def steps_outside_update(worker: Any) -> list[str]:
    """The worker's own modules that step outside its UPDATE (their replicas
    could not be kept equal)."""
    return [name for name, local in worker.locals.items() if not local.steps_with_stage]


class _ShardReplay:
    """Mixed into a method's worker class by ``replay_shards``: the R replicas
    of one stage, replayed shard after shard through one module."""

    replicas: int
    # Replicas 1..R-1's buffers (replica 0's live in the modules); set by replay_shards.
    _other_buffers: list[list[torch.Tensor]]

    def _replica_grads(self) -> list[list[torch.Tensor | None]]:
        grads = self.__dict__.get("_grads")
        if grads is None:
            grads = self._grads = [[None] * len(trained_parameters(self)) for _ in range(self.replicas)]
        return grads

    @contextlib.contextmanager
    def _as_replica(self, r: int) -> Iterator[None]:
        """Run an action as replica r: its own gradients accumulate in .grad,
        and for r > 0 its own buffers are in the modules and its meters'
        readings are dropped (the distributed engine records replica 0's)."""
        params, grads = trained_parameters(self), self._replica_grads()
        for p, g in zip(params, grads[r]):
            p.grad = g
        meters = self.meters
        if r > 0:
            _swap(replica_buffers(self), self._other_buffers[r - 1])
            self.meters = {name: type(meter)() for name, meter in meters.items()}
        try:
            yield
        finally:
            grads[r] = [p.grad for p in params]
            for p in params:
                p.grad = None
            if r > 0:
                _swap(replica_buffers(self), self._other_buffers[r - 1])
                self.meters = meters

    def _each_shard(self, action, batch, *tensors: torch.Tensor | None) -> torch.Tensor | None:
        """``action((batch, r), *shard r of tensors)`` for every replica r
        (each batch's state is kept under (batch, r)); the outputs joined."""
        shards = [t.chunk(self.replicas) if t is not None else None for t in tensors]
        count = min((len(s) for s in shards if s is not None), default=self.replicas)  # a batch < R: fewer
        outs = []
        for r in range(count):
            with self._as_replica(r):
                outs.append(action((batch, r), *[s[r] if s is not None else None for s in shards]))
        return None if outs[0] is None else torch.cat(outs)

    def forward(self, batch, x, labels):
        return self._each_shard(super().forward, batch, x, labels)

    def backward(self, batch, grad):
        return self._each_shard(super().backward, batch, grad)

    def local_backward(self, batch):
        return self._each_shard(super().local_backward, batch)

    def update(self) -> None:
        grads = self._replica_grads()
        for i, p in enumerate(trained_parameters(self)):
            present = [g[i] for g in grads if g[i] is not None]
            p.grad = ordered_mean(present) if present else None
        self._grads = None
        super().update()

    def checkpoint_state(self) -> dict[str, Any]:
        # Between iterations: each replica's gradients accumulated for a later update (ADL).
        # Replica 0's buffers are in the stage's state; replicas 1..R-1's beside it.
        return {**super().checkpoint_state(), "replica_grads": self._replica_grads(),
                "replica_buffers": self._other_buffers}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self._grads = [[None if g is None else g.to(self.device) for g in grads] for grads in state["replica_grads"]]
        self._other_buffers = [[b.to(self.device).clone() for b in saved] for saved in state["replica_buffers"]]


def _swap(slots: Sequence[tuple[nn.Module, str]], kept: list[torch.Tensor]) -> None:
    """Exchange the modules' buffers at ``slots`` with the tensors in ``kept``.
    The tensor objects are exchanged, not their values: a batch norm's graph
    saves its running statistics, and writing into them would invalidate
    the graph of a batch still held for a delayed backward."""
    for i, (module, name) in enumerate(slots):
        module._buffers[name], kept[i] = kept[i], module._buffers[name]


class _ReplicaSync:
    """Mixed into a method's worker class by ``sync_replicas``: this rank is
    one replica of its stage; UPDATE applies the replicas' mean gradient."""

    replica_group: Any
    deterministic: bool

    def update(self) -> None:
        grads = [p.grad for p in trained_parameters(self) if p.grad is not None]
        replicas = dist.get_world_size(self.replica_group)
        for dtype in dict.fromkeys(g.dtype for g in grads):  # one flat message per dtype
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            if self.deterministic:
                parts = [torch.empty_like(flat) for _ in range(replicas)]
                dist.all_gather(parts, flat, group=self.replica_group)
                flat = ordered_mean(parts)
            else:
                dist.all_reduce(flat, group=self.replica_group)
                flat.div_(replicas)
            # A blocking collective makes the current (compute) stream wait for NCCL's, so on GPUs the copies
            # below, queued on the compute stream, read the finished mean.
            offset = 0
            for g in same:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        super().update()


_CLASSES: dict[tuple[type, type], type] = {}


def _mixed(mixin: type, cls: type) -> type:
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{cls.__name__}{mixin.__name__}", (mixin, cls), {})
    return _CLASSES[key]


def replay_shards(worker: Any, replicas: int) -> Any:
    """``worker`` (any method's) as R replicas replayed one after another
    (the sequential engine's placement of R > 1)."""
    worker.__class__ = _mixed(_ShardReplay, type(worker))
    worker.replicas = replicas
    # Every replica starts from the same buffers, as every rank does on the distributed engine.
    worker._other_buffers = [[m._buffers[name].clone() for m, name in replica_buffers(worker)]
                             for _ in range(replicas - 1)]
    return worker


def sync_replicas(worker: Any, group: Any, deterministic: bool) -> Any:
    """``worker`` (any method's) as one replica whose UPDATE averages over
    ``group`` (the distributed engine's placement of R > 1)."""
    worker.__class__ = _mixed(_ReplicaSync, type(worker))
    worker.replica_group, worker.deterministic = group, deterministic
    return worker
