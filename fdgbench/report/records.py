"""A results root as one pandas DataFrame: one row per run directory, indexed
by the directory's name, with its state (``sweep.run_state``), its config
fields (a method's options as ``option.<name>``), its summary's fields where
it has one (flattened as ``summary.<field>``, and whole as ``summary``), and
``metrics``: its per-epoch records (a list of dicts). Tables,
plots and ``sweep status`` read runs through this frame."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..runs import RunDirectory

SUMMARY_PREFIX = "summary."


def run_records(root: str | Path, now: float | None = None) -> pd.DataFrame:
    from ..sweep import run_state

    rows = []
    root = Path(root)
    for path in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
        run = RunDirectory(path)
        if not (path / "config.json").is_file():
            continue  # not a run directory (or one that has not written its config yet)
        config = run.read_json("config.json")
        row = {"run": path.name, "path": str(path), "state": run_state(run, now), "metrics": run.metrics()}
        row.update({k: v for k, v in config.items() if k != "method_options"})
        row.update({f"option.{k}": v for k, v in config.get("method_options", {}).items()})
        summary = run.read_json("summary.json") if run.is_done else None
        row["summary"] = summary
        row.update({SUMMARY_PREFIX + k: v for k, v in (summary or {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else ["run", "path", "state", "metrics", "summary"])
    return frame.set_index("run", drop=False)


def planned_records(cells: list, root: str | Path) -> pd.DataFrame:
    """One row per planned run of ``cells`` (a preset's, in their order):
    ``row``, ``column``, ``seed``, ``run`` (its directory's name) and what
    the results root records for it; a run with no directory is ``missing``,
    with no metrics and no summary."""
    records = run_records(root)
    planned = pd.DataFrame({"row": [c.row.id for c in cells], "column": [c.column.id for c in cells],
                            "seed": [c.seed for c in cells],
                            "run": [RunDirectory.for_config(root, c.config.to_dict()).path.name for c in cells]})
    joined = planned.join(records[["state", "summary", "metrics"]], on="run")
    absent = joined["state"].isna()
    joined.loc[absent, "state"] = "missing"
    joined["metrics"] = [m if isinstance(m, list) else [] for m in joined["metrics"]]
    joined["summary"] = [s if isinstance(s, dict) else None for s in joined["summary"]]
    return joined
