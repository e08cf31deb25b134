"""`fdgbench sweep` and `fdgbench table`: a paper table's runs and its tables."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..data import num_classes
from ..execute import RunOptions

from .group import cli
from .options import (DEFAULT_DATA_DIR, IGNORE_MEMORY_CHECK, SWEEP_DEVICE, DefaultCommandGroup, sweep_cells,
                      sweep_options)

DAY_FROM_HOURS = 48  # a longer estimate is given in days


def duration_text(seconds: float) -> str:
    """Hours, or days when over DAY_FROM_HOURS hours (a full preset on a CPU)."""
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours > DAY_FROM_HOURS else f"{hours:.1f} h"


def estimate_basis(p, t) -> str:
    """Where a time-left estimate (sweep.Progress ``p``, sweep.TimeLeft ``t``) comes from, in words."""
    from ..bench.estimate import PROBE_ITERATIONS

    parts = ["median recorded epoch time per model"] if p.seconds_left is not None else []
    if t.probed:
        parts.append(f"{', '.join(t.probed)}, with no epoch recorded yet: {PROBE_ITERATIONS} timed BP iterations "
                     f"here times each run's iterations, DGL, FR and DNI costing more")
    if t.uncounted:
        parts.append(f"not counted: {', '.join(t.uncounted)}, with no epoch recorded yet and a device this "
                     f"machine lacks")
    return "; ".join(parts)


def preset_summary(cells) -> str:
    """A preset's size in a few words, from its cells: "ResNet-20, 20 epochs"."""
    rows = dict.fromkeys(c.row.id for c in cells)
    epochs = dict.fromkeys(str(c.config.epochs) for c in cells)
    return f"{', '.join(rows)}, {'/'.join(epochs)} epochs"


def cpu_preset_hint(full_seconds: float, smaller: tuple[str, str, float, int] | None, others: list[str]) -> str:
    """The line that says, before the full preset is trained on a CPU, how
    long that is here and which preset fits: ``smaller`` is (preset, its
    summary, its estimated seconds left, its runs left), e.g. the converge
    preset's; without one, ``others`` names the table's other presets."""
    text = f"the full preset takes about {duration_text(full_seconds)} on this machine's CPU"
    if smaller is None:
        return text + (f"; a smaller preset: --preset {'|'.join(others)}" if others else "")
    name, summary, seconds, runs = smaller
    if not runs:
        return text + f"; the {name} preset ({summary}) has every run recorded: --preset {name}"
    return text + f"; the {name} preset ({summary}) takes about {duration_text(seconds)} here: --preset {name}"


# The preset a CPU-only machine is pointed to instead of the full one, where a table has it.
CPU_PRESET = "converge"


def full_preset_hint(spec, table: str, preset: str, cells, full_seconds: float, out: str, data_dir: str) -> str | None:
    """cpu_preset_hint for the full preset when its runs train on the CPU
    (no GPU here, or --device cpu), CPU_PRESET's time estimated the same
    way (recorded epochs, else a probe); None for any other preset or device."""
    from ..sweep import progress, time_left

    if preset != "full" or any(c.config.device != "cpu" for c in cells):
        return None
    if CPU_PRESET not in spec.presets:
        return cpu_preset_hint(full_seconds, None, [p for p in spec.presets if p != "full"])
    _, smaller, root = sweep_cells(table, CPU_PRESET, None, out, data_dir, "cpu")
    p = progress(smaller, root)
    return cpu_preset_hint(full_seconds, (CPU_PRESET, preset_summary(smaller), time_left(p, data_dir).seconds,
                                          p.remaining), [])


def echo_estimate(spec, table: str, preset: str, cells, p, out: str, data_dir: str, lead: str) -> None:
    """The estimate of a sweep's training time left (``lead`` filled in with
    the time, the runs left and the estimate's basis) from its progress
    ``p`` (sweep.progress of ``cells``), and the full preset's CPU hint where
    it applies."""
    from ..sweep import time_left

    t = time_left(p, data_dir)
    basis = estimate_basis(p, t)
    counted = p.seconds_left is not None or t.probed  # else every model is uncounted: no number to give
    click.echo(lead.format(time=duration_text(t.seconds) if counted else "unknown", runs=p.remaining,
                           basis=f" ({basis})" if basis else ""))
    hint = full_preset_hint(spec, table, preset, cells, t.seconds, out, data_dir)
    if hint:
        click.echo(hint)


@cli.group(cls=DefaultCommandGroup)
def sweep() -> None:
    """Run a paper table's sweep (`fdgbench sweep TABLE --preset P`), or see its status."""


@sweep.command("run")
@sweep_options
@click.option("--dry-run", is_flag=True, help="list the runs and the state of each; train nothing")
@click.option("--launcher", default="in-process", show_default=True, type=click.Choice(["in-process", "subprocess",
              "slurm", "print"]), help="in-process: one run after another here; subprocess: each run its own "
                                       "`fdgbench run` process, --jobs at a time; slurm: a job array through submitit "
                                       "(--slurm-*); print: print those commands (for a scheduler)")
@click.option("--jobs", "parallel", type=int, default=1, show_default=True,
              help="runs at once (subprocess launcher), e.g. several small runs sharing one GPU")
@click.option("--slurm-partition", help="slurm launcher: the partition (default: the preset's slurm table, else the "
                                        "cluster's default)")
@click.option("--slurm-time", "slurm_time_min", type=int, help="slurm launcher: minutes per run's job")
@click.option("--slurm-gpus", "slurm_gpus_per_node", type=int, help="slurm launcher: GPUs per run's job")
@click.option("--slurm-cpus", "slurm_cpus_per_task", type=int, help="slurm launcher: CPU cores per run's job")
@click.option("--slurm-mem-gb", type=float, help="slurm launcher: memory per run's job")
@click.option("--slurm-array-parallelism", type=int, help="slurm launcher: runs of the array at once")
@click.option("--slurm-executor", default="slurm", show_default=True, type=click.Choice(["slurm", "local"]),
              help="slurm launcher: submit to Slurm, or run the same submission on this machine (a try-out)")
@click.option("--slurm-wait", is_flag=True, help="slurm launcher: wait for the jobs and report each outcome")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, envvar="FDGBENCH_DATA_DIR")
@SWEEP_DEVICE
@click.option("--progress/--no-progress", default=None)
@click.option("--wandb", "use_wandb", is_flag=True, help="also log every run to Weights & Biases")
@click.option("--wandb-project", default="fdgbench", show_default=True)
@IGNORE_MEMORY_CHECK
def sweep_run(table: str, preset: str, seeds: int | None, out: str, dry_run: bool, launcher: str, parallel: int,
              device: str, slurm_executor: str, slurm_wait: bool, **kw: Any) -> None:
    """Train every run of TABLE's preset that is not done; a diverged run is
    recorded and the sweep goes on. A run another process is training (its
    directory's lock is held) is left to it, so several sweeps of one preset
    started side by side on one results root share out its runs. A corrupt
    run directory is left alone and named; the sweep goes on and exits 2."""
    from ..errors import UserError
    from ..run_record import CORRUPT
    from ..errors import RunsFailedError
    from ..sweep import CLUSTER_KEYS, LAUNCHERS, LaunchSettings, describe, preset_jobs, preset_root, progress

    p, cells, jobs = preset_jobs(table, preset, seeds, out, kw["data_dir"], device)
    spec = p.spec
    for c in cells:  # an error names the spec file and key that set the bad value; a dry run may list,
        # on a machine without the preset's GPU, runs that another machine trains: it checks all but the device
        spec.check(p, replace(c, config=replace(c.config, device="cpu")) if dry_run else c)
    root = preset_root(p, out)
    click.echo(f"{spec.title}, preset {preset}: {len(jobs)} runs -> {root} ({p.description})")
    if dry_run:
        for i, job in enumerate(jobs, 1):
            click.echo(f"[{i}/{len(jobs)}] {job.label}: {describe(job)}")
        return
    if launcher != "print":
        echo_estimate(spec, table, preset, cells, progress(cells, root), out, kw["data_dir"],
                      "estimated total: {time} for {runs} runs on this machine{basis}; `fdgbench sweep status` "
                      "refines it as epochs finish")
    # The cluster's resources: the preset's slurm table, each flag given replacing its entry.
    cluster = {**p.slurm, **{key: kw[f"slurm_{key}"] for key in CLUSTER_KEYS
                                         if kw[f"slurm_{key}"] is not None}}
    settings = LaunchSettings(parallel, slurm_executor, cluster, slurm_wait)
    counts = LAUNCHERS[launcher](settings).launch(jobs, RunOptions.from_options({**kw, "out": str(root)}))
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items() if v or k != CORRUPT)
               + f"; tables: fdgbench table {table} --preset {preset}")
    if counts.get(CORRUPT):  # the others ran; a scheduler or script must still see that some did not
        raise UserError(f"{counts[CORRUPT]} corrupt run director{'y' if counts[CORRUPT] == 1 else 'ies'} left alone "
                        f"(named above); delete them and run the sweep again to train those runs")
    if counts.get("failed"):
        raise RunsFailedError(f"{counts['failed']} run(s) failed (their logs are named above); the same command "
                              f"resumes or retries them")


@sweep.command("status")
@sweep_options
@SWEEP_DEVICE
def sweep_status(table: str, preset: str, seeds: int | None, out: str, device: str) -> None:
    """Done / running / incomplete / missing (and corrupt, each named) runs, and the estimated time left
    (recorded epoch times, and for models with none yet a few timed BP iterations here)."""
    from ..sweep import progress

    resolved, cells, root = sweep_cells(table, preset, seeds, out, device=device)
    spec = resolved.spec
    p = progress(cells, root)
    click.echo(f"{spec.title}, preset {preset}, {root}: " + ", ".join(f"{v} {k}" for k, v in p.counts.items())
               + f" (of {len(cells)})" + (f" ({p.resumable} can resume from a checkpoint)" if p.resumable else ""))
    if p.remaining:
        echo_estimate(spec, table, preset, cells, p, out, DEFAULT_DATA_DIR,
                      "estimated training time left: {time} for {runs} runs{basis}")


@cli.command("table")
@sweep_options
@click.option("--tables-dir", type=click.Path(file_okay=False, path_type=Path),
              help="where the tables go (default: results/ beside the spec, i.e. paper_tables/results)")
@SWEEP_DEVICE
def table_cmd(table: str, preset: str, seeds: int | None, out: str, tables_dir: Path | None, device: str) -> None:
    """Collect TABLE's run directories into Markdown, LaTeX and CSV beside the spec."""
    from ..report.specs import spec_path
    from ..report.tables import write_tables

    resolved, cells, root = sweep_cells(table, preset, seeds, out, device=device)
    paths, filled, only_diverged, total = write_tables(
        resolved, cells, root, tables_dir or spec_path(table).parent / "results", num_classes(cells[0].config.dataset))
    click.echo(f"{resolved.spec.name} ({preset}): {filled} of {total} cells have finished runs"
               + (f", {only_diverged} more only diverged ones" if only_diverged else "") + "; "
               + " ".join(map(str, paths)))
