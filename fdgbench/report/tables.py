"""Paper tables from run directories only: each cell is the median over the
seeds that finished (n shown) of the final-epoch test error (and, in a second
table, the best epoch's), beside the paper's number and the difference.
Missing, diverged and corrupt runs (records that cannot be used, named on
stderr; run_record.read_run) are marked, never dropped, and never counted in n.
Markdown, LaTeX (booktabs) and CSV (whose runs_finished leaves corrupt runs
out; its columns are fixed for readers of it)."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import build_model, count_parameters
from ..run_record import CORRUPT
from .records import planned_records
from .specs import Cell, Column, Row, TableSpec

STATISTICS = {"final": ("final_test_error", "final-epoch"), "best": ("best_test_error", "best-epoch")}
STABILITY = {"stability": ("final_train_loss", "")}
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


def seconds_per_iteration(speed: dict[str, Any], method: str, model: str, splits: int) -> float | None:
    """The speed record's seconds per iteration for a run of ``method`` at K =
    ``splits``, or None (not measured, or the record is for another model).
    BP's are those of one process with all cores, whatever K its run split
    into (split BP computes exactly what unsplit BP does)."""
    if speed.get("model") not in (None, model):
        return None
    return speed["seconds_per_iteration"].get(speed_key(method, 1 if method == "bp" else splits))


def time_to_accuracy(results: list[CellResult], speed: dict[str, Any]) -> dict[tuple[str, str], TimeToAccuracy]:
    """Per (row, column): time to the row's BP final error (the median over
    BP's finished seeds). A cell reaches it when at least half of its runs
    (diverged ones counted) do, at the median iteration of those that do.
    ``speed``: a `bench speedup --save` record; its seconds per iteration
    ("bp": one process, all cores; "<method> K=<k>": K ranks, the method's
    default options) count only for its model and batch size."""
    out = {}
    for r in results:
        bp = next((x for x in results if x.row.id == r.row.id and x.column.method == "bp"), None)
        target = bp.median("final_test_error") if bp is not None else None
        if target is None or not (r.histories or r.diverged):  # no BP result, or no run of this cell yet
            continue

        def reached(result: CellResult) -> float | None:
            its = [next((h["iteration"] for h in history if h is not None and h["test_error"] <= target), None)
                   for history in result.histories]
            hit = [i for i in its if i is not None]
            return statistics.median(hit) if hit and len(hit) * 2 >= len(its) + result.diverged else None

        def per_iteration(result: CellResult) -> float | None:
            return seconds_per_iteration(speed, result.column.method, result.row.model, result.row.splits)

        bp_its, bp_speed = reached(bp), per_iteration(bp)
        bp_seconds = bp_its * bp_speed if bp_its is not None and bp_speed is not None else None
        out[(r.row.id, r.column.id)] = TimeToAccuracy(reached(r), per_iteration(r), bp_seconds)
    return out


def _params(model: str, num_classes: int) -> str:
    with torch.device("meta"):
        return f"{count_parameters(build_model(model, num_classes)) / 1e6:.2f}M"


def _no_result(r: CellResult) -> str:
    """A cell without a number: why (diverged and corrupt runs of those expected), or missing."""
    why = [f"{word} ({count}/{r.expected})" for word, count in (("diverged", r.diverged), (CORRUPT, r.corrupt))
           if count]
    return ", ".join(why) or "missing"


def _left_out(r: CellResult, diverged: bool = True) -> str:
    """The runs a cell's number does not count, after its n."""
    return (f", {r.diverged} diverged" if r.diverged and diverged else "") + (
        f", {r.corrupt} {CORRUPT}" if r.corrupt else "")


def _cell_text(r: CellResult, key: str) -> str:
    ours = r.median(key)
    paper = "-" if r.paper is None else f"{r.paper:.2f}"
    if ours is None:
        return f"{_no_result(r)} / {paper}"
    diff = "-" if r.paper is None else f"{ours - r.paper:+.2f}"
    return f"{ours:.2f} (n={len(r.finished)}{_left_out(r)}) / {paper} / {diff}"


def _time_cell_text(r: CellResult, bp: CellResult | None) -> str:
    def speedup(ref: float | None, value: float | None) -> str:
        return f" ({ref / value:.2f}x)" if ref and value else ""

    paper_bp = bp.paper if bp is not None else None
    paper = "-" if r.paper is None else f"{r.paper:.1f} s{speedup(paper_bp, r.paper)}"
    if r.seconds is None:
        return f"{_no_result(r)} / {paper}"
    ours = (f"{r.seconds:.1f} s{speedup(bp.seconds if bp is not None else None, r.seconds)} "
            f"(n={len(r.finished)}{_left_out(r, diverged=False)})")
    return f"{ours} / {paper}"


def _grid(spec: TableSpec, results: list[CellResult], key: str, num_classes: int) -> tuple[list[str], list[list[str]]]:
    rows = list(dict.fromkeys(r.row.id for r in results))
    columns = list(dict.fromkeys(r.column.id for r in results))
    by = {(r.row.id, r.column.id): r for r in results}
    def title(column: str) -> str:
        paper = by[(rows[0], column)].paper_column
        return column if paper in (None, column) else f"{column} (vs {paper})"

    header = ["row", "K", "params (paper)"] + [title(c) for c in columns]
    lines = []
    for row_id in rows:
        row = by[(row_id, columns[0])].row
        params = f"{_params(row.model, num_classes)} ({row.paper_params or '-'})"
        if spec.measure == "time":
            cells = [_time_cell_text(by[(row_id, c)], by.get((row_id, "BP"))) for c in columns]
        elif spec.measure == "stability":
            cells = [_stability_cell_text(by[(row_id, c)], by.get((row_id, "BP")), num_classes) for c in columns]
        else:
            cells = [_cell_text(by[(row_id, c)], key) for c in columns]
        lines.append([row.id, str(row.splits), params] + cells)
    return header, lines


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


def _stability_cell_text(r: CellResult, bp: CellResult | None, num_classes: int) -> str:
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


def _statistics(spec: TableSpec) -> dict[str, tuple[str, str]]:
    """The tables a spec renders: final- and best-epoch errors, one time table, or one stability map."""
    if spec.measure == "stability":
        return STABILITY
    return STATISTICS if spec.measure == "error" else {"time": ("images_per_s", "")}


def _caption(spec: TableSpec, preset: str, preset_text: str, stat: str, datasets: list[str]) -> str:
    data = "; ".join(datasets) if datasets else "no finished runs yet"
    if stat == "stability":
        return (f"{spec.title}, preset {preset} ({preset_text}). Each cell: seeds that diverged (non-finite loss) "
                f"of those run, and that blew up (an epoch's mean training loss above {BLOW_UP:g} x ln(classes), "
                f"exploded logits); the median over the others of the last epoch's mean training loss, and its "
                f"difference from BP's at the same iterations. Data: {data}.")
    if stat == "time":
        return (f"{spec.title}, preset {preset} ({preset_text}). Each cell: ours = seconds per epoch at the median "
                f"over n runs of the measured training rate (speedup over BP) / the paper's. Data: {data}.")
    return (f"{spec.title}, preset {preset} ({preset_text}). Each cell: ours = median over n seeds of the "
            f"{STATISTICS[stat][1]} test error / the paper's number (the column named in the header) / "
            f"ours - paper. Data: {data}.")


def _tta_grid(results: list[CellResult], tta: dict[tuple[str, str], TimeToAccuracy]) -> tuple[list[str], list[list[str]]]:
    rows = list(dict.fromkeys(r.row.id for r in results))
    columns = list(dict.fromkeys(r.column.id for r in results))
    splits = {r.row.id: r.row.splits for r in results}
    lines = [[row, str(splits[row])] + [tta[(row, c)].text() if (row, c) in tta else "-" for c in columns]
             for row in rows]
    return ["row", "K", *columns], lines


def _tta_caption(speed: dict[str, Any]) -> str:
    return (f"Time to BP's final test error: the iterations a run needs until an epoch's test error is at most "
            f"the row's BP final error (the median over the seeds that get there; a cell gets there when at least "
            f"half of its seeds do, diverged ones counted; a property of the runs), times the seconds per "
            f"iteration measured by `fdgbench bench speedup` for {speed.get('model', 'the rows')} (batch "
            f"{speed.get('batch_size', '?')}) on {speed['hardware']} ({speed['workers']}; "
            f"amp {speed['amp']}{', channels-last' if speed['channels_last'] else ''}; measured {speed['measured']}); "
            f"ratio to BP's. Iterations are counted at epoch ends, so each is rounded up to a whole epoch; "
            f"-: no run of the cell (or of BP) has finished.")


def render_markdown(spec: TableSpec, preset: str, preset_text: str, results: list[CellResult], num_classes: int,
                    datasets: list[str], speed: dict[str, Any] | None = None) -> str:
    out = [f"# {spec.title}: preset {preset}", ""]
    for stat, (key, _) in _statistics(spec).items():
        header, lines = _grid(spec, results, key, num_classes)
        out += [_caption(spec, preset, preset_text, stat, datasets), "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        out.append("")
    if speed is not None:
        header, lines = _tta_grid(results, time_to_accuracy(results, speed))
        out += [_tta_caption(speed), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        out.append("")
    notes = [*spec.footnotes, *spec.preset(preset).get("footnotes", [])]  # the spec's, then this preset's
    out += ["Notes:", ""] + [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    out += ["", f"Source of the paper's numbers: {spec.source}.", ""]
    return "\n".join(out)


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def render_latex(spec: TableSpec, preset: str, preset_text: str, results: list[CellResult], num_classes: int,
                 datasets: list[str], speed: dict[str, Any] | None = None) -> str:
    out = [f"% {spec.title}, preset {preset}: generated by `fdgbench table {spec.name}`; do not edit"]
    blocks = [(_caption(spec, preset, preset_text, stat, datasets), *_grid(spec, results, key, num_classes))
              for stat, (key, _) in _statistics(spec).items()]
    if speed is not None:
        blocks.append((_tta_caption(speed), *_tta_grid(results, time_to_accuracy(results, speed))))
    for caption, header, lines in blocks:
        fixed = 3 if header[2:3] == ["params (paper)"] else 2
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                r"\caption{" + _tex(caption) + "}",
                r"\begin{tabular}{" + "l" * fixed + "c" * (len(header) - fixed) + "}", r"\toprule",
                " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(_tex(c) for c in line) + r" \\" for line in lines]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def _tta_fields(tta: dict | None, r: CellResult, fmt) -> list[str]:
    if tta is None:
        return []
    t = tta.get((r.row.id, r.column.id))
    if t is None:
        return ["", "", "", ""]
    ratio = t.seconds / t.bp_seconds if t.seconds is not None and t.bp_seconds else None
    return ["" if t.iterations is None else f"{t.iterations:.0f}", fmt(t.seconds_per_iteration), fmt(t.seconds),
            fmt(ratio)]


def render_csv(spec: TableSpec, preset: str, results: list[CellResult], speed: dict[str, Any] | None = None,
               num_classes: int = 10) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if spec.measure == "time":
        writer.writerow(["table", "preset", "row", "column", "model", "splits", "method", "runs_expected",
                         "runs_finished", "images_per_s_median", "seconds_per_epoch", "paper_seconds", "engine"])
        for r in results:
            rate = r.median("images_per_s")
            writer.writerow([spec.name, preset, r.row.id, r.column.id, r.row.model, r.row.splits, r.column.method,
                             r.expected, len(r.finished), "" if rate is None else f"{rate:.2f}",
                             "" if r.seconds is None else f"{r.seconds:.2f}", "" if r.paper is None else r.paper,
                             r.column.run.get("engine", "")])
        return buf.getvalue()
    if spec.measure == "stability":
        writer.writerow(["table", "preset", "row", "column", "model", "splits", "method", "options", "warmup",
                         "runs_expected", "runs_finished", "runs_diverged", "runs_blew_up",
                         "survivors_final_train_loss_median"])
        for r in results:
            cell = Stability.of(r, num_classes)
            loss = cell.survivors_loss
            run = {**spec.preset(preset), **r.column.run}  # a column's run keys override its preset's
            warmup = f"{run.get('warmup', 'constant')} x{run['warmup_epochs']}" if run.get("warmup_epochs") else "none"
            writer.writerow([spec.name, preset, r.row.id, r.column.id, r.row.model, r.row.splits, r.column.method,
                             ";".join(f"{k}={v}" for k, v in sorted(r.column.options.items())), warmup, r.expected,
                             len(r.finished), r.diverged, cell.blew_up, "" if loss is None else f"{loss:.4f}"])
        return buf.getvalue()
    tta = time_to_accuracy(results, speed) if speed is not None else None
    writer.writerow(["table", "preset", "row", "column", "model", "splits", "method", "options", "runs_expected",
                     "runs_finished", "runs_diverged", "final_error_median", "best_error_median", "paper_column",
                     "paper_error", "final_minus_paper", "best_minus_paper", "dataset"]
                    + (["iterations_to_bp_final", "seconds_per_iteration", "seconds_to_bp_final", "ratio_to_bp"]
                       if tta is not None else []))
    for r in results:
        final, best = r.median("final_test_error"), r.median("best_test_error")
        options = ";".join(f"{k}={v}" for k, v in sorted(r.column.options.items()))
        if r.column.beta_from_row:
            options = ";".join(filter(None, [options, f"beta={r.row.best_beta}"]))

        def fmt(x: float | None) -> str:
            return "" if x is None else f"{x:.4f}"

        writer.writerow([spec.name, preset, r.row.id, r.column.id, r.row.model, r.row.splits, r.column.method,
                         options, r.expected, len(r.finished), r.diverged, fmt(final), fmt(best),
                         r.paper_column or "", fmt(r.paper),
                         fmt(None if final is None or r.paper is None else final - r.paper),
                         fmt(None if best is None or r.paper is None else best - r.paper),
                         "|".join(sorted({s["dataset"] for s in r.finished}))] + _tta_fields(tta, r, fmt))
    return buf.getvalue()


SPEED_KEYS = ("seconds_per_iteration", "hardware", "workers", "amp", "channels_last", "measured")


def load_speed(spec: TableSpec, preset: str) -> dict[str, Any] | None:
    """The preset's ``speed`` file (`bench speedup --save`, path relative to the
    spec), for time-to-accuracy; None where the preset names none or it is not
    measured yet (the table says so)."""
    name = spec.preset(preset).get("speed")
    if name is None:
        return None
    path = spec.path.parent / name
    if not path.is_file():
        print(f"note: no time-to-accuracy yet: {path} not found (made by `fdgbench bench speedup ... --save`)",
              file=sys.stderr)
        return None
    try:
        speed = json.loads(path.read_text())
        missing = [k for k in SPEED_KEYS if k not in speed]
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a speed record ({exc}); measure it again with `fdgbench bench speedup "
                        f"--save`") from None
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; measure it again with `fdgbench bench speedup --save`")
    return speed


def write_tables(spec: TableSpec, preset: str, cells: list[Cell], root: Path, target: Path,
                 classes: int) -> tuple[list[Path], int, int]:
    """The preset's tables as Markdown, LaTeX and CSV under ``target``; returns
    the files, the cells with finished runs and the cells."""
    results = collect(spec, cells, root)
    datasets = sorted({s["dataset"] for r in results for s in r.finished})
    text = spec.preset(preset).get("description", "the paper's protocol")
    speed = load_speed(spec, preset)
    outputs = {f"{spec.name}-{preset}.md": render_markdown(spec, preset, text, results, classes, datasets, speed),
               f"{spec.name}-{preset}.tex": render_latex(spec, preset, text, results, classes, datasets, speed),
               f"{spec.name}-{preset}.csv": render_csv(spec, preset, results, speed, classes)}
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, content in outputs.items():
            (target / name).write_text(content)
    except OSError as exc:
        raise UserError(f"cannot write the tables under {target}: {exc.strerror or exc}") from None
    return [target / n for n in outputs], sum(bool(r.finished) for r in results), len(results)
