"""PipeDream-2BW (Narayanan, Phanishayee, Shi, Chen and Zaharia,
"Memory-Efficient Pipeline-Parallel DNN Training", ICML 2021): double-buffered
weight updates. Each stage keeps two weight versions; a batch's forward and
backward both run on the older one, and its gradient is applied to the
newer, so every update is one step late at every stage:

    W(t+1) = W(t) - lr * grad f_t(W(t-1)),   W(-1) = W(0),

the paper's equation (its section 3.1, with the optimizer's step in place of
plain SGD: momentum and weight decay act on W(t) as in every method here).
Unlike FDG's delays, which grow from the last stage to the first, the delay
is the same (one step) at every stage, and a batch sees one consistent
version through all of them (weight stashing, so no legacy mixing).

What runs here: BP's schedule (batch t through every stage and back in
iteration t) on each stage's previous version, the stage's live weights
stepped with the gradient; that is the update 2BW's 1F1B pipeline computes,
without its timing (micro-batches pipelined across stages), which the suite
does not model for this method yet. The previous version is a second copy of
the stage module sharing its BatchNorm buffers (2 weight versions per stage,
against FDG's stash of 2(K-1-k)+1 batches); it is checkpointed. At K = 1
there is no pipeline and no delay: BP exactly.
"""
from __future__ import annotations

import copy

import torch

from fdgbench.method import register
from fdgbench.staleness import make_store
from fdgbench.stage import StageWorker

from .bp import BP


class TwoVersionWorker(StageWorker):
    """A stage whose forward and backward run on ``previous`` (W(t-1)), a copy
    of the module sharing its buffers, and whose update steps the module (W(t))
    with that gradient, then makes W(t) the previous version."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.previous = copy.deepcopy(self.module)
        for name, buffer in self.module.named_buffers():  # one set of BatchNorm statistics, the live module's
            owner, _, leaf = name.rpartition(".")
            setattr(self.previous.get_submodule(owner) if owner else self.previous, leaf, buffer)
        self.store = make_store("legacy", self.previous, False, ctx.autocast, ctx.amp_dtype)

    def _pairs(self):
        return zip(self.module.parameters(), self.previous.parameters())

    def backward(self, batch, grad):
        x_grad = super().backward(batch, grad)
        for live, old in self._pairs():  # the gradient at W(t-1), to be applied to W(t)
            if old.grad is not None:
                live.grad = old.grad if live.grad is None else live.grad + old.grad
                old.grad = None
        return x_grad

    def update(self) -> None:
        current = [live.detach().clone() for live, _ in self._pairs()]
        super().update()
        with torch.no_grad():
            for (_, old), w in zip(self._pairs(), current):
                old.copy_(w)

    def checkpoint_state(self):
        previous = [old.detach().clone() for _, old in self._pairs()]
        return {**super().checkpoint_state(), "previous_weights": previous}

    def restore_state(self, state):
        super().restore_state(state)
        with torch.no_grad():
            for (_, old), w in zip(self._pairs(), state["previous_weights"], strict=True):
                old.copy_(w)


@register
class PipeDream2BW(BP):
    name = "2bw"
    order = 14
    summary = ("PipeDream-2BW: every stage keeps two weight versions; a batch runs on the older, its gradient "
               "updates the newer (one step late at every stage)")
    breaks = ("forward", "backward", "update")
    single_replica = "its gradient moves between its weight versions outside the replicas' averaging"

    def make_worker(self, ctx):
        return StageWorker(ctx) if ctx.num_stages == 1 else TwoVersionWorker(ctx)
