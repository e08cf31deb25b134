"""The sequential engine: every stage in one process, reference numerics.

Each iteration's actions run in an order the schedule's messages allow
(schedule.execution_order, which also validates the iteration). A message is
the tensor itself, moved to the receiving stage's device when sent; receives
are bookkeeping only, since the order already guarantees the message exists.
Stages may sit on different devices.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data import BatchStream
from ..method import Method
from ..schedule import Action, Mailbox, Op, execution_order, message_key
from ..stage import StageWorker

Observer = Callable[[int, int, Action], None]  # (iteration, stage, action), after it ran


class SequentialEngine:
    def __init__(self, method: Method, workers: Sequence[StageWorker], stream: BatchStream,
                 observer: Observer | None = None):
        self.method = method
        self.workers = list(workers)
        self.num_stages = len(self.workers)
        self.stream = stream
        self.observer = observer
        self._mailbox = Mailbox()
        self._messages: dict[tuple, torch.Tensor] = {}
        self._outbox: dict[tuple[int, Op, int], torch.Tensor] = {}

    def run_iteration(self, t: int) -> None:
        plan = self.method.schedule(self.num_stages, t)
        for k, action in execution_order(plan, t, self._mailbox):
            self._run(k, action)
            if self.observer is not None:
                self.observer(t, k, action)

    def _run(self, k: int, action: Action) -> None:
        worker, b, op = self.workers[k], action.batch, action.op
        if op is Op.FORWARD:
            if k == 0:
                x, labels = self.stream.batch(b)
            else:
                x, labels = self._messages.pop(("act", k - 1, k, b)), self.stream.labels(b)
            out = worker.forward(b, x.to(worker.device), labels.to(worker.device))
            if out is not None:
                self._outbox[(k, Op.SEND_ACT, b)] = out
        elif op in (Op.BACKWARD, Op.LOCAL):
            if op is Op.BACKWARD:
                x_grad = worker.backward(b, self._messages.pop(("grad", k + 1, k, b), None))
            else:
                x_grad = worker.local_backward(b)
            if x_grad is not None:
                self._outbox[(k, Op.SEND_GRAD, b)] = x_grad
        elif op is Op.UPDATE:
            worker.update()
        elif op in (Op.SEND_ACT, Op.SEND_GRAD):
            key = message_key(k, action)
            self._messages[key] = self._outbox.pop((k, op, b)).to(self.workers[key[2]].device)
        # RECV_ACT / RECV_GRAD: nothing to move; the tensor waits in _messages.
