"""fdgbench command line: run, compare, sweep, table, plot, bench, schedule, list."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import click

from . import checkpoint
from .errors import DivergedError, UserError, WorkerFailedError
from .method import all_methods, all_options, make_method, option_definitions
from .partition import STRATEGIES
from .engines.launch import under_torchrun
from .runs import RunDirectory
from .config import ENGINES, WARMUPS, RunConfig, check_config, parse_device
from .data import num_classes
from .execute import RunOptions, train_run

DEFAULT_DATA_DIR = "data"
DEFAULT_RESULTS = "results"


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else None


# Not a RunConfig field: it changes whether a run starts, not its numbers (nor its directory's name).
IGNORE_MEMORY_CHECK = click.option(
    "--ignore-memory-check", is_flag=True,
    help="start even if the estimated per-stage memory exceeds what the device has free (--force does not)")


def training_options(f: Callable) -> Callable:
    """Options shared by ``run`` and ``compare``: everything in a RunConfig
    except the method, with the paper's protocol as defaults."""
    options = [
        click.option("--model", default="resnet56", show_default=True, help="see `fdgbench list models`"),
        click.option("--splits", "-K", type=int, default=2, show_default=True, help="number of stages K"),
        click.option("--partition", default="auto", show_default=True,
                     help=f"{'|'.join(STRATEGIES)}; auto = the paper's split if known, else FLOPs-balanced"),
        click.option("--split-at", help="explicit cut points: first blocks of stages 1..K-1, e.g. L2.4 or 19"),
        click.option("--dataset", default="cifar10", show_default=True, help="see `fdgbench list datasets`"),
        click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, envvar="FDGBENCH_DATA_DIR",
                     help="torchvision downloads and decoded-image caches"),
        click.option("--train-subset", type=int, help="train on this many images (fixed subset)"),
        click.option("--test-subset", type=int, help="evaluate on this many test images (fixed subset)"),
        click.option("--epochs", type=int, default=300, show_default=True,
                     help="lr / 10 at 50%, 75% and 91.7% of the epochs (150/225/275 of 300)"),
        click.option("--max-steps", type=int, help="stop after this many iterations (smoke runs)"),
        click.option("--batch-size", type=int, default=128, show_default=True),
        click.option("--lr", type=float, default=0.1, show_default=True),
        click.option("--warmup-epochs", type=int, default=0, show_default=True,
                     help="warm up over the first N epochs, then train at --lr (the FDG authors' code has a 3-epoch "
                          "--warm-up, off by default; the paper states none)"),
        click.option("--warmup", default="constant", show_default=True, type=click.Choice(WARMUPS),
                     help="constant: lr/10 throughout the warm-up (the FDG authors' code); linear: 1%% of lr rising "
                          "to 100%% (the ADL code's, always on there over 5 epochs)"),
        click.option("--diagnose", type=int, default=0, show_default=True, metavar="N",
                     help="every N iterations, record per stage the cosine and norm ratio of the applied gradient to "
                          "the true gradient of the same batches at the current weights, and the weights' age "
                          "(sequential engine; 0: off)"),
        click.option("--momentum", type=float, default=0.9, show_default=True),
        click.option("--weight-decay", type=float, default=5e-4, show_default=True),
        click.option("--nesterov/--no-nesterov", default=False, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N"),
        click.option("--stage-devices", help="one device per stage, comma-separated (sequential engine)"),
        click.option("--amp", default="off", show_default=True, help="off or bf16 (autocast, fp32 weights)"),
        click.option("--channels-last", is_flag=True, help="NHWC memory format (faster convs on GPUs)"),
        click.option("--deterministic", is_flag=True,
                     help="bit-reproducible numerics: cuDNN deterministic, no TF32, data-parallel gradients summed "
                          "in rank order (for parity and resume checks on GPUs; slower)"),
        click.option("--engine", default="sequential", show_default=True, type=click.Choice(ENGINES),
                     help="sequential: every stage in this process; distributed: one torch.distributed rank per "
                          "stage (under torchrun, or spawned here)"),
        click.option("--threads", "--threads-per-stage", "threads", type=int,
                     help="torch intra-op threads of each process (each rank on the distributed engine; default "
                          "there: this machine's cores / K)"),
        click.option("--trace", is_flag=True, help="record every action's start and end per stage into trace.json "
                     "(Chrome/Perfetto format; `fdgbench plot gantt RUN_DIR` draws it)"),
        click.option("--out", default=DEFAULT_RESULTS, show_default=True, help="results root directory"),
        click.option("--wandb", "use_wandb", is_flag=True,
                     help="also log config and per-epoch metrics to Weights & Biases (honours WANDB_MODE)"),
        click.option("--wandb-project", default="fdgbench", show_default=True),
        click.option("--force", is_flag=True, help="start over even if the run directory is done or has a "
                     "checkpoint (an unfinished run otherwise resumes from its last epoch's checkpoint)"),
        click.option("--progress/--no-progress", default=None, help="progress bar (default: on a terminal)"),
        IGNORE_MEMORY_CHECK,
    ]
    for name, option in sorted(all_options().items(), reverse=True):
        options.append(_method_option(name, option))
    for option in reversed(options):
        f = option(f)
    return f


def _method_option(name: str, option) -> Callable:
    """One flag for a method option, whichever methods share its name: each
    definition's choices, default and help, named by its methods (the
    method given checks the value against its own definition)."""
    definitions = option_definitions(name)
    kinds = {d.type for d in definitions}
    if len(kinds) != 1:  # one flag cannot parse two types
        raise TypeError(f"methods define --{name.replace('_', '-')} with different types: {kinds}")
    text = "; ".join(f"[{','.join(methods)}] {d.help}" + (f" ({'|'.join(d.choices)})" if d.choices else "")
                     + f" (default {d.default})" for d, methods in definitions.items())
    kwargs: dict[str, Any] = {"default": None, "help": text}
    if option.type is bool:
        kwargs["is_flag"] = True  # absent: None, so "not given" stays distinguishable
    elif all(d.choices for d in definitions):
        kwargs["type"] = click.Choice(list(dict.fromkeys(c for d in definitions for c in d.choices)))
    else:
        kwargs["type"] = option.type
    return click.option(option.flag, name, **kwargs)


def _config(method: str, kw: dict[str, Any]) -> RunConfig:
    return RunConfig.from_options(method, kw)


def _is_primary() -> bool:
    """False in torchrun's ranks other than 0, which print nothing of their own."""
    return not under_torchrun() or os.environ.get("RANK") == "0"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """fdgbench: decoupled neural-network training, benchmarked against backprop."""


@cli.command()
@click.option("--method", default="fdg", show_default=True, help="see `fdgbench list methods`")
@training_options
def run(method: str, **kw: Any) -> None:
    """Train one configuration (paper defaults for everything not given)."""
    cfg = _config(method, kw)
    summary, path, cached = train_run(cfg, RunOptions.from_options(kw))
    if not _is_primary():
        return
    note = " (already done; --force reruns)" if cached else ""
    click.echo(f"{cfg.method} {cfg.model} K={cfg.splits}: final test error {summary['final_test_error']:.2f}%, "
               f"best {summary['best_test_error']:.2f}% (epoch {summary['best_epoch']}), "
               f"{summary['status']}{note} -> {path}")


DEMO = dict(model="resnet20", splits=2, train_subset=10000, test_subset=2000, epochs=4)


@cli.command()
@click.option("--methods", default="bp,fdg", show_default=True, help="comma-separated methods to compare")
@training_options
@click.pass_context
def compare(ctx: click.Context, methods: str, **kw: Any) -> None:
    """Train several methods on the same budget and print a table.

    With no options this is the README's demo: BP vs FDG (K=2) on ResNet-20,
    CIFAR-10 subset (10,000 train / 2,000 test images), 4 epochs, a few minutes on a laptop CPU.
    """
    def is_default(key: str) -> bool:
        return ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT

    for key, value in DEMO.items():  # the demo's budget unless the user set it
        # The subset sizes are CIFAR-10's; another dataset keeps its own size.
        if is_default(key) and (is_default("dataset") or not key.endswith("_subset")):
            kw[key] = value
    names = _csv(methods)
    if not names:
        raise UserError("--methods needs at least one method name")
    configs = [_config(name, dict(kw)) for name in names]
    for cfg in configs:  # every config is checked before the first one trains
        check_config(cfg)
    datasets: dict[str, Any] = {}
    rows = []
    diverged = []
    options = RunOptions.from_options(kw)
    for cfg in configs:
        try:
            summary, path, cached = train_run(cfg, options, datasets)
        except DivergedError as exc:  # recorded in its run directory; the comparison goes on
            click.echo(f"diverged: {exc}", err=True)
            path = RunDirectory.for_config(kw["out"], cfg.to_dict()).path
            summary, cached = RunDirectory(path).read_json("summary.json"), False
            diverged.append(cfg.method)
        opts = ",".join(f"{k}={v}" for k, v in summary["method_options"].items())
        rows.append((f"{cfg.method}({opts})" if opts else cfg.method, summary, path, cached))
    first = rows[0][1]
    click.echo(f"\n{first['model']} ({first['parameters']:,} params), K={first['splits']}, {first['dataset']}, "
               f"{first['steps']} iterations of batch {kw['batch_size']}, seed {kw['seed']}")
    width = max(len("method"), *(len(r[0]) for r in rows))
    click.echo(f"{'method':<{width}}  {'final err %':>11} {'best err %':>10} {'img/s':>7}  run directory")
    for label, s, path, cached in rows:
        rate = f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "-"
        final = f"{s['final_test_error']:.2f}" if s["final_test_error"] is not None else "-"
        best = f"{s['best_test_error']:.2f}" if s["best_test_error"] is not None else "-"
        click.echo(f"{label:<{width}}  {final:>11} {best:>10} {rate:>7}  {path}{' (cached)' if cached else ''}"
                   f"{'' if s['status'] == 'finished' else '  ' + s['status'].upper()}")
    click.echo("test error in %: final = after the last epoch, best = lowest over epochs; one seed each. "
               f"img/s = training images per second ({kw['engine']} engine"
               f"{', one rank per stage' if kw['engine'] == 'distributed' else ', one process'}).")
    if diverged:
        raise DivergedError(f"{', '.join(diverged)} diverged (see the table)")


@cli.group("list")
def list_() -> None:
    """List methods, models or datasets."""


@list_.command("methods")
def list_methods() -> None:
    for m in all_methods():
        breaks = ", ".join(m.breaks) or "none"
        click.echo(f"{m.name:<6} breaks: {breaks:<26} {m.summary}")
        for o in m.options:
            extra = f" ({'|'.join(o.choices)})" if o.choices else ""
            click.echo(f"{'':<8}{o.flag}{extra} default {o.default}: {o.help}")


@list_.command("models")
def list_models() -> None:
    from .models import MODELS, count_parameters
    from .partition import PAPER_SPLITS

    for name, info in MODELS.items():
        model = info.build(10)
        splits = ",".join(map(str, PAPER_SPLITS.get(name, {}))) or "-"
        click.echo(f"{name:<14} {count_parameters(model):>11,} params  {len(model):>4} blocks  "
                   f"paper K: {splits:<8} {info.description}")


@list_.command("datasets")
def list_datasets() -> None:
    from .data import DATASET_SPECS

    for spec, text in DATASET_SPECS.items():
        click.echo(f"{spec:<20} {text}")


@cli.group()
def schedule() -> None:
    """Inspect a method's schedule."""


@schedule.command("show")
@click.option("--method", default="fdg", show_default=True)
@click.option("--splits", "-K", type=int, default=3, show_default=True)
@click.option("--iterations", type=int, default=8, show_default=True)
@click.option("--messages", is_flag=True, help="also show sends and receives")
def schedule_show(method: str, splits: int, iterations: int, messages: bool) -> None:
    """Print the step x stage grid of the first iterations (validated first)."""
    from .schedule import ScheduleError, format_grid, legend, validate

    if splits < 1 or iterations < 1:
        raise UserError("--splits and --iterations must be at least 1")
    m = make_method(method)
    stages = 1 if m.data_parallel else splits
    try:
        validate(m.schedule, stages, max(iterations, 4 * stages))
    except ScheduleError as exc:
        raise UserError(f"invalid schedule: {exc}") from None
    click.echo(f"{method}, K={splits}: {m.summary}")
    if m.data_parallel:
        click.echo(f"each of the {splits} replicas runs this one-stage schedule on its shard of every batch:")
    click.echo(format_grid(m.schedule, stages, iterations, messages))
    click.echo(legend())


@cli.group()
def bench() -> None:
    """Benchmarks that print ratios measured side by side in one run."""


@bench.command("data")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, envvar="FDGBENCH_DATA_DIR")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch intra-op threads for both")
def bench_data(dataset: str, data_dir: str, batch_size: int, threads: int) -> None:
    """Device-resident loader vs torchvision per-image transforms, one epoch each."""
    from .bench import bench_data as run_bench

    run_bench(dataset, data_dir, batch_size, threads)


@bench.command("step")
@click.option("--model", default="resnet56", show_default=True)
@click.option("--splits", default="2,3,4", show_default=True, help="FDG stage counts to compare with BP")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--iterations", type=int, default=10, show_default=True, help="timed iterations per round")
@click.option("--rounds", type=int, default=3, show_default=True, help="interleaved rounds; medians reported")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
@click.option("--staleness", default="legacy", show_default=True, type=click.Choice(["legacy", "stash", "replay"]))
def bench_step(model: str, splits: str, batch_size: int, iterations: int, rounds: int, device: str,
               threads: int | None, staleness: str) -> None:
    """FDG's sequential-engine iteration time vs BP's, same model and device."""
    from .bench import bench_step as run_bench

    ks = []
    for s in _csv(splits) or ():
        if not s.isdigit() or int(s) < 1:
            raise UserError(f"--splits takes positive integers, got '{s}'")
        ks.append(int(s))
    if iterations < 1 or rounds < 1:
        raise UserError("--iterations and --rounds must be at least 1")
    run_bench(model, ks, batch_size, iterations, rounds, device, threads, staleness)


@bench.command("precision")
@click.option("--model", default="resnet20", show_default=True)
@click.option("--methods", default="bp,fdg,ddg,fr,dgl", show_default=True, help="methods, default options each")
@click.option("--splits", "-K", type=int, default=2, show_default=True, help="number of stages K")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--iterations", type=int, default=5, show_default=True, help="timed iterations per round")
@click.option("--rounds", type=int, default=3, show_default=True, help="interleaved rounds; medians reported")
@click.option("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
@click.option("--compile/--no-compile", "compile_reference", default=True, show_default=True,
              help="also time torch.compile on the unsplit model's plain step (compiling takes ~30 s)")
def bench_precision(model: str, methods: str, splits: int, batch_size: int, iterations: int, rounds: int,
                    threads: int | None, compile_reference: bool) -> None:
    """fp32 vs channels-last vs bf16 autocast vs both, per method, side by side.

    Every option keeps each method's semantics (legacy staleness under bf16
    too); torch.compile is timed on the unsplit model's plain training step
    as a reference only: the engines do not compile, since a delayed
    backward through a compiled graph would need its own proof that each
    staleness mode keeps its meaning."""
    from .bench import bench_precision as run_bench

    if min(iterations, rounds, splits, batch_size) < 1 or (threads is not None and threads < 1):
        raise UserError("--iterations, --rounds, --splits, --batch-size and --threads must be at least 1")
    run_bench(model, _method_names(methods), splits, batch_size, iterations, rounds, threads, compile_reference)


@bench.command("memory")
@click.option("--model", default="resnet56", show_default=True)
@click.option("--splits", "-K", type=int, default=2, show_default=True, help="number of stages K")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
def bench_memory(model: str, splits: int, batch_size: int, threads: int | None) -> None:
    """Per-stage memory of BP and each method and staleness mode: measured in a few real CPU iterations
    beside the start-of-run guard's estimate."""
    from .bench import bench_memory as run_bench

    if splits < 1 or batch_size < 2:
        raise UserError("--splits must be at least 1 and --batch-size at least 2")
    run_bench(model, splits, batch_size, threads)


def _positive_ints(text: str, flag: str) -> list[int]:
    values = []
    for s in _csv(text) or ():
        if not s.isdigit() or int(s) < 1:
            raise UserError(f"{flag} takes positive integers, got '{s}'")
        values.append(int(s))
    if not values:
        raise UserError(f"{flag} needs at least one value")
    return values


def _method_names(text: str) -> list[str]:
    names = list(_csv(text) or ())
    if not names:
        raise UserError("--methods needs at least one method name")
    for name in names:
        make_method(name)  # unknown names fail here, before any work
    return names


@bench.command("speedup")
@click.option("--model", default="resnet56", show_default=True)
@click.option("--splits", default="2", show_default=True, help="stage counts K (one rank per stage)")
@click.option("--methods", default="bp,fdg,dp", show_default=True, help="methods run on K ranks")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--iterations", type=int, default=20, show_default=True, help="timed iterations per row")
@click.option("--partition", default="balanced", show_default=True,
              help="how stages are cut (balanced = by measured time; see `fdgbench run --help`)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads-per-stage", type=int, default=1, show_default=True)
@click.option("--all-threads", type=int, default=os.cpu_count() or 1, show_default=True,
              help="threads of the second BP reference (default: this machine's cores)")
@click.option("--amp", default="off", show_default=True, type=click.Choice(["off", "bf16"]))
@click.option("--channels-last", is_flag=True)
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path),
              help="write the measured seconds per iteration to this JSON (a preset's `speed` file for "
                   "time-to-accuracy)")
@click.option("--reuse-profile", is_flag=True,
              help="predict from the saved block profile instead of profiling again in this invocation")
def bench_speedup(model: str, splits: str, methods: str, batch_size: int, iterations: int, partition: str,
                  device: str, threads_per_stage: int, all_threads: int, amp: str, channels_last: bool,
                  save: Path | None, reuse_profile: bool) -> None:
    """Images/s of each method on K ranks vs BP on one worker (same threads per
    worker) and vs BP with all cores, with the simulator's prediction beside."""
    from .bench import bench_speedup as run_bench

    if min(iterations, batch_size, threads_per_stage, all_threads) < 1:
        raise UserError("--iterations, --batch-size and the thread counts must be at least 1")
    run_bench(model, _positive_ints(splits, "--splits"), _method_names(methods), batch_size, iterations, partition,
              device, threads_per_stage, all_threads, amp, channels_last, save, reuse_profile)


@bench.command("simulate")
@click.option("--model", default="wrn28_10", show_default=True)
@click.option("--splits", default="2,4,8,16", show_default=True, help="stage counts K to predict")
@click.option("--methods", default="bp,ddg,fr,dgl,fdg,dp", show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="where the block profile is measured")
@click.option("--threads", type=int, default=1, show_default=True, help="threads per worker in the profile")
@click.option("--bandwidth", type=float, help="link bandwidth in GB/s (default: measured between local ranks)")
@click.option("--latency-us", type=float, help="link latency in microseconds (default: measured)")
@click.option("--reprofile", is_flag=True, help="measure the block profile again instead of reading the saved one")
@click.option("--gantt", type=click.Path(dir_okay=False, path_type=Path),
              help="also draw the predicted FDG timeline at the first K here (.png and .svg)")
def bench_simulate(model: str, splits: str, methods: str, batch_size: int, device: str, threads: int,
                   bandwidth: float | None, latency_us: float | None, reprofile: bool, gantt: Path | None) -> None:
    """Predicted iteration time, utilisation and speedup over BP on one worker
    for each method and K, from a saved block profile (measured once)."""
    from .bench import bench_simulate as run_bench

    if bandwidth is not None and bandwidth <= 0 or latency_us is not None and latency_us < 0:
        raise UserError("--bandwidth must be positive and --latency-us non-negative")
    if min(batch_size, threads) < 1:
        raise UserError("--batch-size and --threads must be at least 1")
    parse_device(device)
    run_bench(model, _positive_ints(splits, "--splits"), _method_names(methods), batch_size, device, threads,
              bandwidth, latency_us, reprofile, gantt)


class _DefaultCommandGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to
    its ``run`` subcommand (``fdgbench sweep table2`` = ``sweep run table2``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _sweep_options(f: Callable) -> Callable:
    for option in reversed([
        click.argument("table"),
        click.option("--preset", default="full", show_default=True,
                     help="full = the paper's protocol; quick / smoke cut models, epochs and data (see the spec)"),
        click.option("--seeds", type=int, help="seeds per cell (default: the preset's)"),
        click.option("--out", default=DEFAULT_RESULTS, show_default=True,
                     help="results root; the sweep's runs go to OUT/<table>-<preset> (or OUT/<the preset's runs>)"),
    ]):
        f = option(f)
    return f


def _sweep_cells(table: str, preset: str, seeds: int | None, out: str, data_dir: str = DEFAULT_DATA_DIR):
    """The spec, its preset's cells and their results root (sweep.preset_jobs)."""
    from .sweep import preset_jobs

    spec, cells, jobs = preset_jobs(table, preset, seeds, out, data_dir)
    return spec, cells, jobs[0].root if jobs else Path(out)


@cli.group(cls=_DefaultCommandGroup)
def sweep() -> None:
    """Run a paper table's sweep (`fdgbench sweep TABLE --preset P`), or see its status."""


@sweep.command("run")
@_sweep_options
@click.option("--dry-run", is_flag=True, help="list the runs and the state of each; train nothing")
@click.option("--launcher", default="in-process", show_default=True, type=click.Choice(["in-process", "subprocess",
              "print"]), help="in-process: one run after another here; subprocess: each run its own `fdgbench run` "
                              "process, --jobs at a time; print: print those commands (for a scheduler)")
@click.option("--jobs", "parallel", type=int, default=1, show_default=True,
              help="runs at once (subprocess launcher), e.g. several small runs sharing one GPU")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, envvar="FDGBENCH_DATA_DIR")
@click.option("--device", help="where every run trains (default: the preset's device, else cpu)")
@click.option("--progress/--no-progress", default=None)
@click.option("--wandb", "use_wandb", is_flag=True, help="also log every run to Weights & Biases")
@click.option("--wandb-project", default="fdgbench", show_default=True)
@IGNORE_MEMORY_CHECK
def sweep_run(table: str, preset: str, seeds: int | None, out: str, dry_run: bool, launcher: str, parallel: int,
              device: str | None, **kw: Any) -> None:
    """Train every run of TABLE's preset that is not done; a diverged run is
    recorded and the sweep goes on. A run another process is training (its
    directory's lock is held) is left to it, so several sweeps of one preset
    started side by side on one results root share out its runs."""
    from .sweep import LAUNCHERS, preset_jobs

    spec, cells, jobs = preset_jobs(table, preset, seeds, out, kw["data_dir"])
    if device is not None:
        cells = [replace(c, config=replace(c.config, device=device)) for c in cells]
        jobs = [replace(j, config=replace(j.config, device=device)) for j in jobs]
    for c in cells:  # an error names the spec file and key that set the bad value; a dry run may list,
        # on a machine without the preset's GPU, runs that another machine trains: it checks all but the device
        spec.check(preset, replace(c, config=replace(c.config, device="cpu")) if dry_run else c)
    p = spec.preset(preset)
    root = jobs[0].root
    click.echo(f"{spec.title}, preset {preset}: {len(jobs)} runs -> {root}"
               + (f" ({p['description']})" if p.get("description") else ""))
    if dry_run:
        for i, job in enumerate(jobs, 1):
            state = job.state
            if state in ("done", "diverged"):
                click.echo(f"[{i}/{len(jobs)}] {job.label}: done ({'finished' if state == 'done' else state})")
                continue
            saved = checkpoint.latest(job.run.path)
            text = (f"incomplete, resumes after epoch {saved['epoch']}" if saved else
                    "incomplete, starts over (no checkpoint)" if job.run.path.exists() else "missing")
            click.echo(f"[{i}/{len(jobs)}] {job.label}: {text} -> {job.run.path.name}")
        return
    if preset == "full" and launcher != "print":
        from .bench import estimate_sweep_seconds

        todo = [j.config for j in jobs if not j.run.is_done]
        seconds = estimate_sweep_seconds(todo, kw["data_dir"])
        click.echo(f"estimated total: {seconds / 3600:.1f} h for {len(todo)} runs on this machine (3 timed BP "
                   f"iterations per model, times each run's iterations; DGL, FR and DNI cost more); "
                   f"`fdgbench sweep status` refines it as epochs finish")
    counts = LAUNCHERS[launcher](parallel).launch(jobs, RunOptions.from_options({**kw, "out": str(root)}))
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; tables: fdgbench table {table} "
               f"--preset {preset}")


@sweep.command("status")
@_sweep_options
def sweep_status(table: str, preset: str, seeds: int | None, out: str) -> None:
    """Done / running / incomplete / missing runs, and the estimated time left."""
    from .report.records import planned_records
    from .sweep import preset_jobs

    spec, cells, jobs = preset_jobs(table, preset, seeds, out)
    root = jobs[0].root
    planned = planned_records(cells, root)
    planned["model"] = [c.config.model for c in cells]
    planned["epochs"] = [c.config.epochs if not c.config.max_steps else 1 for c in cells]
    finished = planned["state"].isin(["done", "diverged"])
    counts = {"done": int(finished.sum()),
              **{s: int((planned["state"] == s).sum()) for s in ("running", "incomplete", "missing")}}
    resumable = sum(checkpoint.latest(root / run) is not None
                    for run in planned.loc[planned["state"].isin(["running", "incomplete"]), "run"])
    click.echo(f"{spec.title}, preset {preset}, {root}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
               + f" (of {len(jobs)})" + (f" ({resumable} can resume from a checkpoint)" if resumable else ""))
    # Seconds per epoch, per model, over every epoch recorded so far; the epochs each unfinished run has left.
    epoch_seconds = planned.explode("metrics").dropna(subset=["metrics"])
    seconds = (epoch_seconds["metrics"].map(lambda m: m["epoch_seconds"]).groupby(epoch_seconds["model"]).median()
               if len(epoch_seconds) else {})
    left_runs = planned[~finished]
    remaining = list(zip(left_runs["model"], (left_runs["epochs"] - left_runs["metrics"].map(len)).clip(lower=0)))
    unknown = sorted({m for m, e in remaining if e and m not in seconds})
    left = sum(seconds[m] * e for m, e in remaining if m in seconds)
    if remaining and not len(seconds):
        click.echo("estimated time left: unknown until a run finishes its first epoch")
    elif remaining:
        text = f"estimated time left: {left / 3600:.1f} h of training (median epoch time per model so far)"
        if unknown:
            text += f"; no epoch finished yet for {', '.join(unknown)}, so they are not counted"
        click.echo(text)


@cli.command("table")
@_sweep_options
@click.option("--tables-dir", type=click.Path(file_okay=False, path_type=Path),
              help="where the tables go (default: results/ beside the spec, i.e. paper_tables/results)")
def table_cmd(table: str, preset: str, seeds: int | None, out: str, tables_dir: Path | None) -> None:
    """Collect TABLE's run directories into Markdown, LaTeX and CSV beside the spec."""
    from .report.tables import collect, render_csv, render_latex, render_markdown

    spec, cells, root = _sweep_cells(table, preset, seeds, out)
    results = collect(spec, cells, root)
    datasets = sorted({s["dataset"] for r in results for s in r.finished})
    classes = num_classes(cells[0].config.dataset)
    text = spec.preset(preset).get("description", "the paper's protocol")
    from .report.specs import spec_path

    target = tables_dir or spec_path(table).parent / "results"
    speed = _speed_file(spec, preset)
    outputs = {f"{spec.name}-{preset}.md": render_markdown(spec, preset, text, results, classes, datasets, speed),
               f"{spec.name}-{preset}.tex": render_latex(spec, preset, text, results, classes, datasets, speed),
               f"{spec.name}-{preset}.csv": render_csv(spec, preset, results, speed, classes)}
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, content in outputs.items():
            (target / name).write_text(content)
    except OSError as exc:
        raise UserError(f"cannot write the tables under {target}: {exc.strerror or exc}") from None
    filled = sum(bool(r.finished) for r in results)
    click.echo(f"{spec.name} ({preset}): {filled} of {len(results)} cells have finished runs; "
               + " ".join(str(target / n) for n in outputs))


def _speed_file(spec, preset: str) -> dict[str, Any] | None:
    """The preset's ``speed`` file (`bench speedup --save`, path relative to the
    spec), for time-to-accuracy; None where the preset names none or it is not
    measured yet (the table says so)."""
    name = spec.preset(preset).get("speed")
    if name is None:
        return None
    path = spec.path.parent / name
    if not path.is_file():
        click.echo(f"note: no time-to-accuracy yet: {path} not found (made by `fdgbench bench speedup ... --save`)",
                   err=True)
        return None
    try:
        speed = json.loads(path.read_text())
        missing = [k for k in ("seconds_per_iteration", "hardware", "workers", "amp", "channels_last", "measured")
                   if k not in speed]
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a speed record ({exc}); measure it again with `fdgbench bench speedup "
                        f"--save`") from None
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; measure it again with `fdgbench bench speedup --save`")
    return speed


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
    from .engines.trace import read_trace
    from .report.gantt import draw_gantt

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
@_sweep_options
@click.option("--row", help="the table row to draw (default: the preset's first)")
@click.option("--time", "against_time", is_flag=True,
              help="x = estimated wall-clock minutes from the preset's speed file (time-to-accuracy), not epochs")
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path),
              help="output path without suffix (default: paper_tables/results/<table>-<preset>-<row>[-time])")
def plot_curves(table: str, preset: str, seeds: int | None, out: str, row: str | None, against_time: bool,
                plot_out: Path | None) -> None:
    """Test error against epoch (or estimated time) for every method of a table row."""
    from .report.plots import plot_curves as draw
    from .report.specs import spec_path

    spec, cells, root = _sweep_cells(table, preset, seeds, out)
    rows = list(dict.fromkeys(c.row.id for c in cells))
    row = row or rows[0]
    if row not in rows:
        raise UserError(f"{table} preset {preset} has no row '{row}'; rows: {', '.join(rows)}")
    speed = None
    if against_time:
        speed = _speed_file(spec, preset)
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
    from .report import plots
    from .report.specs import spec_path
    from .report.tables import collect

    spec, cells, root = _sweep_cells(table, preset, seeds, out)
    target = plot_out or spec_path(table).parent / "results" / f"{spec.name}-{preset}-{kind}"

    def draw() -> list[Path]:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The stability map's blow-up threshold is a multiple of chance-level loss, ln(classes).
        extra = {"num_classes": num_classes(cells[0].config.dataset)} if kind == "stability" else {}
        return getattr(plots, f"plot_{kind}")(spec, collect(spec, cells, root), target, preset, **extra)

    _write_plot(draw, f"{table} ({preset}), runs under {root}")


@plot.command("diagnostics")
@_sweep_options
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="output path without suffix")
def plot_diagnostics(table: str, preset: str, seeds: int | None, out: str, plot_out: Path | None) -> None:
    """Cosine of applied vs true gradient per stage against iteration (runs made
    with --diagnose, e.g. `fdgbench sweep diagnostics --preset quick`), and a
    Markdown summary beside the plot."""
    from .report.plots import diagnostics_summary, plot_diagnostics as draw
    from .report.specs import spec_path

    spec, cells, root = _sweep_cells(table, preset, seeds, out)
    target = plot_out or spec_path(table).parent / "results" / f"{spec.name}-{preset}-cosine"

    def drawn() -> list[Path]:
        target.parent.mkdir(parents=True, exist_ok=True)
        paths = draw(spec, cells, root, target, preset)
        summary = target.with_suffix(".md")
        summary.write_text(diagnostics_summary(spec, cells, root, preset))
        return [*paths, summary]

    _write_plot(drawn, f"{table} ({preset}), runs under {root}")


@plot.command("beta")
@_sweep_options
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="output path without suffix")
def plot_beta(table: str, preset: str, seeds: int | None, out: str, plot_out: Path | None) -> None:
    """FDG's final test error against beta (e.g. `fdgbench plot beta ablation_beta --preset quick`)."""
    _plot_results("beta", table, preset, seeds, out, plot_out)


@plot.command("bars")
@_sweep_options
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="output path without suffix")
def plot_bars(table: str, preset: str, seeds: int | None, out: str, plot_out: Path | None) -> None:
    """Every column's final test error by row (e.g. `fdgbench plot bars ablation_staleness`)."""
    _plot_results("bars", table, preset, seeds, out, plot_out)


@plot.command("stability")
@_sweep_options
@click.option("--plot-out", type=click.Path(dir_okay=False, path_type=Path), help="output path without suffix")
def plot_stability(table: str, preset: str, seeds: int | None, out: str, plot_out: Path | None) -> None:
    """Diverged seeds and survivors' loss per column (e.g. `fdgbench plot stability stability_resnet56 --preset map`)."""
    _plot_results("stability", table, preset, seeds, out, plot_out)


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
    from .bench import predicted_speedups
    from .report.plots import plot_speedup as draw
    from .report.specs import spec_path
    from .report.tables import collect

    ks, names = _positive_ints(splits, "--splits"), _method_names(methods)
    spec, cells, root = _sweep_cells("table6", preset, None, out)  # a bad --preset fails before any profiling
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


@cli.command("gpu-check")
@click.option("--iterations", type=int, default=30, show_default=True, help="timed iterations per row")
@click.option("--batch-size", type=int, default=128, show_default=True)
def gpu_check_cmd(iterations: int, batch_size: int) -> int:
    """The GPU paths on this machine's GPU(s): speed, memory, host syncs, resume, NCCL (one line without a GPU)."""
    from .gpucheck import gpu_check

    return gpu_check(iterations, batch_size)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, ``kill``), raised in the main thread
    so that it unwinds like Ctrl-C: spawned ranks are stopped, the checkpoint
    is kept, and the same command resumes."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is one ``error:`` line and exit status 2; a
    diverged run exits 3; Ctrl-C exits 130 and SIGTERM 143 (128 + signal)."""
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    try:
        result = cli.main(args=argv, prog_name="fdgbench", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C (and Terminated) into Abort
            return _interrupted(exc.__cause__)
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except UserError as exc:
        click.echo(f"error: {_rank_prefix()}{exc}", err=True)
        return 2
    except DivergedError as exc:
        click.echo(f"diverged: {_rank_prefix()}{exc}", err=True)
        return 3
    except WorkerFailedError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt as exc:
        return _interrupted(exc)


def _interrupted(exc: KeyboardInterrupt) -> int:
    click.echo("interrupted (the same command resumes an unfinished run from its last epoch's checkpoint)",
               err=True)
    return 128 + getattr(exc, "signum", signal.SIGINT)


def _rank_prefix() -> str:
    return f"rank {os.environ['RANK']}: " if under_torchrun() else ""


if __name__ == "__main__":
    sys.exit(main())
