"""`bench speedup`: each method on K ranks against BP on one worker and BP with all cores, the simulator beside."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from ..data import synthetic_dataset
from ..config import RunConfig, check_config, parse_device
from ..train import build_run
from .profile import corun_factors, load_or_profile, profile_path, scaled_blocks




def _timed_rank(rank: int, cfg: RunConfig, train_size: int, warmup: int, iterations: int) -> dict[str, Any]:
    """One rank of a speedup measurement: warm up (fill the pipeline), then
    time ``iterations`` iterations from a common start to the moment every
    rank has finished and drained (the last barrier)."""
    import torch.distributed as dist

    from ..engines.trace import Tracer

    tracer = Tracer()
    trainer = build_run(cfg, dataset=synthetic_dataset(10, train=train_size, test=cfg.batch_size), rank=rank,
                      tracer=tracer)
    for t in range(warmup):
        trainer.engine.run_iteration(t)
    trainer.sync_compute()
    dist.barrier()
    tracer.start(trainer.devices)
    t0 = time.perf_counter()
    for t in range(warmup, warmup + iterations):
        trainer.engine.run_iteration(t)
    trainer.sync_compute()
    trainer.engine.finish(warmup + iterations)
    elapsed = time.perf_counter() - t0
    busy = sum(s.duration for s in tracer.spans if s.category in ("forward", "backward", "local", "update"))
    return {"elapsed": elapsed, "busy": busy, "starts": list(trainer.partition.starts),
            "partition": trainer.partition_text}


def timed_sequential(cfg: RunConfig, train_size: int, warmup: int, iterations: int) -> float:
    saved = torch.get_num_threads()
    try:
        trainer = build_run(cfg, dataset=synthetic_dataset(10, train=train_size, test=cfg.batch_size))
        for t in range(warmup):
            trainer.engine.run_iteration(t)
        trainer.sync_compute()
        t0 = time.perf_counter()
        for t in range(warmup, warmup + iterations):
            trainer.engine.run_iteration(t)
        trainer.sync_compute()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)


def _row_config(base: dict[str, Any], name: str, k: int, r: int, partition: str, threads: int,
                cuts: tuple[str, ...] | None = None) -> RunConfig:
    """The config of one measured row: ``name`` on K x R ranks, cut at ``cuts`` if given."""
    return RunConfig(method=name, splits=k, replicas=r, partition="explicit" if cuts else partition, split_at=cuts,
                     threads=threads, engine="distributed", **base)


def bench_speedup(model: str, splits: list[int], methods: list[str], batch_size: int, iterations: int,
                  partition: str, device: str, threads_per_stage: int, all_threads: int, amp: str = "off",
                  channels_last: bool = False, save: Path | None = None, reuse_profile: bool = False,
                  replicas: list[int] = (1,)) -> None:
    """Throughput of each method on K x R ranks (one per stage and replica,
    ``threads_per_stage`` threads each) against BP on one worker with as many
    threads per worker, and BP with ``all_threads`` threads, in one
    invocation; beside each, the simulator's prediction from this machine's
    block profile and link."""
    from ..engines.launch import spawn_ranks
    from ..engines.simulate import Link, has_auxiliary_nets, simulate, stage_costs
    from ..method import make_method
    from ..partition import ALIASES, Partition, balanced_starts

    parse_device(device)
    train_size = batch_size * 8
    base = dict(model=model, dataset="synthetic", batch_size=batch_size, device=device, amp=amp,
                channels_last=channels_last)
    # Every row's config (K against the blocks, R against the batch, ...) is refused
    # before the profiling, which takes a minute on a large model, not at its row.
    for k, r, name in ((k, r, name) for k in splits for r in replicas for name in methods):
        check_config(_row_config(base, name, k, r, partition, threads_per_stage))
    # Profiled afresh by default: a profile kept from another time (another load on
    # the machine, another build) is not "measured side by side" with these rows.
    profile = load_or_profile(model, batch_size, device, threads_per_stage, refresh=not reuse_profile)
    link = Link(profile["link"]["latency_s"], profile["link"]["bandwidth_Bps"])
    blocks = profile["blocks"]
    profiled = amp == "off" and not channels_last  # the block profile is fp32, default layout

    # K ranks on one CPU compute slower than the one process the profile timed (co-run factor).
    rank_counts = sorted({make_method(name).placement(k, r).ranks for name in methods for k in splits
                          for r in replicas})
    factors = corun_factors(profile, profile_path(model, batch_size, device, threads_per_stage), rank_counts) \
        if profiled else {}

    def predicted(method_name: str, k: int, r: int, starts: list[int]) -> float | None:
        if not profiled:
            return None
        method = make_method(method_name)
        placement = method.placement(k, r)
        costs = scaled_blocks(blocks, factors.get(placement.ranks, 1.0))
        ranges = Partition(tuple(starts), len(costs), "").ranges()
        return simulate(method, stage_costs(costs, ranges), link, replicas=placement.replicas).iteration_s

    rows = []
    warm = 4
    bp1 = timed_sequential(RunConfig(method="bp", splits=1, threads=threads_per_stage, **base), train_size, warm,
                            iterations) / iterations
    rows.append(("bp", "1", f"1 x {threads_per_stage}", bp1, predicted("bp", 1, 1, [0]), None, "-"))
    bp_all = timed_sequential(RunConfig(method="bp", splits=1, threads=all_threads, **base), train_size, warm,
                               iterations) / iterations
    rows.append(("bp", "1", f"1 x {all_threads}", bp_all, None, None, "-"))
    costs = [b["forward_s"] + b["backward_s"] + b["update_s"] for b in blocks]
    for k in splits:
        # "balanced": cut where the block profile (the real batch, threads and engine) balances the
        # stages; `run --partition balanced` times blocks in isolation instead, a rougher guide.
        split_at = None
        if ALIASES.get(partition, partition) == "time" and k <= len(blocks):
            split_at = tuple(str(i) for i in balanced_starts(costs, k)[1:])
        for r, name in ((r, name) for r in replicas for name in methods):
            placement = make_method(name).placement(k, r)
            cuts = split_at if placement.stages == k else None  # dp: one stage, nothing to cut
            cfg = _row_config(base, name, k, r, partition, threads_per_stage, cuts)
            check_config(cfg)
            results = spawn_ranks(placement.ranks, torch.device(device), _timed_rank,
                                  (cfg, train_size, 2 * k + warm, iterations))
            per_iter = max(x["elapsed"] for x in results) / iterations
            busy = [x["busy"] for x in results]
            balance = max(busy) / statistics.mean(busy)
            rows.append((name, f"{k}" if r == 1 else f"{k}x{r}", f"{placement.ranks} x {threads_per_stage}", per_iter,
                         predicted(name, k, r, results[0]["starts"]), balance, results[0]["partition"]))
    click.echo(f"{model}, batch {batch_size}, {device}, {iterations} timed iterations per row after warm-up "
               f"(pipeline filled); synthetic data drawn by the same batch loader; one invocation")
    click.echo(f"{'method':<6} {'K(xR)':>5} {'ranks x threads':>15} {'ms/iter':>8} {'img/s':>7} "
               f"{'vs BP 1x' + str(threads_per_stage):>9} {'vs BP 1x' + str(all_threads):>9} "
               f"{'balance':>7} {'sim ms':>7} {'sim/meas':>8}  partition")
    starred = False
    for name, k, workers, per_iter, pred, balance, part in rows:
        stages = int(k.split("x")[0])
        star = profiled and stages > 1 and has_auxiliary_nets(make_method(name), stages)
        starred |= star
        pred_text = (f"{1000 * pred:6.0f}{'*' if star else ' '} {pred / per_iter:8.2f}" if pred
                     else f"{'-':>7} {'-':>8}")
        bal = f"{balance:7.2f}" if balance else f"{'-':>7}"
        click.echo(f"{name:<6} {k:>5} {workers:>15} {1000 * per_iter:8.0f} {batch_size / per_iter:7.0f} "
                   f"{bp1 / per_iter:8.2f}x {bp_all / per_iter:8.2f}x {bal} {pred_text}  {part}")
    click.echo(f"partition {partition}{' (cut by the block profile)' if ALIASES.get(partition) == 'time' else ''}; "
               "balance = slowest rank's compute time / mean (1.00 = even); sim = the timeline simulator's "
               f"prediction from the block profile ({profile_path(model, batch_size, device, threads_per_stage)}), "
               f"the measured link ({link.latency_s * 1e6:.0f} us, {link.bandwidth_Bps / 1e9:.2f} GB/s)"
               + (", and the co-run factor (each rank's compute while K ranks share the CPU / alone): "
                  + ", ".join(f"K={k} {f:.2f}x" for k, f in factors.items()) if factors else "")
               + ("; KxR: K stages x R replicas, each replica on 1/R of every batch (dp: 1 stage x K R "
                  "replicas)" if max(replicas) > 1 else ""))
    if starred:
        click.echo("* without the auxiliary / synthetic-gradient nets, which the block profile does not cost")
    if not profiled:
        click.echo(f"no predictions: the block profile is fp32 in the default layout, these runs amp {amp}"
                   f"{', channels-last' if channels_last else ''}")
    if save is not None:
        _save_speeds(save, model, batch_size, device, amp, channels_last, threads_per_stage, all_threads, rows)


def _cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _save_speeds(path: Path, model: str, batch_size: int, device: str, amp: str, channels_last: bool,
                 threads_per_stage: int, all_threads: int, rows: list[tuple]) -> None:
    """The measured seconds per iteration, for tables' time-to-accuracy:
    BP on one process with all threads, each other method on K ranks."""
    from ..report.tables import speed_key
    from ..runs import write_atomically

    speeds = {speed_key("bp", 1): next(per_iter for name, k, workers, per_iter, *_ in rows
                                       if name == "bp" and workers == f"1 x {all_threads}")}
    speeds.update({speed_key(name, k): per_iter for name, k, _, per_iter, *_ in rows if k != "1"})  # k: "K" or "KxR"
    record = {"model": model, "batch_size": batch_size, "device": device, "amp": amp, "channels_last": channels_last,
              "hardware": f"{_cpu_name()}, {os.cpu_count()} cores" if device == "cpu"
                          else torch.cuda.get_device_name(device),
              "workers": f"bp: 1 process x {all_threads} threads; others: K ranks x {threads_per_stage} thread(s)",
              "seconds_per_iteration": speeds, "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    click.echo(f"saved {path}")
