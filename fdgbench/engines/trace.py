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
    a barrier, so every rank's clock starts at (nearly) the same moment."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.origin = time.perf_counter()

    def start(self) -> None:
        self.origin = time.perf_counter()
        self.spans.clear()

    def record(self, stage: int, iteration: int, action: Action, start: float, end: float) -> None:
        self.spans.append(Span(stage, iteration, str(action), CATEGORIES[action.op], start - self.origin,
                               end - start))


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
