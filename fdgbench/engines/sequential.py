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
from torch import nn

from ..diagnose import GradientProbe
from ..data import BatchStream, Normalizer, eval_batches
from ..evaluation import EvalScore, eval_forward, eval_mode
from ..method import Method
from ..schedule import COMPUTE, SENDS, Action, Mailbox, Op, execution_order, message_key
from ..stage import StageWorker
from .compute import run_compute
from .registry import EngineInfo, register_engine
from .trace import Tracer

Observer = Callable[[int, int, Action], None]  # (iteration, stage, action), after it ran


class SequentialEngine:
    is_primary = True  # the one process owns the run directory

    def __init__(self, method: Method, workers: Sequence[StageWorker], stream: BatchStream,
                 observer: Observer | None = None, tracer: Tracer | None = None,
                 stages: Sequence[nn.Module] | None = None, probe: GradientProbe | None = None):
        self.method = method
        self.workers = list(workers)
        self.num_stages = len(self.workers)
        self.stream = stream
        self.observer = observer
        self.tracer = tracer
        self.stages = list(stages) if stages is not None else [w.module for w in self.workers]
        self.probe = probe  # --diagnose: sees every action before it runs (diagnose.py)
        self._mailbox = Mailbox()
        self._messages: dict[tuple, torch.Tensor] = {}
        self._outbox: dict[tuple[int, Op, int], torch.Tensor] = {}

    def run_iteration(self, t: int) -> None:
        plan = self.method.schedule(self.num_stages, t)
        for k, action in execution_order(plan, t, self._mailbox):
            device = self.workers[k].device
            if self.probe is not None:
                self.probe.before(t, k, action)
            start = self.tracer.mark(device) if self.tracer is not None else None
            self._run(k, action)
            if self.tracer is not None:
                self.tracer.record(k, t, action, start, self.tracer.mark(device))
            if self.observer is not None:
                self.observer(t, k, action)

    def _run(self, k: int, action: Action) -> None:
        b, op = action.batch, action.op
        if op in COMPUTE:
            peer = {"act": k - 1, "grad": k + 1}
            produced = run_compute(self.workers[k], k, action, self.stream,
                                   lambda kind: self._messages.pop((kind, peer[kind], k, b), None))
            if produced is not None:
                self._outbox[(k, produced[0], b)] = produced[1]
        elif op in SENDS:
            key = message_key(k, action)
            self._messages[key] = self._outbox.pop((k, op, b)).to(self.workers[key[2]].device)
        elif op is Op.RECV_ACT and self.workers[k].buffers_inputs:  # into the stage's input buffer
            self.workers[k].keep_input(b, self._messages.pop(message_key(k, action)))
        # Otherwise RECV_ACT / RECV_GRAD: nothing to move; the tensor waits in _messages.

    # Read-outs; the distributed engine's twins are collective.
    def train_totals(self) -> torch.Tensor:
        return sum(w.metrics.totals().cpu() for w in self.workers)

    def reset_train_metrics(self) -> None:
        for w in self.workers:
            w.metrics.reset()

    def take_meters(self) -> dict[str, float]:
        return {f"stage{k}_{name}": meter.take() for k, w in enumerate(self.workers) for name, meter in w.meters.items()}

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer) -> dict[str, float]:
        """Test loss and error (%) of the composed stages in eval mode."""
        score = EvalScore()
        with eval_mode(self.stages):
            for x, y in eval_batches(images, labels, normalizer):
                for stage, worker in zip(self.stages, self.workers):
                    x = eval_forward(stage, x, worker.device, worker.ctx.amp_dtype)
                score.add(x, y)
        return score.result()

    def finish(self, next_t: int) -> None:
        """Messages still in flight are dropped with the engine."""

    # Checkpoints (between iterations; checkpoint.py)
    def checkpoint_state(self) -> dict:
        """Every stage's state and the messages in flight (sent, not yet received)."""
        if self._outbox:
            raise RuntimeError("checkpoint taken in the middle of an iteration")
        messages = [{"key": key, "sent_at": sent_at, "latency": latency, "tensor": self._messages[key]}
                    for key, (sent_at, latency) in self._mailbox.pending.items()]
        return {"stages": [w.checkpoint_state() for w in self.workers], "messages": messages}

    def restore_state(self, state: dict) -> None:
        for worker, stage_state in zip(self.workers, state["stages"], strict=True):
            worker.restore_state(stage_state)
        for m in state["messages"]:
            key = tuple(m["key"])
            self._mailbox.pending[key] = (m["sent_at"], m["latency"])
            self._messages[key] = m["tensor"].to(self.workers[key[2]].device)


def _describe(run) -> str:
    replayed = (f", {run.placement.replicas} replicas of each stage replayed shard by shard"
                if run.placement.replicas > 1 else "")
    return f"sequential engine, {torch.get_num_threads()} thread(s){replayed}"


register_engine(EngineInfo(
    "sequential", "every stage in this process, actions in an order the messages allow (reference numerics)",
    per_rank=False, diagnoses=True, describe=_describe,
    build=lambda run: SequentialEngine(run.method, run.workers, run.stream, run.observer, run.tracer, run.stages,
                                       run.probe)))
