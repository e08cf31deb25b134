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
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import build_model, count_parameters
from .measures import MEASURES, Measure
from .results import CellResult, Speeds, TimeToAccuracy, collect, time_to_accuracy
from .specs import Cell, Preset, TableSpec


def _params(model: str, num_classes: int) -> str:
    with torch.device("meta"):
        return f"{count_parameters(build_model(model, num_classes)) / 1e6:.2f}M"


NOT_RUN = "n/a"  # a column its row does not run (Row.columns)


def _grid(spec: TableSpec, measure: Measure, results: list[CellResult], key: str,
          num_classes: int) -> tuple[list[str], list[list[str]]]:
    rows = list(dict.fromkeys(r.row.id for r in results))
    columns = list(dict.fromkeys(r.column.id for r in results))
    by = {(r.row.id, r.column.id): r for r in results}
    def title(column: str) -> str:
        paper = next(r.paper_column for r in results if r.column.id == column)
        return column if paper in (None, column) else f"{column} (vs {paper})"

    header = ["row", "K", "params (paper)"] + [title(c) for c in columns]
    lines = []
    for row_id in rows:
        row = next(r.row for r in results if r.row.id == row_id)
        params = f"{_params(row.model, num_classes)} ({row.paper_params or '-'})"
        reference = by.get((row_id, spec.reference)) if spec.reference else None
        cells = [measure.cell_text(by[(row_id, c)], reference, key, num_classes) if (row_id, c) in by else NOT_RUN
                 for c in columns]
        lines.append([row.id, str(row.splits), params] + cells)
    return header, lines


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


def render_markdown(preset: Preset, results: list[CellResult], num_classes: int, datasets: list[str],
                    speed: Speeds | None = None) -> str:
    spec = preset.spec
    out = [f"# {spec.title}: preset {preset.name}", ""]
    measure = MEASURES[spec.measure]
    for stat, (key, _) in measure.statistics.items():
        header, lines = _grid(spec, measure, results, key, num_classes)
        out += [measure.caption(preset, stat, datasets), "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        out.append("")
    if speed is not None:
        header, lines = _tta_grid(results, time_to_accuracy(results, speed, spec.reference))
        out += [_tta_caption(speed), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        out.append("")
    notes = [*spec.footnotes, *preset.footnotes]  # the spec's, then this preset's
    out += ["Notes:", ""] + [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    out += ["", f"Source of the paper's numbers: {spec.source}.", ""]
    return "\n".join(out)


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def render_latex(preset: Preset, results: list[CellResult], num_classes: int, datasets: list[str],
                 speed: Speeds | None = None) -> str:
    spec = preset.spec
    out = [f"% {spec.title}, preset {preset.name}: generated by `fdgbench table {spec.name}`; do not edit"]
    measure = MEASURES[spec.measure]
    blocks = [(measure.caption(preset, stat, datasets),
               *_grid(spec, measure, results, key, num_classes)) for stat, (key, _) in measure.statistics.items()]
    if speed is not None:
        blocks.append((_tta_caption(speed), *_tta_grid(results, time_to_accuracy(results, speed, spec.reference))))
    for caption, header, lines in blocks:
        fixed = 3 if header[2:3] == ["params (paper)"] else 2
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                r"\caption{" + _tex(caption) + "}",
                r"\begin{tabular}{" + "l" * fixed + "c" * (len(header) - fixed) + "}", r"\toprule",
                " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(_tex(c) for c in line) + r" \\" for line in lines]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def render_csv(preset: Preset, results: list[CellResult], speed: Speeds | None = None,
               num_classes: int = 10) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header, lines = MEASURES[preset.spec.measure].csv(preset, results, speed, num_classes)
    writer.writerow(header)
    writer.writerows(lines)
    return buf.getvalue()


SPEED_KEYS = ("seconds_per_iteration", "hardware", "workers", "amp", "channels_last", "measured")
SHARED_SPEED_KEYS = ("hardware", "workers", "amp", "channels_last")  # what every record of one preset shares


def load_speed(preset: Preset) -> Speeds | None:
    """The preset's ``speed`` files (`bench speedup --save`, paths relative to
    the spec, one per model), for time-to-accuracy; None where the preset
    names none or none is measured yet (the table says so). The records must
    share their machine, precision and workers: a table's times compare."""
    records = []
    for name in preset.speed:
        path = preset.spec.path.parent / name
        if not path.is_file():
            print(f"note: no time-to-accuracy from {path} yet: not found (made by `fdgbench bench speedup ... "
                  f"--save`)", file=sys.stderr)
            continue
        try:
            speed = json.loads(path.read_text())
            missing = [k for k in SPEED_KEYS if k not in speed]
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path} is not a speed record ({exc}); measure it again with `fdgbench bench speedup "
                            f"--save`") from None
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; measure it again with `fdgbench bench speedup "
                            f"--save`")
        if records and any(speed[k] != records[0][k] for k in SHARED_SPEED_KEYS):
            raise UserError(f"{path} was measured with another {', '.join(SHARED_SPEED_KEYS)} than "
                            f"{preset.spec.path.parent / preset.speed[0]}: one table's times must compare")
        records.append(speed)
    return Speeds(tuple(records)) if records else None


def write_tables(preset: Preset, cells: list[Cell], root: Path, target: Path,
                 classes: int) -> tuple[list[Path], int, int, int]:
    """The preset's tables as Markdown, LaTeX and CSV under ``target``; returns
    the files, the cells with finished runs, the cells whose only runs diverged
    (an outcome, not a gap) and the cells."""
    results = collect(preset.spec, cells, root)
    datasets = sorted({s["dataset"] for r in results for s in r.finished})
    speed = load_speed(preset)
    stem = f"{preset.spec.name}-{preset.name}"
    outputs = {f"{stem}.md": render_markdown(preset, results, classes, datasets, speed),
               f"{stem}.tex": render_latex(preset, results, classes, datasets, speed),
               f"{stem}.csv": render_csv(preset, results, speed, classes)}
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, content in outputs.items():
            (target / name).write_text(content)
    except OSError as exc:
        raise UserError(f"cannot write the tables under {target}: {exc.strerror or exc}") from None
    return ([target / n for n in outputs], sum(bool(r.finished) for r in results),
            sum(bool(r.diverged and not r.finished) for r in results), len(results))
