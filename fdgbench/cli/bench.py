"""`fdgbench bench ...` and `fdgbench gpu-check`: benchmarks that print ratios measured side by side."""
from __future__ import annotations

import os
from pathlib import Path

import click

from ..config import comma_list, parse_device
from ..errors import UserError

from .group import cli
from .options import DEFAULT_DATA_DIR, REPLICAS, method_entries, method_names, positive_ints


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
    from ..bench import bench_data as run_bench

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
    from ..bench import bench_step as run_bench

    ks = []
    for s in comma_list(splits) or ():
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
    from ..bench import bench_precision as run_bench

    if min(iterations, rounds, splits, batch_size) < 1 or (threads is not None and threads < 1):
        raise UserError("--iterations, --rounds, --splits, --batch-size and --threads must be at least 1")
    run_bench(model, method_names(methods), splits, batch_size, iterations, rounds, threads, compile_reference)


# The default rows: BP and every staleness mode of the delayed-gradient methods, FR, DGL and DNI.
MEMORY_METHODS = ("bp,fdg[staleness=legacy],fdg[staleness=stash],fdg[staleness=replay],ddg[staleness=legacy],"
                  "ddg[staleness=stash],fr,dgl,dni")


@bench.command("memory")
@click.option("--model", default="resnet56", show_default=True)
@click.option("--splits", "-K", type=int, default=2, show_default=True, help="number of stages K")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
@click.option("--methods", default=MEMORY_METHODS, show_default=True,
              help="the rows: methods, each with its own options in brackets, as `compare --methods` takes them")
@click.option("--rss", is_flag=True,
              help="also each row's peak resident memory in a fresh process, over the expected total (Linux; "
                   "what the start-of-run guard's overhead factor covers)")
@click.option("--expected-at", type=int, metavar="B",
              help="also the estimate at batch B per stage (measure at a batch this machine affords, read a larger "
                   "one off the same fit)")
def bench_memory(model: str, splits: int, batch_size: int, threads: int | None, methods: str, rss: bool,
                 expected_at: int | None) -> None:
    """Per-stage memory of BP and each method and staleness mode: measured in a few real CPU iterations
    beside the start-of-run guard's estimate."""
    from ..bench import bench_memory as run_bench

    if splits < 1 or batch_size < 2 or (expected_at is not None and expected_at < 1):
        raise UserError("--splits and --expected-at must be at least 1 and --batch-size at least 2")
    if rss and not Path("/proc/self/clear_refs").exists():
        raise UserError("--rss reads the process's peak resident memory from /proc (Linux)")
    run_bench(model, splits, batch_size, threads, method_entries(methods), rss, expected_at)


@bench.command("speedup")
@click.option("--model", default="resnet56", show_default=True)
@click.option("--splits", default="2", show_default=True, help="stage counts K (one rank per stage)")
@click.option("--methods", default="bp,fdg,dp", show_default=True,
              help="methods run on K ranks, each with options of its own in brackets if wanted "
                   "(gpipe[microbatches=4]); gpipe and 1f1b run through torch.distributed.pipelining")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--iterations", type=int, default=20, show_default=True, help="timed iterations per row and round")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="every row is timed once per round, rows interleaved, and the median round reported (a shared "
                   "machine's speed drifts within minutes)")
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
@click.option("--replicas", default="1", show_default=True,
              help="replica counts R to measure (each method on K x R ranks; dp on K x R replicas)")
def bench_speedup(model: str, splits: str, methods: str, batch_size: int, iterations: int, rounds: int,
                  partition: str, device: str, threads_per_stage: int, all_threads: int, amp: str,
                  channels_last: bool, save: Path | None, reuse_profile: bool, replicas: str) -> None:
    """Images/s of each method on K ranks vs BP on one worker (same threads per
    worker) and vs BP with all cores, with the simulator's prediction beside."""
    from ..bench import bench_speedup as run_bench

    if min(iterations, batch_size, threads_per_stage, all_threads) < 1:
        raise UserError("--iterations, --batch-size and the thread counts must be at least 1")
    run_bench(model, positive_ints(splits, "--splits"), method_entries(methods), batch_size, iterations, partition,
              device, threads_per_stage, all_threads, amp, channels_last, save, reuse_profile,
              positive_ints(replicas, "--replicas"), rounds)


@bench.command("simulate")
@click.option("--model", default="wrn28_10", show_default=True)
@click.option("--splits", default="2,4,8,16", show_default=True, help="stage counts K to predict")
@click.option("--methods", default="bp,ddg,fr,dgl,fdg,dp", show_default=True,
              help="comma-separated, each with options of its own in brackets if wanted (gpipe[microbatches=4]); "
                   "gpipe and 1f1b are predicted as --engine pipelining runs them")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="where the block profile is measured")
@click.option("--threads", type=int, default=1, show_default=True, help="threads per worker in the profile")
@click.option("--bandwidth", type=float, help="link bandwidth in GB/s (default: measured between local ranks)")
@click.option("--latency-us", type=float, help="link latency in microseconds (default: measured)")
@click.option("--reprofile", is_flag=True, help="measure the block profile again instead of reading the saved one")
@click.option("--gantt", type=click.Path(dir_okay=False, path_type=Path),
              help="also draw the predicted FDG timeline at the first K here (.png and .svg)")
@REPLICAS
def bench_simulate(model: str, splits: str, methods: str, batch_size: int, device: str, threads: int,
                   bandwidth: float | None, latency_us: float | None, reprofile: bool, gantt: Path | None,
                   replicas: int) -> None:
    """Predicted iteration time, utilisation and speedup over BP on one worker
    for each method and K, from a saved block profile (measured once)."""
    from ..bench import bench_simulate as run_bench

    if bandwidth is not None and bandwidth <= 0 or latency_us is not None and latency_us < 0:
        raise UserError("--bandwidth must be positive and --latency-us non-negative")
    if min(batch_size, threads, replicas) < 1:
        raise UserError("--batch-size, --threads and --replicas must be at least 1")
    parse_device(device)
    run_bench(model, positive_ints(splits, "--splits"), method_entries(methods), batch_size, device, threads,
              bandwidth, latency_us, reprofile, gantt, replicas)


@cli.command("gpu-check")
@click.option("--iterations", type=int, default=30, show_default=True, help="timed iterations per row")
@click.option("--batch-size", type=int, default=128, show_default=True)
def gpu_check_cmd(iterations: int, batch_size: int) -> int:
    """The GPU paths on this machine's GPU(s): speed, memory, host syncs, resume, NCCL (one line without a GPU)."""
    from ..gpucheck import gpu_check

    return gpu_check(iterations, batch_size)


