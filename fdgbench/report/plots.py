"""Plots from run directories (PNG and SVG): test error against epoch for
every method of a table row, with the paper's final number dotted."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..runs import RunDirectory
from .specs import Cell, TableSpec


def plot_curves(spec: TableSpec, cells: list[Cell], root: Path, row_id: str, out: Path, preset: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    mine = [c for c in cells if c.row.id == row_id]
    columns = list(dict.fromkeys(c.column.id for c in mine))
    palette = dict(zip(columns, sns.color_palette("tab10", len(columns))))
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.set_ylabel("test error (%), median over seeds")
    ax.set_title(f"{spec.title}\n{row_id}, preset {preset}; dotted: the paper's final number (300 epochs)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [out.with_suffix(".png"), out.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
