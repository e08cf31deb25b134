"""The measures a table spec can report (its ``measure`` key), as a
registry: for each, the tables it renders (which summary key, which label),
the text of a cell (given its row's reference cell, the spec's BP), each
table's caption and the CSV it writes. Adding a measure is one Measure here."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..run_record import CORRUPT
from .results import CellResult, Speeds, time_to_accuracy

if TYPE_CHECKING:
    from .specs import Preset

STATISTICS = {"final": ("final_test_error", "final-epoch"), "best": ("best_test_error", "best-epoch")}

# A CSV: its header, then one line per cell.
CsvLines = tuple[list[str], list[list[Any]]]


@dataclass(frozen=True)
class Measure:
    name: str
    description: str
    # The tables it renders: name -> (the runs' summary key whose median a cell reports, its label).
    statistics: dict[str, tuple[str, str]]
    # A cell's text: (the cell, its row's reference cell or None, the summary key, the number of classes).
    cell_text: Callable[[CellResult, "CellResult | None", str, int], str]
    # A table's caption: (the preset, the table's name, the data's descriptions).
    caption: Callable[["Preset", str, list[str]], str]
    # The CSV: (the preset, results, speed record or None, number of classes).
    csv: Callable[["Preset", list[CellResult], "dict[str, Any] | None", int], CsvLines]


def _head(preset: Preset) -> str:
    return f"{preset.spec.title}, preset {preset.name} ({preset.description})"


def _data(datasets: list[str]) -> str:
    return "; ".join(datasets) if datasets else "no finished runs yet"


def _no_result(r: CellResult) -> str:
    """A cell without a number: why (diverged and corrupt runs of those expected), or missing."""
    why = [f"{word} ({count}/{r.expected})" for word, count in (("diverged", r.diverged), (CORRUPT, r.corrupt))
           if count]
    return ", ".join(why) or "missing"


def _left_out(r: CellResult, diverged: bool = True) -> str:
    """The runs a cell's number does not count, after its n."""
    return (f", {r.diverged} diverged" if r.diverged and diverged else "") + (
        f", {r.corrupt} {CORRUPT}" if r.corrupt else "")


def _error_cell_text(r: CellResult, reference: CellResult | None, key: str, num_classes: int) -> str:
    ours = r.median(key)
    paper = "-" if r.paper is None else f"{r.paper:.2f}"
    if ours is None:
        return f"{_no_result(r)} / {paper}"
    diff = "-" if r.paper is None else f"{ours - r.paper:+.2f}"
    return f"{ours:.2f} (n={len(r.finished)}{_left_out(r)}) / {paper} / {diff}"


def _time_cell_text(r: CellResult, bp: CellResult | None, key: str, num_classes: int) -> str:
    def speedup(ref: float | None, value: float | None) -> str:
        return f" ({ref / value:.2f}x)" if ref and value else ""

    paper_bp = bp.paper if bp is not None else None
    paper = "-" if r.paper is None else f"{r.paper:.1f} s{speedup(paper_bp, r.paper)}"
    if r.seconds is None:
        return f"{_no_result(r)} / {paper}"
    ours = (f"{r.seconds:.1f} s{speedup(bp.seconds if bp is not None else None, r.seconds)} "
            f"(n={len(r.finished)}{_left_out(r, diverged=False)})")
    return f"{ours} / {paper}"


BLOW_UP = 10.0  # x chance-level loss ln(C): logits that large mean the run blew up without reaching NaN


@dataclass
class Stability:
    """A stability-map cell: seeds that diverged (non-finite loss, the run
    stopped), seeds that blew up (finished, but some epoch's mean training
    loss above BLOW_UP x ln(C), the loss of uniform guessing: exploded
    logits, as a run that never recovers shows), and the others' median
    last-epoch training loss."""
    diverged: int
    blew_up: int
    expected: int
    survivors_loss: float | None

    @classmethod
    def of(cls, r: CellResult, num_classes: int) -> "Stability":
        limit = BLOW_UP * math.log(num_classes)
        blown = [max(h["train_loss"] for h in history) > limit if history else False for history in r.histories]
        losses = [s["final_train_loss"] for s, b in zip(r.finished, blown) if not b
                  and s.get("final_train_loss") is not None]
        return cls(r.diverged, sum(blown), r.expected, statistics.median(losses) if losses else None)


def _stability_cell_text(r: CellResult, bp: CellResult | None, key: str, num_classes: int) -> str:
    """Seeds that diverged or blew up, and the others' last-epoch training
    loss beside BP's (same iterations, same data)."""
    cell = Stability.of(r, num_classes)
    text = f"{cell.diverged}/{cell.expected} diverged, {cell.blew_up} blew up" + (
        f", {r.corrupt}/{r.expected} {CORRUPT}" if r.corrupt else "")
    if cell.survivors_loss is None:
        return text + ("" if cell.diverged or cell.blew_up else ", none finished")
    reference = Stability.of(bp, num_classes).survivors_loss if bp is not None and bp is not r else None
    return text + f"; loss {cell.survivors_loss:.3f}" + (
        f" ({cell.survivors_loss - reference:+.3f} vs BP)" if reference is not None else "")


def _error_caption(preset: Preset, stat: str, datasets: list[str]) -> str:
    return (f"{_head(preset)}. Each cell: ours = median over n seeds of the "
            f"{STATISTICS[stat][1]} test error / the paper's number (the column named in the header) / "
            f"ours - paper. Data: {_data(datasets)}.")


def _time_caption(preset: Preset, stat: str, datasets: list[str]) -> str:
    return (f"{_head(preset)}. Each cell: ours = seconds per epoch at the median "
            f"over n runs of the measured training rate (speedup over BP) / the paper's. Data: {_data(datasets)}.")


def _stability_caption(preset: Preset, stat: str, datasets: list[str]) -> str:
    return (f"{_head(preset)}. Each cell: seeds that diverged (non-finite loss) "
            f"of those run, and that blew up (an epoch's mean training loss above {BLOW_UP:g} x ln(classes), "
            f"exploded logits); the median over the others of the last epoch's mean training loss, and its "
            f"difference from BP's at the same iterations. Data: {_data(datasets)}.")


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _tta_fields(tta: dict | None, r: CellResult) -> list[str]:
    if tta is None:
        return []
    t = tta.get((r.row.id, r.column.id))
    if t is None:
        return ["", "", "", ""]
    ratio = t.seconds / t.bp_seconds if t.seconds is not None and t.bp_seconds else None
    return ["" if t.iterations is None else f"{t.iterations:.0f}", _fmt(t.seconds_per_iteration), _fmt(t.seconds),
            _fmt(ratio)]


def _error_csv(preset: Preset, results: list[CellResult], speed: Speeds | None,
               num_classes: int) -> CsvLines:
    tta = time_to_accuracy(results, speed, preset.spec.reference) if speed is not None else None
    header = ["table", "preset", "row", "column", "model", "splits", "method", "options", "runs_expected",
              "runs_finished", "runs_diverged", "final_error_median", "best_error_median", "paper_column",
              "paper_error", "final_minus_paper", "best_minus_paper", "dataset"] + (
        ["iterations_to_bp_final", "seconds_per_iteration", "seconds_to_bp_final", "ratio_to_bp"]
        if tta is not None else [])
    lines = []
    for r in results:
        final, best = r.median("final_test_error"), r.median("best_test_error")
        options = ";".join(f"{k}={v}" for k, v in sorted(r.column.options.items()))
        if r.column.beta_from_row:
            options = ";".join(filter(None, [options, f"beta={r.row.best_beta}"]))
        lines.append([preset.spec.name, preset.name, r.row.id, r.column.id, r.row.model, r.row.splits, r.column.method,
                      options, r.expected, len(r.finished), r.diverged, _fmt(final), _fmt(best),
                      r.paper_column or "", _fmt(r.paper),
                      _fmt(None if final is None or r.paper is None else final - r.paper),
                      _fmt(None if best is None or r.paper is None else best - r.paper),
                      "|".join(sorted({s["dataset"] for s in r.finished}))] + _tta_fields(tta, r))
    return header, lines


def _time_csv(preset: Preset, results: list[CellResult], speed: Speeds | None,
              num_classes: int) -> CsvLines:
    header = ["table", "preset", "row", "column", "model", "splits", "method", "runs_expected", "runs_finished",
              "images_per_s_median", "seconds_per_epoch", "paper_seconds", "engine"]
    lines = []
    for r in results:
        rate = r.median("images_per_s")
        lines.append([preset.spec.name, preset.name, r.row.id, r.column.id, r.row.model, r.row.splits, r.column.method,
                      r.expected, len(r.finished), "" if rate is None else f"{rate:.2f}",
                      "" if r.seconds is None else f"{r.seconds:.2f}", "" if r.paper is None else r.paper,
                      r.column.run.get("engine", "")])
    return header, lines


def _stability_csv(preset: Preset, results: list[CellResult], speed: Speeds | None,
                   num_classes: int) -> CsvLines:
    header = ["table", "preset", "row", "column", "model", "splits", "method", "options", "warmup",
              "runs_expected", "runs_finished", "runs_diverged", "runs_blew_up", "survivors_final_train_loss_median"]
    lines = []
    for r in results:
        cell = Stability.of(r, num_classes)
        loss = cell.survivors_loss
        run = {**preset.run, **r.column.run}  # a column's run keys override its preset's
        warmup = f"{run.get('warmup', 'constant')} x{run['warmup_epochs']}" if run.get("warmup_epochs") else "none"
        lines.append([preset.spec.name, preset.name, r.row.id, r.column.id, r.row.model, r.row.splits, r.column.method,
                      ";".join(f"{k}={v}" for k, v in sorted(r.column.options.items())), warmup, r.expected,
                      len(r.finished), r.diverged, cell.blew_up, "" if loss is None else f"{loss:.4f}"])
    return header, lines


MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("error", "test error (%): the final epoch's and the best epoch's", STATISTICS, _error_cell_text,
            _error_caption, _error_csv),
    Measure("time", "seconds per epoch at the measured training rate", {"time": ("images_per_s", "")},
            _time_cell_text, _time_caption, _time_csv),
    Measure("stability", "divergences, blow-ups and the survivors' loss", {"stability": ("final_train_loss", "")},
            _stability_cell_text, _stability_caption, _stability_csv),
)}
