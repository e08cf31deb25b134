"""The timeline simulator: a method's schedule run against measured costs
instead of tensors, to predict iteration time, per-worker utilisation and
speedup for any K and link, and to draw the same Gantt chart as a traced run.

Each stage is a worker running its action list in order, iteration after
iteration (as on the distributed engine), played out event by event in time
(``_play``). A compute action takes its stage's measured time, times the
co-run slowdown while other workers compute at the same moment (``corun``
of the workers computing: the stages computing times their replicas, which
run alike; workers sharing one CPU's cores, caches and memory bandwidth; 1
on GPUs and by default); a send costs the sender ``send_s`` and the message arrives
``latency + bytes / bandwidth`` later; a receive waits until the message has
arrived. Costs come from a profile (``profile_blocks``):
every block's forward, backward and update time measured in one process with
the stages' thread count, so any partition's stage costs are sums of blocks.
A local backward (DGL's auxiliary loss, DNI's synthetic gradient) is charged
the stage's backward; the auxiliary nets themselves are not in the profile,
so those methods' predictions are low. A method that replays its forward
before a delayed backward (FR, --staleness replay, PETRA) is charged that
forward again; PETRA, which first rebuilds each reversible block's input by
inverting it, is charged those blocks' forward once more, and its backward
messages (gradient and rebuilt activation) twice an activation's bytes.

GPipe and 1F1B as ``torch.distributed.pipelining`` runs them (``--engine
pipelining``) are simulated micro-batch by micro-batch
(``library_pipeline``): each of the M micro-batches costs what a profile
taken at B/M images says (``microbatch_stages``; 1/M of the batch's costs
where there is none), every stage forwards and
back-propagates all M in the library's order and then steps, and the
pipeline drains each iteration: the bubble, (K-1)/(M+K-1) of the time with
equal stages, comes out of the timeline, not a formula. (The suite's own
engines run those methods' micro-batches one stage at a time, BP's
timeline: ``simulate`` without ``library``.)

With R replicas of each stage (placement.py; dp is one stage with K
replicas) every replica computes on B/R images: compute and messages are
scaled by 1/R, and each UPDATE first all-reduces the stage's gradients over
its R replicas (a ring: 2 (R-1)/R times their bytes, 2 (R-1) latencies), not
overlapped with the backward, as on the distributed engine.
"""
from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .method import Method
from .schedule import (COMPUTE, RECVS, SENDS, Action, IterationPlan, Mailbox, Op, StagePlan, execution_order,
                       message_key)
from .engines.trace import CATEGORIES, Span

COMPUTE_CATEGORIES = frozenset(CATEGORIES[op] for op in COMPUTE)


@dataclass(frozen=True)
class Link:
    latency_s: float = 50e-6
    bandwidth_Bps: float = 10e9

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class StageCosts:
    """Seconds per action of one stage, and the bytes of its output activation."""

    forward: float
    backward: float
    update: float
    local: float = 0.0
    output_bytes: float = 0.0
    parameter_bytes: float = 0.0
    reversible_forward: float = 0.0  # the forward of its reversible blocks (what PETRA's inversion costs again)


@dataclass
class Prediction:
    iteration_s: float  # steady-state seconds per iteration
    utilisation: list[float]  # per worker: busy (compute) fraction of the steady-state window
    spans: list[Span] = field(repr=False, default_factory=list)


def simulate(method: Method, stages: Sequence[StageCosts], link: Link, iterations: int = 40,
             send_s: float = 0.0, replicas: int = 1, library: bool = False,
             microbatch_stages: Sequence[StageCosts] | None = None,
             corun: Callable[[int], float] = lambda workers: 1.0) -> Prediction:
    """Run ``iterations`` iterations of ``method``'s schedule on K = len(stages)
    stages of ``replicas`` workers each (one timeline per stage: its replicas
    run alike); the steady state is measured over the second half. With
    ``library``, a micro-batched pipeline (gpipe, 1f1b) as
    ``torch.distributed.pipelining`` runs it (library_pipeline): each
    micro-batch's forward, backward and message cost ``microbatch_stages``'
    (a profile taken at the micro-batch's size), or 1/M of the batch's where
    none is given. ``corun(n)``: how many times slower compute runs while n
    workers compute at once (the CPU they share), 1 for n = 1."""
    k_stages = len(stages)
    schedule = method.schedule
    if library:
        schedule = library_pipeline(method.pipeline_schedule, method.microbatches)
        m = method.microbatches  # each action is one micro-batch's (the update stays whole)
        per_micro = microbatch_stages or [replace(c, forward=c.forward / m, backward=c.backward / m,
                                                  output_bytes=c.output_bytes / m) for c in stages]
        stages = [replace(c, forward=mc.forward, backward=mc.backward, output_bytes=mc.output_bytes)
                  for c, mc in zip(stages, per_micro, strict=True)]
    if replicas > 1:
        stages = [replace(c, forward=c.forward / replicas, backward=c.backward / replicas, local=c.local / replicas,
                          output_bytes=c.output_bytes / replicas,
                          update=c.update + ring_allreduce_s(c.parameter_bytes, replicas, link)) for c in stages]
    if method.replays_forward():  # every delayed stage (all but the last) recomputes its forward
        # (PETRA first inverts its reversible blocks too: their forward once more)
        inverts = method.inverts_reversible_blocks
        stages = [replace(c, backward=c.backward + c.forward + (c.reversible_forward if inverts else 0.0))
                  if k < k_stages - 1 else c for k, c in enumerate(stages)]
    # Each stage's actions in its own order (the schedule's, checked as it is expanded), then played out in time.
    # Iterations past the measured ones keep every stage working until the last measured one ends: a stage
    # that ran out of work early would stop slowing the others down (corun) and flatter the end of the window.
    # 2K + 2 more: a stage runs at most two iterations ahead of its neighbour (_play's back-pressure), so at
    # most 2K ahead of any stage.
    actions: list[list[tuple[int, Action]]] = [[] for _ in range(k_stages)]
    mailbox = Mailbox()
    for t in range(iterations + 2 * k_stages + 2):
        for k, action in execution_order(schedule(k_stages, t), t, mailbox):
            actions[k].append((t, action))
    played = _play(actions, stages, link, send_s, method.gradient_parts, lambda busy: corun(busy * replicas))
    spans = [s for s in played if s.iteration < iterations]
    # An iteration ends when every stage has finished its actions of it and of the iterations before.
    clock_after = [[0.0] * iterations for _ in range(k_stages)]
    for s in spans:
        clock_after[s.stage][s.iteration] = max(clock_after[s.stage][s.iteration], s.start + s.duration)
    for k in range(k_stages):
        for t in range(1, iterations):
            clock_after[k][t] = max(clock_after[k][t], clock_after[k][t - 1])
    ends = [max(clock_after[k][t] for k in range(k_stages)) for t in range(iterations)]
    half = iterations // 2
    start, end = ends[half - 1], ends[-1]
    window = end - start
    per_iteration = window / (iterations - half)
    busy = [0.0] * k_stages  # compute inside the window, whichever iteration it belongs to
    for s in played:
        if s.category in COMPUTE_CATEGORIES:
            busy[s.stage] += max(0.0, min(s.start + s.duration, end) - max(s.start, start))
    utilisation = [b / window if window else 1.0 for b in busy]
    return Prediction(per_iteration, utilisation, spans)


def library_pipeline(kind: str, microbatches: int) -> Callable[[int, int], IterationPlan]:
    """The schedule of ``torch.distributed.pipelining``'s ScheduleGPipe
    (``gpipe``: every stage forwards micro-batches 0..M-1, then
    back-propagates them in the same order) or Schedule1F1B (``1f1b``: stage
    k forwards min(K-1-k, M) micro-batches, then alternates one forward and
    one backward, then back-propagates the rest), each stage stepping once
    at the end; micro-batch m of iteration t is batch t * M + m, and every
    message is received in the iteration it is sent."""

    def schedule(num_stages: int, t: int) -> IterationPlan:
        return tuple(_pipeline_stage(kind, microbatches, k, num_stages, t) for k in range(num_stages))

    return schedule


def _pipeline_stage(kind: str, microbatches: int, k: int, num_stages: int, t: int) -> StagePlan:
    first, last = k == 0, k == num_stages - 1
    batches = [t * microbatches + m for m in range(microbatches)]

    def forward(b: int) -> list[Action]:
        return ([] if first else [Action(Op.RECV_ACT, b)]) + [Action(Op.FORWARD, b)] + (
            [] if last else [Action(Op.SEND_ACT, b)])

    def backward(b: int) -> list[Action]:
        return ([] if last else [Action(Op.RECV_GRAD, b)]) + [Action(Op.BACKWARD, b)] + (
            [] if first else [Action(Op.SEND_GRAD, b)])

    if kind == "gpipe":
        order = [forward(b) for b in batches] + [backward(b) for b in batches]
    elif kind == "1f1b":
        warmup = min(num_stages - 1 - k, microbatches)
        order = [forward(b) for b in batches[:warmup]]
        for i, b in enumerate(batches[warmup:]):
            order += [forward(b), backward(batches[i])]
        order += [backward(b) for b in batches[microbatches - warmup:]]
    else:
        raise ValueError(f"unknown pipeline schedule {kind!r}")
    return tuple(a for actions in order for a in actions) + (Action(Op.UPDATE),)


def has_auxiliary_nets(method: Method, num_stages: int) -> bool:
    """Whether the method's stages learn from local signals, whose nets the
    block profile does not cost (its predictions are then low)."""
    return any(a.op is Op.LOCAL for t in range(2 * num_stages) for stage in method.schedule(num_stages, t)
               for a in stage)


def _play(actions: Sequence[Sequence[tuple[int, Action]]], stages: Sequence[StageCosts], link: Link,
          send_s: float, gradient_parts: int, corun: Callable[[int], float]) -> list[Span]:
    """Each stage's actions played out in time, event by event: compute takes
    its cost times corun(number of stages computing at that moment), so
    stages slow each other only while they compute together (a stage waiting
    for a message costs the others nothing); a send costs the sender
    ``send_s`` and arrives ``link.transfer_s`` later; a receive waits for it.
    As on the distributed engine (``_reap_sends``), a stage starts iteration
    u only once every message it sent in iterations up to u - 2 has been
    taken, i.e. its receiver has begun the iteration that receives it (where
    the engine posts its receives): how far a stage can run ahead of a slow
    neighbour even where no message comes back (DGL, InfoPro, AugLocal)."""
    k_stages = len(actions)
    pos = [0] * k_stages
    arrival: dict[tuple, float] = {}
    began = [-1] * k_stages  # the last iteration each stage has begun
    untaken: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (receiver, its iteration) -> [(sender, sent at)]
    in_flight = [collections.Counter() for _ in range(k_stages)]  # per sender: iteration -> messages not taken
    running: dict[int, _Running] = {}
    waiting: dict[int, tuple[float, tuple]] = {}  # stage -> (since when, the message it waits for)
    to_check = set(range(k_stages))  # stages whose next action may be able to start
    spans: list[Span] = []
    now = 0.0

    def finish(k: int, t: int, action: Action, start: float) -> None:
        spans.append(Span(k, t, str(action), CATEGORIES[action.op], start, now - start))
        pos[k] += 1
        to_check.add(k)

    def held_back(k: int, t: int) -> bool:  # messages from two iterations back not yet taken
        return any(sent_at <= t - 2 for sent_at in in_flight[k])

    while True:
        while to_check:  # start every action that can start now (zero-cost ones finish at once)
            k = to_check.pop()
            if k in running or pos[k] == len(actions[k]):
                continue
            t, action = actions[k][pos[k]]
            if held_back(k, t):
                continue  # checked again when one of its messages is taken
            if t > began[k]:  # it begins iteration t: the messages it receives in t are taken
                began[k] = t
                for sender, sent_at in untaken.pop((k, t), []):
                    in_flight[sender][sent_at] -= 1
                    if not in_flight[sender][sent_at]:
                        del in_flight[sender][sent_at]
                    to_check.add(sender)
            if action.op in RECVS:
                key = message_key(k, action)
                if key in arrival and arrival[key] <= now:
                    del arrival[key]
                    finish(k, t, action, waiting.pop(k, (now,))[0])
                else:
                    waiting.setdefault(k, (now, key))
                continue
            if action.op in SENDS:
                key = message_key(k, action)
                nbytes = (stages[k].output_bytes if action.op is Op.SEND_ACT
                          else stages[k - 1].output_bytes * gradient_parts)
                arrival[key] = now + send_s + link.transfer_s(nbytes)
                receiver, taken_in = key[2], t + action.latency
                if began[receiver] < taken_in:
                    untaken.setdefault((receiver, taken_in), []).append((k, t))
                    in_flight[k][t] += 1
                to_check.add(receiver)  # it may be waiting for this message
                work = send_s
            else:
                cost = stages[k]
                work = {Op.FORWARD: cost.forward, Op.BACKWARD: cost.backward, Op.LOCAL: cost.local,
                        Op.UPDATE: cost.update}[action.op]
            if work > 0:
                running[k] = _Running(t, action, now, work)
            else:
                finish(k, t, action, now)
        if not running and not waiting and all(pos[k] == len(actions[k]) for k in range(k_stages)):
            return spans
        computing = sum(1 for r in running.values() if r.compute)
        slowdown = corun(computing) if computing else 1.0
        steps = [r.left * slowdown if r.compute else r.left for r in running.values()]
        steps += [arrival[key] - now for _, key in waiting.values() if key in arrival]
        if not steps:
            raise RuntimeError("the simulated stages wait for each other: the schedule cannot proceed")
        step = min(steps)
        now += step
        for k in list(running):
            r = running[k]
            r.left -= step / slowdown if r.compute else step
            if r.left <= 1e-12 * r.work + 1e-18:
                del running[k]
                finish(k, r.iteration, r.action, r.start)
        to_check.update(k for k, (_, key) in waiting.items() if key in arrival)


@dataclass
class _Running:
    """An action under way on a stage."""

    iteration: int
    action: Action
    start: float
    work: float  # seconds at full speed
    left: float = field(init=False)

    def __post_init__(self) -> None:
        self.left = self.work

    @property
    def compute(self) -> bool:
        """Whether corun slows it (a send is not slowed)."""
        return self.action.op in COMPUTE


def ring_allreduce_s(nbytes: float, replicas: int, link: Link) -> float:
    """A ring all-reduce of ``nbytes`` over ``replicas`` workers."""
    return 2 * (replicas - 1) / replicas * nbytes / link.bandwidth_Bps + 2 * (replicas - 1) * link.latency_s


def stage_costs(blocks: Sequence[dict], ranges: Sequence[range],
                reversible: Sequence[bool] = ()) -> list[StageCosts]:
    """A partition's stage costs from a profile's per-block costs;
    ``reversible``: which blocks are (models.reversible_blocks; none if empty)."""
    out = []
    for r in ranges:
        part = [blocks[i] for i in r]
        backward = sum(b["backward_s"] for b in part)
        out.append(StageCosts(forward=sum(b["forward_s"] for b in part), backward=backward,
                              update=sum(b["update_s"] for b in part), local=backward,
                              output_bytes=part[-1]["output_bytes"],
                              parameter_bytes=sum(b.get("parameter_bytes", 0) for b in part),
                              reversible_forward=sum(blocks[i]["forward_s"] for i in r
                                                     if i < len(reversible) and reversible[i])))
    return out


def summarize_spans(spans: Sequence[Span]) -> dict[tuple[int, str], float]:
    """Median seconds per (stage, category) of a trace: what one action of
    each kind costs there."""
    groups: dict[tuple[int, str], list[float]] = {}
    for s in spans:
        groups.setdefault((s.stage, s.category), []).append(s.duration)
    return {key: statistics.median(v) for key, v in groups.items()}
