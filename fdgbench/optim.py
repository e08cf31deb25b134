"""Per-stage SGD.

``write_through_data`` reproduces PyTorch 1.0's optimizer, which updated
``p.data`` in place: autograd does not see that write (``.data`` has its own
version counter), so a graph recorded before the step still runs and reads the
current weights. That is the ``legacy`` staleness mode; the other modes step
the parameters themselves, so modern PyTorch's version checks stay armed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SGDConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


class StageOptimizer:
    def __init__(self, params: list[nn.Parameter], config: SGDConfig, write_through_data: bool = False):
        self.params = [p for p in params if p.requires_grad]
        # The optimizer's own tensors: the parameters, or .data aliases of them.
        self._targets = [p.data for p in self.params] if write_through_data else self.params
        self.write_through_data = write_through_data
        self.sgd = (torch.optim.SGD(self._targets, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, nesterov=config.nesterov)
                    if self.params else None)

    def set_lr(self, lr: float) -> None:
        if self.sgd is not None:
            for group in self.sgd.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict:
        return self.sgd.state_dict() if self.sgd is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sgd is not None:
            self.sgd.load_state_dict(state)

    def lr(self) -> float:
        return self.sgd.param_groups[0]["lr"] if self.sgd is not None else 0.0

    def directions(self) -> list[torch.Tensor | None]:
        """Per parameter, SGD's momentum buffer (the smoothed gradient its
        steps follow: weight decay included, before the learning rate), or
        None before its first step or without momentum."""
        if self.sgd is None:
            return [None] * len(self.params)
        return [self.sgd.state.get(t, {}).get("momentum_buffer") for t in self._targets]

    def step(self) -> None:
        """One SGD step on the accumulated gradients, then clear them.
        Parameters without a gradient are left alone (no decay, no momentum)."""
        if self.sgd is None:
            return
        if self.write_through_data:
            for p, alias in zip(self.params, self._targets):
                alias.grad = p.grad
        self.sgd.step()
        for p, alias in zip(self.params, self._targets):
            p.grad = None
            alias.grad = None


# lr / 10 at epochs 150, 225 and 275 of 300: fractions of the planned iterations.
LR_MILESTONES = (150 / 300, 225 / 300, 275 / 300)


def lr_at(t: int, base_lr: float, planned_steps: int, warmup_steps: int = 0, warmup: str = "constant") -> float:
    """The paper's step schedule; during a warm-up, ``constant``: a tenth of
    it (as the FDG authors' code and He et al.'s ResNet-110 warm up), or
    ``linear``: from 1% of it at iteration 0 rising by equal steps to 100%
    at the warm-up's end (as the ADL code does over its first 5 epochs)."""
    drops = sum(t >= round(f * planned_steps) for f in LR_MILESTONES)
    scheduled = base_lr * 0.1 ** drops
    if t >= warmup_steps:
        return scheduled
    return scheduled * (0.1 if warmup == "constant" else 0.01 + 0.99 * t / warmup_steps)
