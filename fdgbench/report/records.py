"""A results root as one pandas DataFrame: one row per run directory, indexed
by the directory's name, with its state (``run_record.read_run``, as everywhere),
``problem`` (why a corrupt run is corrupt, else None), its config fields (a
method's options as ``option.<name>``), its summary's fields where it has one
(flattened as ``summary.<field>``, and whole as ``summary``), and
``metrics``: its per-epoch records (a list of dicts). A corrupt run's row
carries no config, metrics or summary: nothing may use its numbers. Tables,
plots and ``sweep status`` read runs through this frame."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..run_record import corrupt_text, read_run
from ..runs import RunDirectory, name_checked

SUMMARY_PREFIX = "summary."
COLUMNS = ["run", "path", "state", "problem", "metrics", "summary"]


def run_row(path: Path, now: float | None = None) -> dict[str, Any]:
    """One run directory's row of the frame."""
    record = read_run(RunDirectory(path), now)
    row = {"run": path.name, "path": str(path), "state": record.state, "problem": record.problem,
           "metrics": record.metrics, "summary": record.summary}
    config = record.config or {}
    row.update({k: v for k, v in config.items() if k != "method_options"})
    row.update({f"option.{k}": v for k, v in config.get("method_options", {}).items()})
    row.update({SUMMARY_PREFIX + k: v for k, v in (record.summary or {}).items()})
    return row


def _is_run_directory(path: Path) -> bool:
    """A run has written its config, or finished (a done run whose config is
    gone is a run, and a corrupt one); any other folder (a run starting, a
    results root's other contents) is not one yet."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "done").is_file())


def run_records(root: str | Path, now: float | None = None) -> pd.DataFrame:
    root = Path(root)
    with name_checked(root):
        paths = sorted(p for p in root.iterdir() if _is_run_directory(p)) if root.is_dir() else []
    rows = [run_row(path, now) for path in paths]
    frame = pd.DataFrame(rows, columns=None if rows else COLUMNS)
    return frame.set_index("run", drop=False)


def planned_records(cells: list, root: str | Path) -> pd.DataFrame:
    """One row per planned run of ``cells`` (a preset's, in their order):
    ``row``, ``column``, ``seed``, ``run`` (its directory's name) and what
    the results root records for it (a run with no directory is ``missing``,
    with no metrics and no summary). Each corrupt planned run is named in one
    warning line on stderr, once per call: every command reads its runs
    through one call."""
    paths = [RunDirectory.for_config(root, c.config.to_dict()).path for c in cells]
    rows = {path: run_row(path) for path in dict.fromkeys(paths)}  # two cells may name one run: read it once
    planned = pd.DataFrame({"row": [c.row.id for c in cells], "column": [c.column.id for c in cells],
                            "seed": [c.seed for c in cells], "run": [path.name for path in paths]})
    for key in ("state", "problem", "summary", "metrics"):
        planned[key] = [rows[path][key] for path in paths]
    for path, row in rows.items():
        if row["problem"] is not None:
            print(f"warning: left out: {corrupt_text(RunDirectory(path), row['problem'])}", file=sys.stderr,
                  flush=True)
    return planned
