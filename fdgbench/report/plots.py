"""Plots from run directories (PNG and SVG): test error against epoch for
every method of a table row, with the paper's final number dotted."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..runs import RunDirectory
from .specs import Cell, TableSpec


def plot_curves(spec: TableSpec, cells: list[Cell], root: Path, row_id: str, out: Path, preset: str) -> list[Path]:
    import matplotlib.ticker
    import seaborn as sns

    ax, save = _figure(out, f"{spec.title}\n{row_id}, preset {preset}; dotted: the paper's final number (300 epochs)",
                       "test error (%), median over seeds")
    mine = [c for c in cells if c.row.id == row_id]
    columns = list(dict.fromkeys(c.column.id for c in mine))
    palette = dict(zip(columns, sns.color_palette("tab10", len(columns))))
    drawn = 0
    for column in columns:
        runs = [RunDirectory.for_config(root, c.config.to_dict()).metrics() for c in mine if c.column.id == column]
        runs = [r for r in runs if r]
        cell = next(c for c in mine if c.column.id == column)
        if runs:
            epochs = range(1, max(len(r) for r in runs) + 1)
            median = [statistics.median(r[e - 1]["test_error"] for r in runs if len(r) >= e) for e in epochs]
            ax.plot(list(epochs), median, marker="o", color=palette[column], label=f"{column} (n={len(runs)})")
            drawn += 1
        paper = cell.row.paper.get(cell.column.paper[-1]) if cell.column.paper else None
        if paper is not None:
            ax.axhline(paper, color=palette[column], linestyle=":", linewidth=1)
    if not drawn:
        raise ValueError(f"no run of row '{row_id}' has finished an epoch under {root}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return save()


def _figure(out: Path, title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)

    def save() -> list[Path]:
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths = [out.with_suffix(".png"), out.with_suffix(".svg")]
        for p in paths:
            fig.savefig(p, dpi=150)
        plt.close(fig)
        return paths

    return ax, save


def plot_beta(spec: TableSpec, results: list, out: Path, preset: str) -> list[Path]:
    """Final test error against FDG's beta, one line per row; the paper's
    numbers (its best beta and beta = 1) as crosses."""
    import seaborn as sns

    ax, save = _figure(out, f"{spec.title}, preset {preset}\nmedian over seeds of the final-epoch error; "
                       "x: the paper's numbers", "test error (%)")
    rows = list(dict.fromkeys(r.row.id for r in results))
    colours = dict(zip(rows, sns.color_palette("tab10", len(rows))))
    drawn = 0
    for row in rows:
        mine = sorted((r for r in results if r.row.id == row and "beta" in r.column.options),
                      key=lambda r: r.column.options["beta"])
        points = [(r.column.options["beta"], r.median("final_test_error")) for r in mine]
        points = [(b, e) for b, e in points if e is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color=colours[row], label=f"{row} (ours)")
            drawn += 1
        paper = [(r.column.options["beta"], r.paper) for r in mine if r.paper is not None]
        if paper:
            ax.scatter(*zip(*paper), marker="x", color=colours[row], label=f"{row} (paper, 300 epochs)")
    if not drawn:
        raise ValueError("no finished runs to plot")
    ax.set_xlabel("beta (gradient shrinking)")
    return save()


def plot_bars(spec: TableSpec, results: list, out: Path, preset: str) -> list[Path]:
    """Final test error of every column, grouped by row (e.g. the staleness ablation)."""
    ax, save = _figure(out, f"{spec.title}, preset {preset}\nmedian over seeds of the final-epoch error; "
                       "hatched: the paper's number", "test error (%)")
    rows = list(dict.fromkeys(r.row.id for r in results))
    columns = list(dict.fromkeys(r.column.id for r in results))
    width = 0.8 / len(columns)
    drawn = 0
    for j, column in enumerate(columns):
        for i, row in enumerate(rows):
            r = next(x for x in results if x.row.id == row and x.column.id == column)
            x = i + (j - (len(columns) - 1) / 2) * width
            value = r.median("final_test_error")
            if value is not None:
                ax.bar(x, value, width, color=f"C{j}", label=column if i == 0 else None)
                drawn += 1
            if r.paper is not None:
                ax.bar(x, r.paper, width * 0.5, color="none", edgecolor="black", hatch="//",
                       label="paper" if (i, j) == (0, 0) else None)
    if not drawn:
        raise ValueError("no finished runs to plot")
    ax.set_xticks(range(len(rows)), rows)
    return save()


def plot_speedup(model: str, splits: list[int], predicted: dict[str, list[float | None]],
                 measured: dict[str, dict[int, float]], out: Path, note: str) -> list[Path]:
    """Speedup over BP on one worker against K: the simulator's prediction
    dashed, measured runs as dots; the ideal K dotted."""
    ax, save = _figure(out, f"{model}: speedup over BP on one worker\n{note}", "speedup over BP (one worker)")
    ax.plot(splits, splits, color="grey", linestyle=":", label="K (ideal)")
    for j, (method, values) in enumerate(predicted.items()):
        points = [(k, v) for k, v in zip(splits, values) if v is not None]
        if points:
            ax.plot(*zip(*points), linestyle="--", color=f"C{j}", label=f"{method} (simulated)")
        if measured.get(method):
            ks = sorted(measured[method])
            ax.plot(ks, [measured[method][k] for k in ks], "o", color=f"C{j}", markersize=8,
                    label=f"{method} (measured)")
    ax.set_xlabel("K (workers)")
    ax.set_xticks(splits)
    return save()
