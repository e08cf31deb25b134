"""What a run directory records, read once: its state (done, diverged,
running, incomplete, missing or corrupt) and its records. The one place a
run's state is decided; the sweep, ``fdgbench run``, tables, plots and
``sweep status`` all ask ``read_run``."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from .runs import DamagedRecord, RunDirectory

RUNNING_S = 3600  # a run whose directory changed this recently counts as running (epochs can take long)
RECORDED = ("done", "diverged")  # the states of a run that has finished, one way or the other


CORRUPT = "corrupt"  # a run directory whose records cannot be used (read_run says why)
# What a sweep leaves alone: runs recorded one way or the other, and corrupt ones, which it refuses to
# touch (see corrupt_text).
SETTLED = (*RECORDED, CORRUPT)


@dataclass(frozen=True)
class RunRecord:
    """A run directory read once: its state and, except for a corrupt run,
    its records (config, per-epoch metrics, and the summary of a done or
    diverged run). A corrupt run carries only ``problem`` (the file and what
    is wrong with it): nothing may use its numbers."""

    state: str
    problem: str | None = None
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def read_run(run: RunDirectory, now: float | None = None) -> RunRecord:
    """The one place a run's state is decided, from the directory alone:
    done or diverged (recorded as such), running (written to in the last
    RUNNING_S seconds: an epoch's metrics, a checkpoint, the start),
    incomplete (an unfinished run left alone), missing (no directory), or
    corrupt: a record file is unreadable (torn, edited), a done run lacks its
    config or summary, or the records contradict each other (``_contradiction``)."""
    if not run.exists:
        return RunRecord("missing")
    try:
        done = run.is_done
        # An unfinished run may not have written its config yet (it is starting); a done one must have.
        config = run.read_json("config.json") if done or (run.path / "config.json").is_file() else None
        metrics = run.metrics()
        summary = run.read_json("summary.json") if done else None
    except DamagedRecord as exc:
        return RunRecord(CORRUPT, f"{exc.path.name} {exc.problem}")
    problem = _contradiction(metrics, summary)
    if problem is not None:
        return RunRecord(CORRUPT, problem)
    if summary is not None:
        state = "diverged" if summary["status"] == "diverged" else "done"
    else:
        written = [f.stat().st_mtime for f in run.path.iterdir()]
        recent = written and (now if now is not None else time.time()) - max(written) < RUNNING_S
        state = "running" if recent else "incomplete"
    return RunRecord(state, None, config, metrics, summary)


def run_state(run: RunDirectory, now: float | None = None) -> str:
    """The run's state (``read_run``)."""
    return read_run(run, now).state


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _contradiction(metrics: list[dict[str, Any]], summary: dict[str, Any] | None) -> str | None:
    """Why a run's readable records cannot be true, or None. A test error is
    a share of mistakes counted on the test set, finite even when training
    diverges (divergence is a non-finite training loss), so a non-finite one
    is damage; and a finished run's summary is computed from its metrics, so
    its final and best test errors are the last and lowest recorded. A
    diverged run is taken as recorded: it stopped on a non-finite loss, and a
    table shows it as diverged, never its numbers. Records without test
    errors (summary-only or hand-made ones) are not cross-checked."""
    status = None if summary is None else summary.get("status")
    if summary is not None and status not in ("finished", "diverged"):
        return f"summary.json has status {status!r}, neither finished nor diverged"
    if status == "diverged":
        return None
    errors = []
    for number, record in enumerate(metrics, 1):
        if "test_error" in record:
            if not _finite(record["test_error"]):
                return f"metrics.jsonl line {number} has test error {record['test_error']}"
            errors.append(record["test_error"])
    if summary is None:
        return None
    recorded = {"final_test_error": ("last", errors[-1]), "best_test_error": ("lowest", min(errors))} if errors else {}
    for key in ("final_test_error", "best_test_error"):
        if summary.get(key) is not None and not _finite(summary[key]):
            return f"summary.json has {key} {summary[key]}"
        if key in summary and key in recorded and summary[key] != recorded[key][1]:
            which, value = recorded[key]
            return f"summary.json has {key} {summary[key]}, but the {which} in metrics.jsonl is {value}"
    return None


def corrupt_text(run: RunDirectory, problem: str | None) -> str:
    """What every command says of a corrupt run. Deleting the directory is the
    one remedy that is right in every case: ``fdgbench run`` would take a done
    run whose config is gone as done and fail on an unreadable summary, and
    starting over in place would erase the record before anyone looked at it,
    so no command does either by itself."""
    return f"run {run.path} is corrupt: {problem}; delete that directory to train the run again"
