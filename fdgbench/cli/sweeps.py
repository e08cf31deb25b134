"""`fdgbench sweep` and `fdgbench table`: a paper table's runs and its tables."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..data import num_classes
from ..execute import RunOptions

from . import cli
from .options import DEFAULT_DATA_DIR, IGNORE_MEMORY_CHECK, DefaultCommandGroup, sweep_cells, sweep_options


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
@click.option("--device", help="where every run trains (default: the preset's device, else cpu)")
@click.option("--progress/--no-progress", default=None)
@click.option("--wandb", "use_wandb", is_flag=True, help="also log every run to Weights & Biases")
@click.option("--wandb-project", default="fdgbench", show_default=True)
@IGNORE_MEMORY_CHECK
def sweep_run(table: str, preset: str, seeds: int | None, out: str, dry_run: bool, launcher: str, parallel: int,
              device: str | None, slurm_executor: str, slurm_wait: bool, **kw: Any) -> None:
    """Train every run of TABLE's preset that is not done; a diverged run is
    recorded and the sweep goes on. A run another process is training (its
    directory's lock is held) is left to it, so several sweeps of one preset
    started side by side on one results root share out its runs. A corrupt
    run directory is left alone and named; the sweep goes on and exits 2."""
    from ..errors import UserError
    from ..run_record import CORRUPT, SETTLED
    from ..errors import RunsFailedError
    from ..sweep import CLUSTER_KEYS, LAUNCHERS, LaunchSettings, describe, preset_jobs, preset_root

    spec, cells, jobs = preset_jobs(table, preset, seeds, out, kw["data_dir"], device)
    for c in cells:  # an error names the spec file and key that set the bad value; a dry run may list,
        # on a machine without the preset's GPU, runs that another machine trains: it checks all but the device
        spec.check(preset, replace(c, config=replace(c.config, device="cpu")) if dry_run else c)
    p = spec.preset(preset)
    root = preset_root(spec, preset, out)
    click.echo(f"{spec.title}, preset {preset}: {len(jobs)} runs -> {root}"
               + (f" ({p['description']})" if p.get("description") else ""))
    if dry_run:
        for i, job in enumerate(jobs, 1):
            click.echo(f"[{i}/{len(jobs)}] {job.label}: {describe(job)}")
        return
    if preset == "full" and launcher != "print":
        from ..bench import estimate_sweep_seconds

        todo = [j.config for j in jobs if j.state not in SETTLED]
        seconds = estimate_sweep_seconds(todo, kw["data_dir"])
        click.echo(f"estimated total: {seconds / 3600:.1f} h for {len(todo)} runs on this machine (3 timed BP "
                   f"iterations per model, times each run's iterations; DGL, FR and DNI cost more); "
                   f"`fdgbench sweep status` refines it as epochs finish")
    # The cluster's resources: the preset's slurm table, each flag given replacing its entry.
    cluster = {**p.get("slurm", {}), **{key: kw[f"slurm_{key}"] for key in CLUSTER_KEYS
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
def sweep_status(table: str, preset: str, seeds: int | None, out: str) -> None:
    """Done / running / incomplete / missing (and corrupt, each named) runs, and the estimated time left."""
    from ..sweep import progress

    spec, cells, root = sweep_cells(table, preset, seeds, out)
    p = progress(cells, root)
    click.echo(f"{spec.title}, preset {preset}, {root}: " + ", ".join(f"{v} {k}" for k, v in p.counts.items())
               + f" (of {len(cells)})" + (f" ({p.resumable} can resume from a checkpoint)" if p.resumable else ""))
    if p.remaining and p.seconds_left is None:
        click.echo("estimated time left: unknown until a run finishes its first epoch")
    elif p.remaining:
        click.echo(f"estimated time left: {p.seconds_left / 3600:.1f} h of training (median epoch time per model so "
                   f"far)" + (f"; no epoch finished yet for {', '.join(p.unknown)}, so they are not counted"
                              if p.unknown else ""))


@cli.command("table")
@sweep_options
@click.option("--tables-dir", type=click.Path(file_okay=False, path_type=Path),
              help="where the tables go (default: results/ beside the spec, i.e. paper_tables/results)")
def table_cmd(table: str, preset: str, seeds: int | None, out: str, tables_dir: Path | None) -> None:
    """Collect TABLE's run directories into Markdown, LaTeX and CSV beside the spec."""
    from ..report.specs import spec_path
    from ..report.tables import write_tables

    spec, cells, root = sweep_cells(table, preset, seeds, out)
    paths, filled, total = write_tables(spec, preset, cells, root, tables_dir or spec_path(table).parent / "results",
                                        num_classes(cells[0].config.dataset))
    click.echo(f"{spec.name} ({preset}): {filled} of {total} cells have finished runs; " + " ".join(map(str, paths)))
