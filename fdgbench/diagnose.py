"""Gradient-quality diagnostics (``--diagnose N``): how far the gradient a
method applies to each stage is from the true one.

Every N iterations (the first update of each stage at or after each
multiple of N), just before the update, the probe compares the gradient
about to be applied to the stage's own parameters (delayed, beta-scaled,
local or synthetic: whatever the method accumulated in ``.grad``) with the
true gradient of the same batches' loss at the current weights of every
stage: one extra synchronous forward and backward through the composed
stages, in train mode and the run's precision, that changes no weight, no
``.grad``, no optimizer state and no BN running statistic (the buffers are
put back through ``.data``, so the restore bumps no version counter a stored
graph checks). Recorded per stage: the cosine between the two, the norm
ratio |applied| / |true|, and the age: how many updates this stage made
between the forward of the applied batch and this update. Under ``replay``
the backward recomputes that forward with the current weights, but the
gradient it receives is as old; the age says how old the information is.
Under FDG stage k's age is 2(K-1-k) - 1: its forward follows the update of
its own iteration.

For ``dp`` (K replicas of one stage) the applied gradient is the mean over
shards, each normalised by its own BN statistics, while the true one here
runs the whole batch: a cosine below 1 there measures the shards' BN, not
staleness. A diagnosed run's timings include the extra passes.

The sequential engine calls ``before(t, k, action)`` ahead of every action.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .schedule import Action, Op
from .stage import upcast_half


class GradientProbe:
    def __init__(self, every: int, workers: Sequence[Any], stream: Any):
        self.every = every
        self.workers = list(workers)
        self.stream = stream
        self.updates = [0] * len(self.workers)  # updates each stage has made
        self._forward_at: list[dict[int, int]] = [{} for _ in self.workers]  # batch -> updates at its forward
        self._pending: list[dict[int, None]] = [{} for _ in self.workers]  # batches back-propagated, in order
        # The first update of each stage at or after every multiple of N is measured (a stage
        # that updates every M-th iteration, ADL's, would otherwise never meet t % N == 0).
        self._due = [0] * len(self.workers)
        self._skip = [False] * len(self.workers)
        self.records: list[dict[str, Any]] = []

    def restored(self) -> None:
        """After a checkpoint restore: each stage's next update may apply
        gradients of batches forwarded before it (or, ADL, accumulated
        before it), which this probe did not see; it is not measured."""
        self._skip = [True] * len(self.workers)

    def before(self, t: int, k: int, action: Action) -> None:
        b, op = action.batch, action.op
        if op is Op.FORWARD:
            self._forward_at[k][b] = self.updates[k]
        elif op in (Op.BACKWARD, Op.LOCAL):
            self._pending[k][b] = None
        elif op is Op.UPDATE:
            # Only batches forwarded since their last update feed this one: a BACKWARD that
            # comes after the update of its batch (DNI's fit of its gradient model) adds
            # nothing to the stage's .grad.
            batches = [b for b in self._pending[k] if b in self._forward_at[k]]
            self._pending[k].clear()
            if batches and t >= self._due[k] and not self._skip[k]:
                self.records.append(self.measure(t, k, batches))
                self._due[k] = (t // self.every + 1) * self.every
            self._skip[k] = False
            self.updates[k] += 1
            for b in batches:
                self._forward_at[k].pop(b, None)

    def take(self) -> list[dict[str, Any]]:
        """The records since the last take (an epoch's, for its metrics line)."""
        out, self.records = self.records, []
        return out

    def measure(self, t: int, k: int, batches: list[int]) -> dict[str, Any]:
        params = [p for p in self.workers[k].module.parameters() if p.requires_grad]
        applied = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        true = sum(_flat(self.true_gradient(b, params)) for b in batches)
        dot = float(torch.dot(applied, true))
        applied_norm, true_norm = float(applied.norm()), float(true.norm())
        ages = [self.updates[k] - self._forward_at[k].get(b, self.updates[k]) for b in batches]
        return {"iteration": t, "stage": k, "batches": batches,
                "cosine": dot / (applied_norm * true_norm) if applied_norm and true_norm else float("nan"),
                "norm_ratio": applied_norm / true_norm if true_norm else float("nan"),
                "age": sum(ages) / len(ages)}

    def true_gradient(self, batch: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """d loss(batch) / d params through every stage at the current weights."""
        x, labels = self.stream.batch(batch)
        buffers = [(buf, buf.detach().clone()) for w in self.workers for buf in w.module.buffers()]
        try:
            with torch.enable_grad():
                h = x
                for w in self.workers:
                    with w.ctx.autocast():
                        h = w.module(h.to(w.device))
                last = self.workers[-1]
                loss = last.ctx.loss_fn(upcast_half(h), labels.to(last.device))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for buf, saved in buffers:
                buf.data.copy_(saved)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
