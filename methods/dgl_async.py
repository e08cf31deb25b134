"""Asynchronous DGL with a replay buffer (Belilovsky, Eickenberg and Oyallon,
"Decoupled Greedy Learning of CNNs", ICML 2020, section "Asynchronous DGL
with replay buffer"), after the authors' code
(github.com/eugenium/DGL at 4cc7c17, ``buffer_experiments/cifar_buffer.py``,
class ``Buffer``).

Every stage trains as DGL's do (its auxiliary classifier's cross-entropy,
nothing crossing a boundary), but a stage k > 0 does not wait for stage k-1:
every activation stage k-1 sends lands in stage k's buffer, a circular one
of the ``--buffer M`` most recent minibatch activations (with their labels),
and whenever stage k steps it forwards one entry of it, chosen as the
authors' ``priority_lifo`` sampling intends: the entry used the fewest times,
the newest among those, whose use count then grows by one. Entries are
never recomputed at newer weights, only overwritten, so a slow stage's
successor trains on stale activations, reused, rather than stalling.

Slow workers (``--slowdown s``, ``--slow-stage j``): every stage steps in
every iteration except stage j, which steps in an iteration with
probability 1/s, by a draw that is a fixed function of the iteration (the
same on every engine and every rerun; stage j steps on average every s
iterations, s = 1 / (1 - noise) of the authors' ``--noise`` / ``--layer_noise``;
their README's example is noise 0.1, s = 1.11). A strictly periodic
slowdown (every s-th iteration) would make M irrelevant: the successor
would always find exactly one unused entry, the newest, and reuse it s
times; it is the irregular pace that fills and drains the buffer. Stage 0
takes the next training batch whenever it steps.

The schedule names every forward by the iteration and the stage that ran
it, batch id 1024 t + k (so a stage forwards each id once); the training
batch behind it (``data_batch``) comes from replaying the buffers' use
counts, which depend only on which stages stepped when, so the schedule, the
engines and a resumed run agree on it. A forward from the buffer is
``FORWARD(id, source=the id the activation was received as)``. With
``--slowdown 1`` (the default) every stage steps in every iteration and
reads the activation sent in the previous one: the numbers are pipelined
DGL's (tested), whatever M.

Departures (docs/faithfulness.md): the authors pick one module per
iteration at random (each module's rate 1, the slow one's 1 - noise) and
train every module for the same number of steps, the run lasting longer;
here every stage is a worker of its own stepping once per iteration, the
slow one less often, so in a run of N iterations it steps about N / s
times. Their ``Buffer`` compares use counts with ``>`` where the newest
least-used entry needs ``>=`` (once the buffer is full their sampler prefers
the oldest entry among the least used); this follows the documented intent.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fdgbench.method import Method, MethodOption, at_least_one, register
from fdgbench.schedule import Action, Op
from fdgbench.stage import StageWorker

from .dgl import LocalLossWorker

ID_STRIDE = 1024  # batch id = ID_STRIDE * iteration + stage; K is at most this
KEPT_ITERATIONS = 4096  # how far back the replayed buffers' record reaches before it is dropped (and replayed again)


def _slowdown_check(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 1 else f"must be at least 1 (1: no slow stage), got {value}"


def _stage_check(value: int) -> str | None:
    return None if value >= 0 else f"must be at least 0, got {value}"


BUFFER = MethodOption("buffer", int, 30, "activations each stage keeps from its predecessor (M >= 1; the authors' "
                      "README example: 30)", check=at_least_one)
SLOWDOWN = MethodOption("slowdown", float, 1.0, "the slow stage steps in an iteration with probability 1/s "
                        "(s >= 1; 1: no slow stage; the authors' --noise 0.1 is 1.11)", check=_slowdown_check)
SLOW_STAGE = MethodOption("slow_stage", int, 0, "which stage --slowdown slows (0-based; the authors' --layer_noise)",
                          check=_stage_check)


def forward_id(k: int, t: int) -> int:
    return ID_STRIDE * t + k


@dataclass
class Entry:
    """One buffered activation: the id it was sent as, its training batch, how often it was read."""

    source: int
    data_batch: int
    uses: int = 0


@dataclass
class StageReplay:
    """The buffer of one stage, replayed iteration by iteration: what it
    forwarded at each iteration so far (None: nothing), as (source, data batch)."""

    forwards: list[tuple[int | None, int] | None] = field(default_factory=list)  # from iteration ``first`` on
    first: int = 0  # the iteration of forwards[0]: older ones are dropped as the run goes on (prune)
    buffer: list[Entry] = field(default_factory=list)
    batches_taken: int = 0  # stage 0: training batches forwarded so far

    @property
    def next_t(self) -> int:
        return self.first + len(self.forwards)

    def at(self, t: int) -> tuple[int | None, int] | None:
        return self.forwards[t - self.first]


def pick(buffer: list[Entry]) -> Entry:
    """``priority_lifo``: the least-used entry, the newest among equals."""
    fewest = min(e.uses for e in buffer)
    return [e for e in buffer if e.uses == fewest][-1]


@register
class AsyncDGL(Method):
    name = "dgl-async"
    order = 52
    summary = ("DGL without waiting: every stage reads its input from a replay buffer of its predecessor's recent "
               "activations, so a slow stage (--slowdown) does not stall the next")
    breaks = ("forward", "backward", "update")
    options = (BUFFER, SLOWDOWN, SLOW_STAGE)
    single_replica = "its buffers are per worker"

    def __init__(self, **values):
        super().__init__(**values)
        self._replays: list[StageReplay] = []

    def check_run(self, num_stages: int, batch_size: int) -> str | None:
        if self.slow_stage >= num_stages:
            return f"--slow-stage {self.slow_stage} is not a stage of K={num_stages} (0..{num_stages - 1})"
        if num_stages > ID_STRIDE:
            return f"runs at most K={ID_STRIDE} stages"
        return None

    def steps(self, k: int, t: int) -> bool:
        """Whether stage k steps at iteration t (if it has an input)."""
        if k != self.slow_stage or self.slowdown == 1:
            return True
        return random.Random(t).random() < 1 / self.slowdown  # Random(int) is the same draw on every platform

    def _forward(self, k: int, t: int) -> tuple[int | None, int] | None:
        """(source id or None at stage 0, training batch) of stage k's forward at iteration t, or None."""
        if t < 0:
            return None
        if any(t < replay.first for replay in self._replays[:k + 1]):  # dropped: replay from the start
            self._replays.clear()
        while len(self._replays) <= k:
            self._replays.append(StageReplay())
        for j in range(k + 1):  # stage j at iteration u needs stage j-1 up to u-1: fill stage by stage
            replay = self._replays[j]
            while replay.next_t <= t:
                self._advance(j, replay)
        forward = self._replays[k].at(t)
        self._prune()
        return forward

    def _prune(self) -> None:
        """Drop each stage's record of iterations long past (a run of 300
        epochs would otherwise keep one per stage and iteration), keeping the
        last KEPT_ITERATIONS and whatever the next stage still has to replay."""
        for j, replay in enumerate(self._replays):
            keep_from = replay.next_t - KEPT_ITERATIONS
            if j + 1 < len(self._replays):
                keep_from = min(keep_from, self._replays[j + 1].next_t - 1)
            drop = keep_from - replay.first
            if drop >= KEPT_ITERATIONS:  # in chunks, so the list is not shifted every iteration
                del replay.forwards[:drop]
                replay.first += drop

    def _advance(self, k: int, replay: StageReplay) -> None:
        u = replay.next_t
        if k == 0:
            if self.steps(0, u):
                replay.forwards.append((None, replay.batches_taken))
                replay.batches_taken += 1
            else:
                replay.forwards.append(None)
            return
        sent = self._replays[k - 1].at(u - 1) if u > 0 else None
        if sent is not None:
            replay.buffer.append(Entry(forward_id(k - 1, u - 1), sent[1]))
            del replay.buffer[:-self.buffer]  # circular: the oldest entry is overwritten
        if replay.buffer and self.steps(k, u):
            entry = pick(replay.buffer)
            entry.uses += 1
            replay.forwards.append((entry.source, entry.data_batch))
        else:
            replay.forwards.append(None)

    def data_batch(self, batch: int) -> int:
        t, k = divmod(batch, ID_STRIDE)
        forward = self._forward(k, t)
        if forward is None:
            raise KeyError(f"stage {k} forwards nothing at iteration {t}")
        return forward[1]

    def schedule(self, num_stages, t):
        plan = []
        for k in range(num_stages):
            last = k == num_stages - 1
            actions = []
            if k > 0 and self._forward(k - 1, t - 1) is not None:
                actions.append(Action(Op.RECV_ACT, forward_id(k - 1, t - 1), 1))
            forward = self._forward(k, t)
            if forward is not None:
                b = forward_id(k, t)
                actions.append(Action(Op.FORWARD, b, source=forward[0]))
                if not last:
                    actions.append(Action(Op.SEND_ACT, b, 1))
                actions += [Action(Op.BACKWARD if last else Op.LOCAL, b), Action(Op.UPDATE)]
            plan.append(tuple(actions))
        return tuple(plan)

    def make_worker(self, ctx):
        if ctx.is_last:  # the network's loss; fed from a buffer unless it is the only stage
            return StageWorker(ctx, input_grad=False) if ctx.is_first else BufferedLastWorker(ctx, self.buffer)
        return LocalLossWorker(ctx) if ctx.is_first else BufferedLocalLossWorker(ctx, self.buffer)


class BufferedInputs:
    """A stage's input buffer (mixed into a worker): the M activations
    received last, by the id they were sent as. The engines hand over each
    one (keep_input); a FORWARD with a source reads one back (kept_input);
    the buffer is checkpointed with the stage."""

    buffers_inputs = True

    def __init__(self, ctx, size: int, **kwargs):
        super().__init__(ctx, **kwargs)
        self.kept_size = size
        self.kept: OrderedDict[int, torch.Tensor] = OrderedDict()

    def keep_input(self, batch: int, x: torch.Tensor) -> None:
        self.kept[batch] = x
        while len(self.kept) > self.kept_size:
            self.kept.popitem(last=False)

    def kept_input(self, batch: int) -> torch.Tensor:
        if batch not in self.kept:
            raise RuntimeError(f"stage {self.ctx.index}: activation {batch} is not in its buffer "
                               f"(holds {list(self.kept)})")
        return self.kept[batch]

    def checkpoint_state(self):
        return {**super().checkpoint_state(), "input_buffer": list(self.kept.items())}

    def restore_state(self, state):
        super().restore_state(state)
        self.kept = OrderedDict((b, x.to(self.device)) for b, x in state["input_buffer"])


class BufferedLocalLossWorker(BufferedInputs, LocalLossWorker):
    pass


class BufferedLastWorker(BufferedInputs, StageWorker):
    def __init__(self, ctx, size: int):
        super().__init__(ctx, size, input_grad=False)
