"""Plots from run directories (PNG and SVG): test error against epoch for
every method of a table row, with the paper's final number dotted."""
from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from .records import planned_records
from .results import Speeds
from .specs import Cell, TableSpec
from .measures import Stability

TITLE_WIDTH = 110  # characters per title line at fontsize 9 across a 9-inch figure
TITLE_CHARS_PER_INCH = TITLE_WIDTH / 9  # the same measure, for figures whose width depends on their content


def plot_curves(spec: TableSpec, cells: list[Cell], root: Path, row_id: str, out: Path, preset: str,
                speed: Speeds | None = None) -> list[Path]:
    """Test error against epoch for every column of a row; with ``speed`` (a
    `bench speedup --save` record), against the estimated wall-clock
    minutes on its hardware instead (each run's iterations times its
    method's measured seconds per iteration): time-to-accuracy as a curve."""
    import matplotlib.ticker
    import seaborn as sns

    where = "" if speed is None else f"\nx: iterations x seconds per iteration measured on {speed['hardware']}"
    ax, save = _figure(out, f"{spec.title}\n{row_id}, preset {preset}; dotted: the paper's final number (300 epochs)"
                       + where, "test error (%), median over seeds")
    mine = [c for c in cells if c.row.id == row_id]
    planned = planned_records(mine, root)
    columns = list(dict.fromkeys(c.column.id for c in mine))
    palette = dict(zip(columns, sns.color_palette("tab10", len(columns))))
    drawn = 0
    for column in columns:
        # Every run with an epoch recorded, finished or not; a corrupt run has none in the frame (records.py),
        # so it is left out here and from n, with planned_records' warning naming it.
        runs = [r for r in planned.loc[planned["column"] == column, "metrics"] if r]
        cell = next(c for c in mine if c.column.id == column)
        per_iteration = None
        if speed is not None:
            per_iteration = speed.per_iteration(cell.config.method, cell.config.method_options, cell.config.model,
                                                cell.config.splits)
        if runs and (speed is None or per_iteration is not None):
            epochs = range(1, max(len(r) for r in runs) + 1)
            median = [statistics.median(r[e - 1]["test_error"] for r in runs if len(r) >= e) for e in epochs]
            if per_iteration is None:
                xs = list(epochs)
            else:
                longest = max(runs, key=len)
                xs = [longest[e - 1]["iteration"] * per_iteration / 60 for e in epochs]
            ax.plot(xs, median, marker="o", color=palette[column], label=f"{column} (n={len(runs)})")
            drawn += 1
        paper = cell.row.paper.get(cell.column.paper[-1]) if cell.column.paper else None
        if paper is not None:
            ax.axhline(paper, color=palette[column], linestyle=":", linewidth=1)
    if not drawn:
        raise ValueError(f"no run of row '{row_id}' has finished an epoch under {root}"
                         + ("" if speed is None else " with a measured speed"))
    if speed is None:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    else:
        ax.set_xlabel(f"estimated minutes of training on {speed['hardware']}")
    return save()


def diagnostics_by_cell(cells: list[Cell], root: Path) -> dict[tuple[str, str], list[dict]]:
    """(row, column) -> the --diagnose records of its runs' epochs (seed 0's
    run where a cell has several: one curve per cell), in iteration order
    (none from a corrupt run). Read once per command, for the plot and the
    summary alike."""
    out: dict[tuple[str, str], list[dict]] = {}
    first_seeds = planned_records(cells, root).drop_duplicates(["row", "column"])
    for row, column, metrics in zip(first_seeds["row"], first_seeds["column"], first_seeds["metrics"]):
        records = [d for m in metrics for d in m.get("diagnostics", [])]
        if records:
            out[(row, column)] = records
    return out


def plot_diagnostics(spec: TableSpec, cells: list[Cell], found: dict[tuple[str, str], list[dict]], out: Path,
                     preset: str, smooth: int = 5) -> list[Path]:
    """Cosine between the applied and the true gradient against iteration
    (``found``: diagnostics_by_cell's): one panel per (row, stage), one line
    per column (a running median over ``smooth`` measurements, so a single
    noisy batch does not hide the trend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not found:
        raise ValueError("no run has --diagnose records")
    rows = list(dict.fromkeys(c.row.id for c in cells))
    columns = list(dict.fromkeys(c.column.id for c in cells))
    stages = max(c.config.splits for c in cells)
    fig, axes = plt.subplots(len(rows), stages, figsize=(3.2 * stages, 2.8 * len(rows)), sharex=True, sharey=True,
                             squeeze=False)
    for i, row in enumerate(rows):
        splits = next(c.config.splits for c in cells if c.row.id == row)
        for k in range(stages):
            ax = axes[i][k]
            if k >= splits:
                ax.axis("off")
                continue
            for j, column in enumerate(columns):
                points = [(d["iteration"], d["cosine"]) for d in found.get((row, column), []) if d["stage"] == k]
                if points:
                    its, cos = zip(*points)
                    ax.plot(its, _running_median(cos, smooth), color=f"C{j}", linewidth=1.2, label=column)
            ax.set_title(f"{row}: stage {k}" + (" (last)" if k == splits - 1 else ""), fontsize=8)
            ax.grid(alpha=0.3)
            if k == 0:
                ax.set_ylabel("cosine(applied, true)")
            if i == len(rows) - 1:
                ax.set_xlabel("iteration")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    # The grid is 3.2 inches per stage wide, so its title wraps at that width, not the 9-inch plots'.
    fig.suptitle(wrapped_title(f"{spec.title}, preset {preset}: running median of {smooth} measurements",
                               int(TITLE_CHARS_PER_INCH * fig.get_figwidth())), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    paths = [out.with_suffix(".png"), out.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def diagnostics_summary(spec: TableSpec, cells: list[Cell], found: dict[tuple[str, str], list[dict]],
                        preset: str) -> str:
    """Markdown: per row and column, each stage's median cosine, median norm
    ratio and age over the diagnosed iterations (``found``: diagnostics_by_cell's)."""
    rows = list(dict.fromkeys(c.row.id for c in cells))
    columns = list(dict.fromkeys(c.column.id for c in cells))
    lines = [f"# {spec.title}, preset {preset}", "",
             "Per stage: median cosine / median norm ratio |applied| / |true| / age (updates between the "
             "batch's forward and the update applying it), over every diagnosed update.", ""]
    for row in rows:
        splits = next(c.config.splits for c in cells if c.row.id == row)
        lines += [f"## {row}", "", "| column | " + " | ".join(f"stage {k}" for k in range(splits)) + " |",
                  "|---|" + "---|" * splits]
        for column in columns:
            records = found.get((row, column), [])
            texts = []
            for k in range(splits):
                mine = [d for d in records if d["stage"] == k]
                if not mine:
                    texts.append("-")
                    continue
                cos = statistics.median(d["cosine"] for d in mine)
                ratio = statistics.median(d["norm_ratio"] for d in mine)
                age = statistics.median(d["age"] for d in mine)
                texts.append(f"{cos:.3f} / {ratio:.2f} / {age:g}")
            lines.append(f"| {column} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)


def _running_median(values: tuple[float, ...], window: int) -> list[float]:
    return [statistics.median(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def wrapped_title(title: str, width: int = TITLE_WIDTH) -> str:
    """``title`` with each of its lines wrapped at ``width`` characters: a
    spec's title runs to 200, and a figure cuts what passes its edges."""
    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def _figure(out: Path, title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.set_ylabel(ylabel)
    ax.set_title(wrapped_title(title), fontsize=9)
    ax.grid(alpha=0.3)

    def save(legend_beside: bool = True) -> list[Path]:
        # Beside the axes, not on them: inside, "best" still covers a point when every corner holds one. A plot
        # with a right-hand axis of its own keeps it inside (legend_beside=False), over headroom it leaves.
        if legend_beside:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths = [out.with_suffix(".png"), out.with_suffix(".svg")]
        for p in paths:
            fig.savefig(p, dpi=150)
        plt.close(fig)
        return paths

    return ax, save


def _error_lines(ax, results: list, group, x, label, paper_label, paper_dashed: bool) -> int:
    """One line of final test error (median over seeds) against ``x(cell)``
    per ``group(cell)`` (cells whose x is None left out), and the published
    numbers of each group (crosses; joined by a dashed line if
    ``paper_dashed``). Returns how many groups have a finished run."""
    import seaborn as sns

    groups = list(dict.fromkeys(group(r) for r in results))
    colours = dict(zip(groups, sns.color_palette("tab10", len(groups))))
    drawn = 0
    for g in groups:
        mine = sorted((r for r in results if group(r) == g and x(r) is not None), key=x)
        points = [(x(r), r.median("final_test_error")) for r in mine]
        points = [(a, e) for a, e in points if e is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color=colours[g], label=label(mine[0]))
            drawn += 1
        paper = [(x(r), r.paper) for r in mine if r.paper is not None]
        if paper and paper_dashed:
            ax.plot(*zip(*paper), marker="x", linestyle="--", color=colours[g], label=paper_label(mine[0]))
        elif paper:
            ax.scatter(*zip(*paper), marker="x", color=colours[g], label=paper_label(mine[0]))
    if not drawn:
        raise ValueError("no finished runs to plot")
    return drawn


def plot_beta(spec: TableSpec, results: list, out: Path, preset: str) -> list[Path]:
    """Final test error against FDG's beta, one line per row; the paper's
    numbers (its best beta and beta = 1) as crosses."""
    ax, save = _figure(out, f"{spec.title}, preset {preset}\nmedian over seeds of the final-epoch error; "
                       "x: the paper's numbers", "test error (%)")
    _error_lines(ax, results, lambda r: r.row.id, lambda r: r.column.options.get("beta"),
                 lambda r: f"{r.row.id} (ours)", lambda r: f"{r.row.id} (paper, 300 epochs)", paper_dashed=False)
    ax.set_xlabel("beta (gradient shrinking)")
    return save()


def plot_k(spec: TableSpec, results: list, out: Path, preset: str) -> list[Path]:
    """Final test error against K, one line per column; the published
    numbers beside each (crosses, dashed), which may be another network's
    (the spec's footnotes say)."""
    ax, save = _figure(out, f"{spec.title}, preset {preset}\nmedian over seeds of the final-epoch error; "
                       "x, dashed: published (see the table's footnotes)", "test error (%)")
    _error_lines(ax, results, lambda r: r.column.id, lambda r: r.row.splits, lambda r: r.column.id,
                 lambda r: f"{r.paper_column} (published)", paper_dashed=True)
    ax.set_xscale("log", base=2)
    ks = sorted({r.row.splits for r in results})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (stages)")
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


def plot_stability(spec: TableSpec, results: list, out: Path, preset: str, num_classes: int = 10) -> list[Path]:
    """The stability map: per row and column, the share of seeds that
    diverged (bar) and the survivors' last-epoch training loss (dot, right
    axis), so a column that never diverges but trains worse shows as such."""
    ax, save = _figure(out, f"{spec.title}, preset {preset}\nbars: seeds diverged or blew up (share); dots: the others' "
                       "median last-epoch training loss (right axis)", "share of seeds diverged")
    loss_ax = ax.twinx()
    loss_ax.set_ylabel("training loss, last epoch")
    rows = list(dict.fromkeys(r.row.id for r in results))
    columns = list(dict.fromkeys(r.column.id for r in results))
    width = 0.8 / len(rows)
    drawn = 0
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            r = next(x for x in results if x.row.id == row and x.column.id == column)
            done = len(r.finished) + r.diverged
            if not done:
                continue
            x = j + (i - (len(rows) - 1) / 2) * width
            cell = Stability.of(r, num_classes)
            ax.bar(x, (cell.diverged + cell.blew_up) / done, width, color=f"C{i}", alpha=0.45,
                   label=row if j == 0 else None)
            loss = cell.survivors_loss
            if loss is not None:
                loss_ax.plot(x, loss, "o", color=f"C{i}")
            drawn += 1
    if not drawn:
        raise ValueError("no finished or diverged runs to plot")
    ax.set_ylim(0, 1.3)  # headroom: the legend sits above the bars and the dots
    low, high = loss_ax.get_ylim()
    loss_ax.set_ylim(low, high + 0.3 * (high - low))
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    return save(legend_beside=False)  # beside, it would cover the loss axis on the right


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
