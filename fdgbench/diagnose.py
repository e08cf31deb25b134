"""Gradient-quality diagnostics (``--diagnose N``): how far the gradient a
method applies to each stage is from the true one.

Every N iterations, just before each stage's update, the probe compares the
gradient about to be applied to the stage's own parameters (delayed,
beta-scaled, local or synthetic: whatever the method accumulated in
``.grad``) with the true gradient of the same batches' loss at the current
weights of every stage: one extra synchronous forward and backward through
the composed stages, in train mode and the run's precision, that changes no
weight, no ``.grad``, no optimizer state and no BN running statistic (the
buffers are put back through ``.data``, so no stored graph sees a version
change). Recorded per stage: the cosine between the two, the norm ratio
|applied| / |true|, and the age: how many updates this stage made between
the forward of the applied batch and this update (under ``replay`` the
backward recomputes that forward with the current weights, but the gradient
it receives is as old; the age says how old the information is).

The sequential engine calls ``before(t, k, action)`` ahead of every action.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .schedule import Action, Op


class GradientProbe:
    def __init__(self, every: int, workers: Sequence[Any], stream: Any):
        self.every = every
        self.workers = list(workers)
        self.stream = stream
        self.updates = [0] * len(self.workers)  # updates each stage has made
        self._forward_at: list[dict[int, int]] = [{} for _ in self.workers]  # batch -> updates at its forward
        self._pending: list[dict[int, None]] = [{} for _ in self.workers]  # batches back-propagated, in order
        self.records: list[dict[str, Any]] = []

    def before(self, t: int, k: int, action: Action) -> None:
        b, op = action.batch, action.op
        if op is Op.FORWARD:
            self._forward_at[k][b] = self.updates[k]
        elif op in (Op.BACKWARD, Op.LOCAL):
            self._pending[k][b] = None
        elif op is Op.UPDATE:
            batches = list(self._pending[k])
            self._pending[k].clear()
            if batches and t % self.every == 0:
                self.records.append(self.measure(t, k, batches))
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
                logits = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
                loss = last.ctx.loss_fn(logits, labels.to(last.device))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for buf, saved in buffers:
                buf.data.copy_(saved)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
