"""Synchronous micro-batched pipelines with exact gradients: GPipe (Huang
et al., NeurIPS 2019) and 1F1B (PipeDream-Flush, Narayanan et al., ICML
2021), the schedules ``torch.distributed.pipelining`` ships as
``ScheduleGPipe`` and ``Schedule1F1B``.

Each batch of B is split into M = ``--microbatches`` micro-batches of B / M;
every stage forwards and back-propagates all M in the iteration, the
gradients accumulate, and every stage steps once: BP's update on the whole
batch up to the order of the floating-point sums. The last stage's loss of a
micro-batch is its mean cross-entropy divided by M (so the M micro-batch
gradients add up to the whole batch's mean), what the library's
``scale_grads`` does after the backward; the training loss recorded is the
batch's. BatchNorm sees micro-batches: batch statistics over B / M samples
and M running-statistic updates per iteration, as under the library (it has
no deferred BatchNorm); M = 1 is BP exactly.

The schedule (which batch each stage forwards and back-propagates in
iteration t) is BP's: the pipeline drains every iteration, so nothing is in
flight at a checkpoint. Within a stage the micro-batches run in order, the
backward of micro-batch 0 first, on every engine here; GPipe and 1F1B differ
only in when each stage runs which micro-batch, which changes the time and
the memory held (GPipe holds M micro-batches' graphs, 1F1B at most K - k on
stage k), not the numbers. The library's own schedules, running these
stages through ``torch.distributed.pipelining``, are the next step (issue 19).
"""
from __future__ import annotations

import torch

from fdgbench.method import MethodOption, at_least_one, register
from fdgbench.stage import StageWorker, upcast_half

from .bp import BP

MICROBATCHES = MethodOption("microbatches", int, 2, "micro-batches M per batch (M >= 1, dividing the batch; 1 is BP)",
                            check=at_least_one)


class MicroBatchWorker(StageWorker):
    """A stage that forwards and back-propagates a batch as ``microbatches``
    micro-batches, each with its own graph, the gradients accumulating."""

    def __init__(self, ctx, microbatches: int):
        super().__init__(ctx)
        self.microbatches = self.probe_batch_multiple = microbatches
        self._parts_of: dict[int, int] = {}  # batch -> micro-batches its forward made

    def _parts(self, n: int) -> int:
        # A run's batch is a multiple of M (GPipe.check_run); the memory estimate probes batches of 2 and 4.
        return min(self.microbatches, n)

    def forward(self, batch, x, labels):
        parts = self._parts_of[batch] = self._parts(x.shape[0])
        outs = []
        for m, (xm, ym) in enumerate(zip(x.tensor_split(parts), labels.tensor_split(parts))):
            # Each micro-batch's input a leaf of its own, so its gradient is its own (store.backward returns it).
            xm = xm.detach().requires_grad_(self.input_grad)
            out = self.store.forward((batch, m), xm)
            if self.ctx.is_last:
                loss = self.ctx.loss_fn(upcast_half(out), ym)
                self.store.set_root((batch, m), loss / parts)
                self.metrics.add(loss, out, ym)
            else:
                outs.append(out.detach())
        return None if self.ctx.is_last else torch.cat(outs)

    def backward(self, batch, grad):
        if grad is not None and self.grad_scale != 1.0:
            grad = grad * self.grad_scale
        parts = self._parts_of.pop(batch)
        grads = grad.tensor_split(parts) if grad is not None else [None] * parts
        x_grads = [self.store.backward((batch, m), g) for m, g in enumerate(grads)]
        return torch.cat(x_grads) if self.input_grad else None


@register
class GPipe(BP):
    name = "gpipe"
    order = 12
    summary = ("GPipe: every batch as M micro-batches through every stage, gradients accumulated, one update "
               "(BP's up to summation order; BatchNorm sees micro-batches)")
    breaks = ()
    options = (MICROBATCHES,)
    pipeline_schedule = "gpipe"  # the schedule class `--engine pipelining` runs (engines/pipelining.py)

    def check_run(self, num_stages: int, batch_size: int) -> str | None:
        if batch_size % self.microbatches:
            return f"--microbatches {self.microbatches} does not divide the batch of {batch_size}"
        return None

    def make_worker(self, ctx):
        return MicroBatchWorker(ctx, self.microbatches)


@register
class OneFOneB(GPipe):
    name = "1f1b"
    order = 13
    summary = ("1F1B (PipeDream-Flush): GPipe's micro-batches and numbers, each stage alternating forwards and "
               "backwards so it holds fewer micro-batches")
    pipeline_schedule = "1f1b"
