"""A stage's compute actions, the part every engine runs the same way; the
engines differ only in how messages travel."""
from __future__ import annotations

from typing import Callable

import torch

from ..data import BatchStream
from ..schedule import Action, Op
from ..stage import StageWorker

# kind ("act" or "grad") -> the received tensor for the action's batch, or None
Received = Callable[[str], "torch.Tensor | None"]


def run_compute(worker: StageWorker, k: int, action: Action, stream: BatchStream,
                received: Received) -> tuple[Op, torch.Tensor] | None:
    """Run FORWARD, BACKWARD, LOCAL or UPDATE on stage k's worker; returns
    (the send it feeds, the tensor) when the action produced one."""
    b, op = action.batch, action.op
    if op is Op.FORWARD:
        if k == 0:
            x, labels = stream.batch(b)
        else:
            x, labels = received("act"), stream.labels(b)
        out = worker.forward(b, x.to(worker.device), labels.to(worker.device))
        return None if out is None else (Op.SEND_ACT, out)
    if op in (Op.BACKWARD, Op.LOCAL):
        x_grad = worker.backward(b, received("grad")) if op is Op.BACKWARD else worker.local_backward(b)
        return None if x_grad is None else (Op.SEND_GRAD, x_grad)
    worker.update()
    return None
