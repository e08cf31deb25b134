"""A table's cells as results: each (row, column) cell's planned runs joined
with what the results root records (CellResult, collect), and the
time-to-accuracy read from them and a measured speed record."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..run_record import CORRUPT
from .records import planned_records

if TYPE_CHECKING:  # types only: specs imports the measures, which read these results
    from .specs import Cell, Column, Row, TableSpec

EPOCH_IMAGES = 50000  # a CIFAR epoch, for seconds per epoch from images/s


@dataclass
class CellResult:
    row: Row
    column: Column
    expected: int  # runs the preset asks for (seeds)
    finished: list[dict[str, Any]]  # summaries of finished runs
    diverged: int
    histories: list[list[dict[str, Any]]] = field(default_factory=list)  # the finished runs' epoch records
    corrupt: int = 0  # runs whose records cannot be used (left out of every number)

    def median(self, key: str) -> float | None:
        values = [s[key] for s in self.finished if s.get(key) is not None]
        return statistics.median(values) if values else None

    @property
    def seconds(self) -> float | None:
        """Seconds per CIFAR epoch at the median measured training rate."""
        rate = self.median("images_per_s")
        return EPOCH_IMAGES / rate if rate else None

    @property
    def paper_column(self) -> str | None:
        return self.column.paper[-1] if self.column.paper else None

    @property
    def paper(self) -> float | None:
        return self.row.paper.get(self.paper_column) if self.paper_column else None


def collect(spec: TableSpec, cells: list[Cell], root: Path) -> list[CellResult]:
    """Each (row, column) cell's runs, from the results root's records: the
    cells' planned runs joined with what is recorded, grouped by cell in the
    spec's order."""
    planned = planned_records(cells, root)
    first = {(c.row.id, c.column.id): c for c in reversed(cells)}
    results = []
    for (row, column), group in planned.groupby(["row", "column"], sort=False):
        done = group[group["state"] == "done"]
        cell = first[(row, column)]
        results.append(CellResult(cell.row, cell.column, len(group), list(done["summary"]),
                                  int((group["state"] == "diverged").sum()), list(done["metrics"]),
                                  int((group["state"] == CORRUPT).sum())))
    return results


@dataclass
class TimeToAccuracy:
    """Iterations a cell's runs need to reach their row's BP final test error
    (median over the runs; None: not reached by most), times the measured
    seconds per iteration of its method on the speed file's hardware."""
    iterations: float | None
    seconds_per_iteration: float | None
    bp_seconds: float | None  # BP's time to its own final error, the ratio's denominator

    @property
    def seconds(self) -> float | None:
        if self.iterations is None or self.seconds_per_iteration is None:
            return None
        return self.iterations * self.seconds_per_iteration

    def text(self) -> str:
        if self.iterations is None:
            return "not reached"
        if self.seconds is None:
            return f"{self.iterations:.0f} it (no speed measured for it)"
        ratio = f" ({self.seconds / self.bp_seconds:.2f}x BP)" if self.bp_seconds else ""
        return (f"{self.iterations:.0f} it x {1000 * self.seconds_per_iteration:.0f} ms = "
                f"{self.seconds / 60:.1f} min{ratio}")


def speed_key(method: str, ranks: int) -> str:
    """A measurement's entry in a speed record (`bench speedup --save`): "bp"
    is BP in one process with all cores; the rest "<method> K=<k>", on K ranks."""
    return "bp" if (method, ranks) == ("bp", 1) else f"{method} K={ranks}"


@dataclass(frozen=True)
class Speeds:
    """A preset's speed records (`bench speedup --save`, one per model, all
    measured on one machine in one precision: load_speed checks it). Read
    like one record (``speeds["hardware"]``); ``model`` lists them all."""

    records: tuple[dict[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key == "model":
            return ", ".join(str(r.get("model")) for r in self.records)
        return self.records[0].get(key, default)

    def per_iteration(self, method: str, options: dict[str, Any], model: str, splits: int) -> float | None:
        """Seconds per iteration of a run of ``method`` with ``options`` at K =
        ``splits`` on ``model``, or None (not measured). A measurement counts
        for a run whose options, defaults filled in, are the ones it was
        measured at ("gpipe[microbatches=4] K=2" for GPipe M = 4; "fdg K=2"
        for any FDG run at the defaults, beta and staleness included). BP's
        are those of one process with all cores, whatever K its run split
        into (split BP computes exactly what unsplit BP does)."""
        ranks = 1 if method == "bp" else splits
        wanted = _filled(method, options)
        for record in self.records:
            if record.get("model") not in (None, model):
                continue
            for key, seconds in record["seconds_per_iteration"].items():
                label, _, k = key.rpartition(" K=") if key != "bp" else ("bp", "", "1")
                name, _, given = label.partition("[")
                if name == method and k == str(ranks) and _measured_at(name, given.rstrip("]")) == wanted:
                    return seconds
        return None


def _measured_at(method: str, text: str) -> dict[str, Any] | None:
    """The options a speed record's label names (``microbatches=4,predict=spectrain``), as _filled gives them;
    None for a label this version cannot read (an option since renamed or removed): it matches no run."""
    from ..errors import UserError

    try:
        return _filled(method, dict(item.split("=", 1) for item in text.split(",")) if text else {})
    except (UserError, ValueError):
        return None


def _filled(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """A method's options that change the time an iteration takes, as a run records them, defaults filled in
    (a label's values are strings: make_method converts them to each option's type; "False" as a bool would
    not, so bools are read from their names). Options that do not change it (beta, a loss weight) are left
    out: one measurement counts for every value of them."""
    from ..method import all_options, make_method

    known = all_options()
    typed = {k: (v == "True" if k in known and known[k].type is bool and isinstance(v, str) else v)
             for k, v in options.items()}  # an option the method lacks: make_method refuses it
    made = make_method(method, **typed)
    timed = {o.name for o in made.options if o.affects_time}
    return {k: v for k, v in made.option_values().items() if k in timed}


def time_to_accuracy(results: list[CellResult], speed: Speeds,
                     reference: str | None) -> dict[tuple[str, str], TimeToAccuracy]:
    """Per (row, column): time to the row's BP final error (the median over
    the finished seeds of the ``reference`` column, the spec's BP; none
    without one). A cell reaches it when at least half of its runs
    (diverged ones counted) do, at the median iteration of those that do.
    ``speed``: the preset's `bench speedup --save` records (Speeds.per_iteration
    picks each cell's: its model, K and options)."""
    out = {}
    for r in results:
        bp = next((x for x in results if x.row.id == r.row.id and x.column.id == reference), None)
        target = bp.median("final_test_error") if bp is not None else None
        if target is None or not (r.histories or r.diverged):  # no BP result, or no run of this cell yet
            continue

        def reached(result: CellResult) -> float | None:
            its = [next((h["iteration"] for h in history if h is not None and h["test_error"] <= target), None)
                   for history in result.histories]
            hit = [i for i in its if i is not None]
            return statistics.median(hit) if hit and len(hit) * 2 >= len(its) + result.diverged else None

        def per_iteration(result: CellResult) -> float | None:
            return speed.per_iteration(result.column.method, result.column.options_in(result.row), result.row.model,
                                       result.row.splits)

        bp_its, bp_speed = reached(bp), per_iteration(bp)
        bp_seconds = bp_its * bp_speed if bp_its is not None and bp_speed is not None else None
        out[(r.row.id, r.column.id)] = TimeToAccuracy(reached(r), per_iteration(r), bp_seconds)
    return out
