"""Per-action timelines (``--trace``): every action a stage runs, with its
start and end, written as Chrome/Perfetto trace JSON (chrome://tracing or
ui.perfetto.dev open it) and read back by the Gantt plot and the simulator's
validation.

Categories: forward, backward, local (a stage's own signal), update; send
(handing a message to the transport); recv (waiting for a message: the time a
stage sits idle because a neighbour has not delivered). Time not covered by
any action is the engine's own bookkeeping (learning rate, progress checks).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..schedule import Action, Op

CATEGORIES = {Op.FORWARD: "forward", Op.BACKWARD: "backward", Op.LOCAL: "local", Op.UPDATE: "update",
              Op.SEND_ACT: "send", Op.SEND_GRAD: "send", Op.RECV_ACT: "recv", Op.RECV_GRAD: "recv"}


@dataclass(frozen=True)
class Span:
    stage: int
    iteration: int
    name: str  # the action's short form, e.g. F12 or rG10'
    category: str
    start: float  # seconds since the trace's origin
    duration: float


class Tracer:
    """Collects spans. ``start`` sets the origin: engines call it right after
    a barrier, so every rank's clock starts at (nearly) the same moment.

    Engines bracket each action with ``mark(device)``. On a CPU a mark is the
    host clock. On a GPU the host clock would time only the kernel launches
    (the work runs later, asynchronously), so a mark is a CUDA event recorded
    on the device's current (compute) stream, and a span's times are the
    events' distances from an origin event recorded at ``start``; the events
    are resolved when ``spans`` is read (after the traced iterations), so
    tracing adds no host-device synchronisation while it runs. Waiting for a
    message then shows as the time the compute stream waits for NCCL."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._pending: list[tuple[int, int, Action, Any, Any]] = []  # spans bracketed by CUDA events
        self._origin_events: dict[torch.device, torch.cuda.Event] = {}
        self.origin = time.perf_counter()

    def start(self, devices: Iterable[torch.device] = ()) -> None:
        """Start the clock now (the devices' work so far is finished: the caller synchronised)."""
        self._spans.clear()
        self._pending.clear()
        self._origin_events = {}
        for d in dict.fromkeys(devices):
            if d.type == "cuda":
                self._origin_events[d] = _event(d)
        self.origin = time.perf_counter()

    def mark(self, device: torch.device) -> Any:
        if device.type == "cuda":
            if device not in self._origin_events:  # a device start() was not told of
                self._origin_events[device] = _event(device)
            return device, _event(device)  # the device names the origin event it is measured from
        return time.perf_counter()

    def record(self, stage: int, iteration: int, action: Action, start: Any, end: Any) -> None:
        if isinstance(start, float):
            self._spans.append(Span(stage, iteration, str(action), CATEGORIES[action.op], start - self.origin,
                                    end - start))
        else:
            self._pending.append((stage, iteration, action, start, end))

    @property
    def spans(self) -> list[Span]:
        """Every span so far."""
        self.resolve()
        return self._spans

    def resolve(self) -> None:
        """Turn the CUDA-event spans recorded so far into times (waits for the
        last event) and let the events go: the trainer calls it after each
        epoch, so a long traced run does not hold two events per action."""
        for stage, iteration, action, (device, start), (_, end) in self._pending:
            end.synchronize()
            begin = self._origin_events[device].elapsed_time(start) / 1e3
            self._spans.append(Span(stage, iteration, str(action), CATEGORIES[action.op], begin,
                                    start.elapsed_time(end) / 1e3))
        self._pending.clear()


def _event(device: torch.device) -> "torch.cuda.Event":
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def write_trace(path: str | Path, spans: Iterable[Span], metadata: dict[str, Any]) -> None:
    spans = sorted(spans, key=lambda s: (s.stage, s.start))
    events: list[dict[str, Any]] = [{"ph": "M", "name": "thread_name", "pid": 0, "tid": k, "args": {"name": f"stage {k}"}}
                                    for k in sorted({s.stage for s in spans})]
    events += [{"name": s.name, "cat": s.category, "ph": "X", "pid": 0, "tid": s.stage,
                "ts": round(s.start * 1e6, 3), "dur": round(s.duration * 1e6, 3), "args": {"iteration": s.iteration}}
               for s in spans]
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": metadata}) + "\n")


def read_trace(path: str | Path) -> tuple[list[Span], dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    spans = [Span(e["tid"], e["args"]["iteration"], e["name"], e["cat"], e["ts"] / 1e6, e["dur"] / 1e6)
             for e in data["traceEvents"] if e.get("ph") == "X"]
    return spans, data.get("otherData", {})
