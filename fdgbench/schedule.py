"""The schedule as data.

For iteration t a method yields, per stage k, an ordered tuple of Actions:
FORWARD(b), BACKWARD(b) (from the gradient received from stage k+1, or the
loss at the last stage), LOCAL(b) (back-propagate a signal the stage makes
itself: an auxiliary loss, a synthetic gradient), UPDATE, and the sends and
receives of activations (to k+1) and gradients (to k-1), each tagged with its
batch id b. A message
has a latency: 0 (consumed in the iteration that sends it, a locking) or 1
(consumed in the next iteration). Engines execute these lists; the validator
runs them symbolically (unbounded mailboxes, stages taking turns) and rejects
a schedule that deadlocks, receives a message that was never sent or at the
wrong latency, leaves a message unconsumed, or computes on data it does not
hold. Short forms, as torch.distributed.pipelining prints them: ``F3`` forward
of batch 3, ``B1`` backward, ``L1`` local backward, ``U`` update, ``sA3``/``rA3`` send/receive
activation, ``sG1``/``rG1`` gradient; a trailing ``'`` marks latency 1;
``F9<4``: forward, as batch 9, the activation received earlier as batch 4
and kept in the stage's input buffer.
"""
from __future__ import annotations

import collections

from dataclasses import dataclass
from enum import Enum
from typing import Callable


class Op(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"
    LOCAL = "L"
    UPDATE = "U"
    SEND_ACT = "sA"
    RECV_ACT = "rA"
    SEND_GRAD = "sG"
    RECV_GRAD = "rG"


SENDS = (Op.SEND_ACT, Op.SEND_GRAD)
RECVS = (Op.RECV_ACT, Op.RECV_GRAD)
COMPUTE = (Op.FORWARD, Op.BACKWARD, Op.LOCAL, Op.UPDATE)


@dataclass(frozen=True)
class Action:
    op: Op
    batch: int | None = None
    latency: int = 0
    # FORWARD at a stage k > 0 whose input is an activation received earlier and kept in the stage's input
    # buffer (DGL's replay buffer): the batch id it was received as. None: the activation received for
    # ``batch`` in this iteration (every other schedule).
    source: int | None = None

    def __str__(self) -> str:
        text = self.op.value + ("" if self.batch is None else str(self.batch))
        if self.source is not None:
            text += f"<{self.source}"
        return text + ("'" if self.latency and self.op not in COMPUTE else "")


StagePlan = tuple[Action, ...]
IterationPlan = tuple[StagePlan, ...]
MessageKey = tuple[str, int, int, int]  # (kind, src, dst, batch)


class ScheduleError(ValueError):
    """The schedule cannot run as written."""


def message_key(stage: int, action: Action) -> MessageKey:
    b = action.batch
    return {
        Op.SEND_ACT: ("act", stage, stage + 1, b),
        Op.RECV_ACT: ("act", stage - 1, stage, b),
        Op.SEND_GRAD: ("grad", stage, stage - 1, b),
        Op.RECV_GRAD: ("grad", stage + 1, stage, b),
    }[action.op]


def stage_plan(k: int, num_stages: int, forward: int | None, backward: int | None,
               forward_latency: int, backward_latency: int, backward_first: bool) -> StagePlan:
    """One stage's actions for an iteration of a forward/backward method.

    ``forward``/``backward`` are the batch ids this stage forwards and
    back-propagates (None or negative: nothing, pipeline filling). The
    receive of an input precedes its compute and the send follows it; an
    UPDATE follows every backward, so a stage never steps before its first
    gradient. ``backward_first`` orders backward+update before the forward
    (FDG); otherwise the forward comes first (BP, DDG). The last stage always
    forwards, then back-propagates its own loss.
    """
    last = k == num_stages - 1
    fwd: list[Action] = []
    bwd: list[Action] = []
    if forward is not None and forward >= 0:
        if k > 0:
            fwd.append(Action(Op.RECV_ACT, forward, forward_latency))
        fwd.append(Action(Op.FORWARD, forward))
        if not last:
            fwd.append(Action(Op.SEND_ACT, forward, forward_latency))
    if backward is not None and backward >= 0:
        if not last:
            bwd.append(Action(Op.RECV_GRAD, backward, backward_latency))
        bwd.append(Action(Op.BACKWARD, backward))
        if k > 0:
            bwd.append(Action(Op.SEND_GRAD, backward, backward_latency))
        bwd.append(Action(Op.UPDATE))
    return tuple(bwd + fwd) if backward_first and not last else tuple(fwd + bwd)


def local_plan(k: int, num_stages: int, forward: int, latency: int, send_grad: bool,
               target: int | None = None) -> StagePlan:
    """One stage's actions for a method whose stages learn from local signals.

    The stage forwards ``forward`` and sends it on; a stage k < K-1 then
    back-propagates its local signal (LOCAL: an auxiliary loss, a synthetic
    gradient), the last stage its loss (BACKWARD). With ``send_grad`` the
    resulting input gradient goes to stage k-1; then the stage steps. With
    ``target`` (k < K-1), the stage last receives the gradient stage k+1
    sent for batch ``target`` and consumes it (BACKWARD). All messages have
    ``latency``.
    """
    if forward < 0:
        return ()
    last = k == num_stages - 1
    plan = [Action(Op.RECV_ACT, forward, latency)] if k > 0 else []
    plan.append(Action(Op.FORWARD, forward))
    if not last:
        plan.append(Action(Op.SEND_ACT, forward, latency))
    plan.append(Action(Op.BACKWARD if last else Op.LOCAL, forward))
    if send_grad and k > 0:
        plan.append(Action(Op.SEND_GRAD, forward, latency))
    plan.append(Action(Op.UPDATE))
    if target is not None and target >= 0 and not last:
        plan += [Action(Op.RECV_GRAD, target, latency), Action(Op.BACKWARD, target)]
    return tuple(plan)


def update_delays(schedule: ScheduleFn, num_stages: int) -> list[float]:
    """Per stage, how many updates it makes between a batch's FORWARD and the
    UPDATE that applies that batch's gradient, in the steady state (the
    mean over the second half of the horizon: a stage that accumulates
    gradients over M backwards, ADL's, applies batches of several ages).
    FDG: 2(K-1-k) - 1 at a stage k < K-1 (its forward follows the update of
    its own iteration), 0 at the last; DDG: K-1-k; BP: 0."""
    made = [0] * num_stages  # updates each stage has made so far
    forwarded: list[dict[int | None, int]] = [{} for _ in range(num_stages)]
    waiting: list[list[int | None]] = [[] for _ in range(num_stages)]  # back-propagated, not yet applied
    ages: list[list[int]] = [[] for _ in range(num_stages)]
    steps = horizon(num_stages)
    for t in range(steps):
        for k, actions in enumerate(schedule(num_stages, t)):
            for action in actions:
                if action.op is Op.FORWARD:
                    forwarded[k][action.batch] = made[k]
                elif action.op is Op.BACKWARD:
                    waiting[k].append(action.batch)
                elif action.op is Op.UPDATE:
                    if t >= steps // 2:
                        ages[k] += [made[k] - forwarded[k].pop(b) for b in waiting[k] if b in forwarded[k]]
                    waiting[k].clear()
                    made[k] += 1
    return [sum(a) / len(a) if a else 0.0 for a in ages]


class Mailbox:
    """Messages sent and not yet received: key -> (iteration sent, latency)."""

    def __init__(self) -> None:
        self.pending: dict[MessageKey, tuple[int, int]] = {}


def execution_order(plan: IterationPlan, t: int, mailbox: Mailbox) -> list[tuple[int, Action]]:
    """A global order of the iteration's actions that respects every receive:
    stages take turns, each running until it needs a message not yet sent;
    a stage that waits is queued again when a message is sent to it (so the
    work is linear in the iteration's actions, not quadratic in K). Checks
    the iteration as it goes and raises ScheduleError on any fault."""
    num_stages = len(plan)
    pos = [0] * num_stages
    order: list[tuple[int, Action]] = []
    done_here: list[set[tuple[Op, int | None]]] = [set() for _ in plan]
    ready = collections.deque(range(num_stages))
    queued = [True] * num_stages
    while ready:
        k = ready.popleft()
        queued[k] = False
        actions = plan[k]
        while pos[k] < len(actions):
            action = actions[pos[k]]
            if action.op in RECVS:
                key = message_key(k, action)
                if key not in mailbox.pending:
                    break  # queued again when the message is sent
                sent_at, latency = mailbox.pending[key]
                if t - sent_at != latency or action.latency != latency:
                    raise ScheduleError(
                        f"iteration {t}, stage {k}: {action} receives a latency-{latency} message sent at "
                        f"iteration {sent_at}, expected it with latency {action.latency}")
                del mailbox.pending[key]
            elif action.op in SENDS:
                key = message_key(k, action)
                if not 0 <= key[2] < num_stages:
                    raise ScheduleError(f"iteration {t}, stage {k}: {action} has no stage to go to")
                needs = (Op.FORWARD,) if action.op is Op.SEND_ACT else (Op.BACKWARD, Op.LOCAL)
                if not any((op, action.batch) in done_here[k] for op in needs):
                    raise ScheduleError(f"iteration {t}, stage {k}: {action} sends batch {action.batch} "
                                        f"before computing it ({'/'.join(op.value for op in needs)}"
                                        f"{action.batch})")
                mailbox.pending[key] = (t, action.latency)
                receiver = key[2]
                if not queued[receiver] and pos[receiver] < len(plan[receiver]):
                    ready.append(receiver)
                    queued[receiver] = True
            elif (action.op is Op.FORWARD and k > 0 and action.source is None
                  and (Op.RECV_ACT, action.batch) not in done_here[k]):
                raise ScheduleError(f"iteration {t}, stage {k}: {action} before receiving its input")
            elif (action.op is Op.BACKWARD and k < num_stages - 1
                  and (Op.RECV_GRAD, action.batch) not in done_here[k]):
                raise ScheduleError(f"iteration {t}, stage {k}: {action} before receiving its gradient")
            done_here[k].add((action.op, action.batch))
            order.append((k, action))
            pos[k] += 1
    waiting = ", ".join(f"stage {k} at {plan[k][pos[k]]}" for k in range(num_stages) if pos[k] < len(plan[k]))
    if waiting:
        raise ScheduleError(f"iteration {t}: deadlock, {waiting} wait for messages never sent")
    for key, (sent_at, latency) in mailbox.pending.items():
        if sent_at + latency <= t:
            raise ScheduleError(f"iteration {t}: message {key} sent at iteration {sent_at} with latency "
                                f"{latency} was never received")
    return order


ScheduleFn = Callable[[int, int], IterationPlan]


def validate(schedule: ScheduleFn, num_stages: int, iterations: int) -> None:
    """Run ``iterations`` iterations symbolically; also check that every
    backward (and local backward) of batch b at stage k follows a forward of
    b at stage k and happens once, and that a forward from the input buffer
    names an activation the stage received before."""
    mailbox = Mailbox()
    forwarded: list[set[int]] = [set() for _ in range(num_stages)]
    backwarded: list[dict[Op, set[int]]] = [{} for _ in range(num_stages)]
    received: list[set[int]] = [set() for _ in range(num_stages)]
    for t in range(iterations):
        plan = schedule(num_stages, t)
        if len(plan) != num_stages:
            raise ScheduleError(f"iteration {t}: plan has {len(plan)} stages, expected {num_stages}")
        for k, action in execution_order(plan, t, mailbox):
            if action.op is Op.RECV_ACT:
                received[k].add(action.batch)
            if action.op is Op.FORWARD and action.source is not None and action.source not in received[k]:
                raise ScheduleError(f"iteration {t}, stage {k}: {action} forwards an activation it never received")
            if action.op is Op.FORWARD:
                if action.batch in forwarded[k]:
                    raise ScheduleError(f"iteration {t}, stage {k}: batch {action.batch} forwarded twice")
                forwarded[k].add(action.batch)
            elif action.op in (Op.BACKWARD, Op.LOCAL):
                done = backwarded[k].setdefault(action.op, set())
                if action.batch not in forwarded[k] or action.batch in done:
                    raise ScheduleError(f"iteration {t}, stage {k}: {action} without a pending forward of "
                                        f"batch {action.batch}")
                done.add(action.batch)


def format_grid(schedule: ScheduleFn, num_stages: int, iterations: int, messages: bool = False) -> str:
    """The step x stage grid of the first iterations (compute actions only,
    unless ``messages``)."""
    rows = []
    for t in range(iterations):
        plan = schedule(num_stages, t)
        rows.append([" ".join(str(a) for a in stage if messages or a.op in COMPUTE) for stage in plan])
    header = ["step"] + [f"stage {k}" for k in range(num_stages)]
    widths = [max(len(header[0]), len(str(iterations - 1)))] + [
        max(len(header[k + 1]), *(len(r[k]) for r in rows)) for k in range(num_stages)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    for t, row in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) for c, w in zip([str(t).rjust(widths[0])] + row, widths)).rstrip())
    return "\n".join(lines)


def legend() -> str:
    return ("F<b> forward of batch b, B<b> backward of batch b, L<b> local backward (auxiliary loss or "
            "synthetic gradient), U update; sA/rA send/receive an activation, "
            "sG/rG a gradient; ' marks a message consumed in the next iteration")


def horizon(num_stages: int) -> int:
    """Iterations that cover any method's pipeline fill and several
    iterations of its steady state: what the schedule scans below look at."""
    return 8 * num_stages + 16


def steps_until_every_stage_updates(schedule: ScheduleFn, num_stages: int) -> int:
    """Iterations a run needs before each of its stages has stepped once: one
    past the latest first UPDATE in the method's schedule (a pipeline fills
    before its first stages get a gradient; FDG's stage 0 waits 2(K-1))."""
    first: dict[int, int] = {}
    for t in range(horizon(num_stages)):
        for k, actions in enumerate(schedule(num_stages, t)):
            if k not in first and any(a.op is Op.UPDATE for a in actions):
                first[k] = t
        if len(first) == num_stages:
            break
    return max(first.values(), default=-1) + 1


def hold_span(schedule: ScheduleFn, num_stages: int) -> int:
    """The most iterations any stage keeps a batch: from the iteration of its
    FORWARD to that of its last BACKWARD or LOCAL, over the pipeline's fill
    and several iterations of its steady state. A batch forwarded more than
    this many iterations before a checkpoint is gone by then."""
    forwarded: dict[tuple[int, int | None], int] = {}
    span = 0
    for t in range(horizon(num_stages)):
        for k, actions in enumerate(schedule(num_stages, t)):
            for action in actions:
                if action.op is Op.FORWARD:
                    forwarded[(k, action.batch)] = t
                elif action.op in (Op.BACKWARD, Op.LOCAL) and (k, action.batch) in forwarded:
                    span = max(span, t - forwarded[(k, action.batch)])
    return span


def _release_counts(plans: list[IterationPlan]) -> dict[tuple[int, int | None], int]:
    """(stage, batch) -> how many BACKWARD/LOCAL actions the batch gets at that stage in ``plans``."""
    counts: dict[tuple[int, int | None], int] = {}
    for plan in plans:
        for k, actions in enumerate(plan):
            for action in actions:
                if action.op in (Op.BACKWARD, Op.LOCAL):
                    counts[(k, action.batch)] = counts.get((k, action.batch), 0) + 1
    return counts


class _Holdings:
    """What stage k keeps as its actions run: a batch's graph from its FORWARD
    to its first BACKWARD or LOCAL; then, while it still has releases to come
    (``remaining``, from _release_counts), its output."""

    def __init__(self, k: int, remaining: dict[tuple[int, int | None], int]):
        self.k, self.remaining = k, remaining
        self.graphs: set[int | None] = set()
        self.outputs: set[int | None] = set()

    def apply(self, action: Action) -> bool:
        """Account for ``action``; whether it changed what the stage keeps."""
        b = action.batch
        if action.op is Op.FORWARD:
            self.graphs.add(b)
        elif action.op in (Op.BACKWARD, Op.LOCAL) and (self.k, b) in self.remaining:
            self.graphs.discard(b)
            self.remaining[(self.k, b)] -= 1
            (self.outputs.add if self.remaining[(self.k, b)] else self.outputs.discard)(b)
        else:
            return False
        return True

    @property
    def counts(self) -> tuple[int, int]:
        return len(self.graphs), len(self.outputs)


def batches_held(schedule: ScheduleFn, num_stages: int,
                 iterations: int | None = None) -> list[tuple[tuple[int, int], ...]]:
    """What each stage keeps at once, over the pipeline's fill and several
    iterations of its steady state: per stage, the maximal (graphs, outputs)
    pairs seen after any of its actions. A batch's graph is held from its
    FORWARD to its first BACKWARD or LOCAL (which frees it); if another
    BACKWARD of that batch follows (DNI's synthetic-gradient target), the
    stage still keeps something of it (its output) until then: it counts in
    ``outputs``. Stage memory = state + graphs x graph bytes + outputs x
    output bytes, maximised over the pairs (memory.py). A run of fewer
    ``iterations`` than it takes to fill the pipeline holds fewer."""
    iterations = min(horizon(num_stages), iterations or horizon(num_stages))
    plans = [schedule(num_stages, t) for t in range(iterations)]
    releases = _release_counts(plans)
    out = []
    for k in range(num_stages):
        held = _Holdings(k, dict(releases))
        seen = {(0, 0)}
        for plan in plans:
            for action in plan[k]:
                held.apply(action)
                seen.add(held.counts)
        out.append(tuple(sorted(p for p in seen if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in seen))))
    return out


def held_together(schedule: ScheduleFn, num_stages: int) -> list[tuple[tuple[int, int], ...]]:
    """What every stage holds at once when one process runs all of them (the
    sequential engine, in execution_order): after each action of the
    pipeline's fill and several iterations of its steady state, each stage's
    (graphs, outputs) as batches_held counts them. Local learning frees a
    stage's graph before the next stage forwards; BP keeps every stage's
    until its backward reaches it."""
    plans = [schedule(num_stages, t) for t in range(horizon(num_stages))]
    remaining = _release_counts(plans)  # keyed by stage: one count serves every stage's holdings
    held = [_Holdings(k, remaining) for k in range(num_stages)]
    snapshots = []
    mailbox = Mailbox()
    for t, plan in enumerate(plans):
        for k, action in execution_order(plan, t, mailbox):
            if held[k].apply(action):
                snapshots.append(tuple(h.counts for h in held))
    return snapshots


def release_ops(schedule: ScheduleFn, num_stages: int) -> list[tuple[Op, ...]]:
    """Per stage, the BACKWARD/LOCAL actions one batch gets there in the
    steady state, in order (FDG: one BACKWARD; DNI: LOCAL, then BACKWARD)."""
    start = 4 * num_stages + 4
    plans = [schedule(num_stages, t) for t in range(start, start + 4 * num_stages + 8)]
    out = []
    for k in range(num_stages):
        first = next((a.batch for plan in plans for a in plan[k] if a.op is Op.FORWARD), None)
        out.append(tuple(a.op for plan in plans for a in plan[k]
                         if a.op in (Op.BACKWARD, Op.LOCAL) and a.batch == first))
    return out
