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
    # A memory probe (memory.py), where the trainer set one, stands in for the worker to record what it keeps.
    runner = worker if worker.memory_probe is None else worker.memory_probe
    if op is Op.FORWARD:
        if k == 0:
            x, labels = stream.batch(b)
        elif action.source is not None:  # an activation the stage kept in its input buffer
            x, labels = worker.kept_input(action.source), stream.labels(b)
        else:
            x, labels = received("act"), stream.labels(b)
        if worker.needs_input_image:  # batch b's images as stage 0 receives them (a reconstruction target)
            worker.set_input_image(b, (x if k == 0 else stream.batch(b)[0]).to(worker.device))
        out = runner.forward(b, x.to(worker.device), labels.to(worker.device))
        return None if out is None else (Op.SEND_ACT, out)
    if op in (Op.BACKWARD, Op.LOCAL):
        x_grad = runner.backward(b, received("grad")) if op is Op.BACKWARD else runner.local_backward(b)
        return None if x_grad is None else (Op.SEND_GRAD, x_grad)
    runner.update()
    return None
