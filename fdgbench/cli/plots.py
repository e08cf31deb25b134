"""`fdgbench plot ...`: curves, ablations, stability, diagnostics, gantt and speedup plots from run directories."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from ..data import num_classes
from ..errors import UserError

from .group import cli
from .options import DEFAULT_RESULTS, method_names, positive_ints, sweep_cells, sweep_options


@cli.group()
def plot() -> None:
    """Plots (PNG and SVG) from run directories."""


@plot.command("gantt")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--first", type=int, help="first iteration drawn (default: the middle of the run)")
@click.option("--iterations", type=int, default=6, show_default=True, help="how many iterations to draw")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="output path without suffix (default: RUN_DIR/gantt)")
def plot_gantt(run_dir: Path, first: int | None, iterations: int, out: Path | None) -> None:
    """Per-stage timeline of a run recorded with --trace."""
    from ..engines.trace import read_trace
    from ..report.gantt import draw_gantt

    trace = run_dir / "trace.json"
    if not trace.is_file():
        raise UserError(f"{trace} not found; record the run with --trace")
    if iterations < 1:
        raise UserError(f"--iterations must be at least 1, got {iterations}")
    try:
        spans, meta = read_trace(trace)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{trace} is not a trace fdgbench wrote: {exc}") from None
    title = (f"{meta.get('method')} {meta.get('model')} K={meta.get('splits')}, {meta.get('engine')} engine, "
             f"{meta.get('threads')} thread(s) per process, batch {meta.get('batch_size')}")
    _write_plot(lambda: draw_gantt(spans, out or run_dir / "gantt", title, first, iterations,
                                   meta.get("steps_per_epoch")), f"{trace}")


def _write_plot(draw: Callable[[], list[Path]], context: str) -> None:
    """Run a plot function; its ValueError (nothing to draw) and OSError
    (unwritable output) become one-line errors; print the files written."""
    try:
        paths = draw()
    except ValueError as exc:
        raise UserError(f"{context}: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot write the plot: {exc.strerror or exc}") from None
    click.echo(" ".join(map(str, paths)))


@plot.command("curves")
@sweep_options
@click.option("--row", help="the table row to draw (default: the preset's first)")
@click.option("--time", "against_time", is_flag=True,
              help="x = estimated wall-clock minutes from the preset's speed file (time-to-accuracy), not epochs")
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path),
              help="output path without suffix (default: paper_tables/results/<table>-<preset>-<row>[-time])")
def plot_curves(table: str, preset: str, seeds: int | None, out: str, row: str | None, against_time: bool,
                plot_out: Path | None) -> None:
    """Test error against epoch (or estimated time) for every method of a table row."""
    from ..report.plots import plot_curves as draw
    from ..report.tables import load_speed
    from ..report.specs import spec_path

    resolved, cells, root = sweep_cells(table, preset, seeds, out)
    spec = resolved.spec
    rows = list(dict.fromkeys(c.row.id for c in cells))
    row = row or rows[0]
    if row not in rows:
        raise UserError(f"{table} preset {preset} has no row '{row}'; rows: {', '.join(rows)}")
    speed = None
    if against_time:
        speed = load_speed(resolved)
        if speed is None:
            raise UserError(f"--time needs the preset's speed file (`speed` in [presets.{preset}], measured by "
                            f"`fdgbench bench speedup --save`)")
    slug = "".join(ch if ch.isalnum() else "-" for ch in row).strip("-").lower() + ("-time" if against_time else "")
    target = plot_out or spec_path(table).parent / "results" / f"{spec.name}-{preset}-{slug}"

    def drawn() -> list[Path]:
        target.parent.mkdir(parents=True, exist_ok=True)
        return draw(spec, cells, root, row, target, preset, speed)

    _write_plot(drawn, f"{table} ({preset})")


def _plot_results(kind: str, table: str, preset: str, seeds: int | None, out: str, plot_out: Path | None) -> None:
    from ..report import plots
    from ..report.specs import spec_path
    from ..report.results import collect

    resolved, cells, root = sweep_cells(table, preset, seeds, out)
    spec = resolved.spec
    target = plot_out or spec_path(table).parent / "results" / f"{spec.name}-{preset}-{kind}"

    def draw() -> list[Path]:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The stability map's blow-up threshold is a multiple of chance-level loss, ln(classes).
        extra = {"num_classes": num_classes(cells[0].config.dataset)} if kind == "stability" else {}
        return getattr(plots, f"plot_{kind}")(spec, collect(spec, cells, root), target, preset, **extra)

    _write_plot(draw, f"{table} ({preset}), runs under {root}")


@plot.command("diagnostics")
@sweep_options
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="output path without suffix")
def plot_diagnostics(table: str, preset: str, seeds: int | None, out: str, plot_out: Path | None) -> None:
    """Cosine of applied vs true gradient per stage against iteration (runs made
    with --diagnose, e.g. `fdgbench sweep diagnostics --preset quick`), and a
    Markdown summary beside the plot."""
    from ..report.plots import diagnostics_by_cell, diagnostics_summary, plot_diagnostics as draw
    from ..report.specs import spec_path

    resolved, cells, root = sweep_cells(table, preset, seeds, out)
    spec = resolved.spec
    target = plot_out or spec_path(table).parent / "results" / f"{spec.name}-{preset}-cosine"
    found = diagnostics_by_cell(cells, root)

    def drawn() -> list[Path]:
        target.parent.mkdir(parents=True, exist_ok=True)
        paths = draw(spec, cells, found, target, preset)
        summary = target.with_suffix(".md")
        summary.write_text(diagnostics_summary(spec, cells, found, preset))
        return [*paths, summary]

    _write_plot(drawn, f"{table} ({preset}), runs under {root}")


def _results_plot(kind: str, doc: str) -> None:
    """Register `fdgbench plot KIND`: a plot of a preset's cell results (report.plots.plot_KIND)."""
    @plot.command(kind, help=doc)
    @sweep_options
    @click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="output path without suffix")
    def command(table: str, preset: str, seeds: int | None, out: str, plot_out: Path | None) -> None:
        _plot_results(kind, table, preset, seeds, out, plot_out)


for _kind, _doc in (
        ("beta", "FDG's final test error against beta (e.g. `fdgbench plot beta ablation_beta --preset quick`)."),
        ("bars", "Every column's final test error by row (e.g. `fdgbench plot bars ablation_staleness`)."),
        ("k", "Every column's final test error against K (e.g. `fdgbench plot k deep_k --preset converge`)."),
        ("stability", "Diverged seeds and survivors' loss per column (e.g. `fdgbench plot stability "
                      "stability_resnet56 --preset map`).")):
    _results_plot(_kind, _doc)


@plot.command("speedup")
@click.option("--model", default="resnet56", show_default=True)
@click.option("--splits", default="2,3,4,8", show_default=True)
@click.option("--methods", default="bp,ddg,fr,dgl,fdg,dp", show_default=True)
@click.option("--preset", default="quick", show_default=True, help="the table6 preset whose runs are the measured points")
@click.option("--out", default=DEFAULT_RESULTS, show_default=True, help="results root (table6 runs under OUT/table6-PRESET)")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="threads per worker in the block profile")
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="output path without suffix")
def plot_speedup(model: str, splits: str, methods: str, preset: str, out: str, batch_size: int, device: str,
                 threads: int, plot_out: Path | None) -> None:
    """Speedup vs K per method: measured (Table 6 runs) and simulated (dashed)."""
    from ..bench import predicted_speedups
    from ..report.plots import plot_speedup as draw
    from ..report.specs import spec_path
    from ..report.results import collect

    ks, names = positive_ints(splits, "--splits"), method_names(methods)
    resolved, cells, root = sweep_cells("table6", preset, None, out)  # a bad --preset fails before any profiling
    spec = resolved.spec
    predicted = predicted_speedups(model, ks, names, batch_size, device, threads)
    results = [r for r in collect(spec, cells, root) if r.row.model == model]
    measured: dict[str, dict[int, float]] = {}
    for r in results:
        bp = next((x for x in results if x.row.id == r.row.id and x.column.method == "bp"), None)
        if r.seconds and bp is not None and bp.seconds:
            measured.setdefault(r.column.method, {})[r.row.splits] = bp.seconds / r.seconds
    target = plot_out or spec_path("table6").parent / "results" / f"speedup-{model}"
    note = (f"dashed: simulated from the block profile (batch {batch_size}, {device}, {threads} thread(s) per worker)\n"
            f"dots: measured, table6 {preset} runs ({sum(map(len, measured.values()))} points)")
    def drawn() -> list[Path]:
        target.parent.mkdir(parents=True, exist_ok=True)
        return draw(model, ks, predicted, measured, target, note)

    _write_plot(drawn, f"plot speedup {model}")


