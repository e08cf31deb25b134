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
from ..config import RunConfig, parse_device
from ..plan import check_config
from ..errors import UserError
from ..method import make_method
from ..train import build_run
from ..models import reversible_blocks
from ..runs import cpu_name
from .profile import corun_factors, corun_slowdown, load_or_profile, profile_path, scaled_blocks
from .simulate import method_entry, library_run, microbatch_costs, microbatch_profiles
from ..simulator import COMPUTE_CATEGORIES




class LoaderClock:
    """A batch stream that adds up the time its draws take (the loader's
    share of a rank's forward); everything else is the wrapped stream's."""

    def __init__(self, stream: Any):
        self._stream, self.seconds = stream, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _timed(self, draw, t: int):
        start = time.perf_counter()
        try:
            return draw(t)
        finally:
            self.seconds += time.perf_counter() - start

    def batch(self, t: int):
        return self._timed(self._stream.batch, t)

    def labels(self, t: int):
        return self._timed(self._stream.labels, t)


# Where a rank's time goes (per iteration): its stage's compute (forward without the loader, backward, local,
# update), the loader's draws, waits for a neighbour's message, posting sends, and the rest (the engine's own
# bookkeeping and reaping finished sends, the gradient all-reduce of replicas inside UPDATE is compute here).
BREAKDOWN = ("compute", "loader", "wait", "send", "other")


def _timed_rank(rank: int, cfg: RunConfig, train_size: int, warmup: int, iterations: int) -> dict[str, Any]:
    """One rank of a speedup measurement: warm up (fill the pipeline), then
    time ``iterations`` iterations from a common start to the moment every
    rank has finished and drained (the last barrier); with the rank's
    breakdown (BREAKDOWN, seconds over the timed iterations)."""
    import torch.distributed as dist

    from ..engines.trace import Tracer

    tracer = Tracer()
    trainer = build_run(cfg, dataset=synthetic_dataset(10, train=train_size, test=cfg.batch_size), rank=rank,
                      tracer=tracer)
    loader = trainer.engine.stream = LoaderClock(trainer.engine.stream)
    for t in range(warmup):
        trainer.engine.run_iteration(t)
    trainer.sync_compute()
    dist.barrier()
    tracer.start(trainer.devices)
    loader.seconds = 0.0
    t0 = time.perf_counter()
    for t in range(warmup, warmup + iterations):
        trainer.engine.run_iteration(t)
    trainer.sync_compute()
    trainer.engine.finish(warmup + iterations)
    elapsed = time.perf_counter() - t0
    if not trainer.engine_info.observes_actions:  # a library runs the stages: no spans to break the time into
        return {"elapsed": elapsed, "busy": None, "starts": list(trainer.partition.starts),
                "partition": trainer.partition_text, "breakdown": None}
    spent = {category: 0.0 for category in ("compute", "recv", "send")}
    for span in tracer.spans:
        spent["compute" if span.category in COMPUTE_CATEGORIES else span.category] += span.duration
    breakdown = {"compute": spent["compute"] - loader.seconds, "loader": loader.seconds, "wait": spent["recv"],
                 "send": spent["send"]}
    breakdown["other"] = elapsed - sum(breakdown.values())
    return {"elapsed": elapsed, "busy": spent["compute"], "starts": list(trainer.partition.starts),
            "partition": trainer.partition_text, "breakdown": breakdown}


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
                cuts: tuple[str, ...] | None = None, options: dict[str, Any] | None = None) -> RunConfig:
    """The config of one measured row: ``name`` (with ``options``) on K x R
    ranks, cut at ``cuts`` if given; a micro-batched pipeline (gpipe, 1f1b)
    through torch.distributed.pipelining, the implementation users run."""
    options = options or {}
    engine = "pipelining" if library_run(make_method(name, **options)) and k > 1 else "distributed"
    return RunConfig(method=name, method_options=options, splits=k, replicas=r,
                     partition="explicit" if cuts else partition, split_at=cuts, threads=threads, engine=engine,
                     **base)


def bench_speedup(model: str, splits: list[int], methods: list, batch_size: int, iterations: int,
                  partition: str, device: str, threads_per_stage: int, all_threads: int, amp: str = "off",
                  channels_last: bool = False, save: Path | None = None, reuse_profile: bool = False,
                  replicas: list[int] = (1,), rounds: int = 3) -> None:
    """Throughput of each method on K x R ranks (one per stage and replica,
    ``threads_per_stage`` threads each) against BP on one worker with as many
    threads per worker, and BP with ``all_threads`` threads, in one
    invocation; beside each, the simulator's prediction from this machine's
    block profile and link. ``methods``: names, or (name, options) entries;
    gpipe and 1f1b run through torch.distributed.pipelining."""
    from ..simulator import Link, has_auxiliary_nets, simulate, stage_costs
    from ..partition import ALIASES, Partition, balanced_starts

    entries = [method_entry(m) for m in methods]

    parse_device(device)
    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    train_size = batch_size * 8
    base = dict(model=model, dataset="synthetic", batch_size=batch_size, device=device, amp=amp,
                channels_last=channels_last)
    # Every row's config (K against the blocks, R against the batch, ...) is refused
    # before the profiling, which takes a minute on a large model, not at its row.
    for k, r, (name, options, _) in ((k, r, e) for k in splits for r in replicas for e in entries):
        check_config(_row_config(base, name, k, r, partition, threads_per_stage, options=options))
    # Profiled afresh by default: a profile kept from another time (another load on
    # the machine, another build) is not "measured side by side" with these rows.
    profile = load_or_profile(model, batch_size, device, threads_per_stage, refresh=not reuse_profile)
    link = Link(profile["link"]["latency_s"], profile["link"]["bandwidth_Bps"])
    blocks = profile["blocks"]
    profiled = amp == "off" and not channels_last  # the block profile is fp32, default layout

    # K ranks on one CPU compute slower than the one process the profile timed (co-run factor).
    rank_counts = sorted({make_method(name).placement(k, r).ranks for name, _, _ in entries for k in splits
                          for r in replicas})
    factors = corun_factors(profile, profile_path(model, batch_size, device, threads_per_stage), rank_counts,
                            rounds) if profiled else {}
    micro_blocks = microbatch_profiles([make_method(name, **options) for name, options, _ in entries], model,
                                       batch_size, device, threads_per_stage, refresh=not reuse_profile
                                       ) if profiled else {}

    # (label, method, its options, K, R, threads, cut points)
    rows_to_time = [("bp", "bp", {}, 1, 1, threads_per_stage, None), ("bp", "bp", {}, 1, 1, all_threads, None)]
    costs = [b["forward_s"] + b["backward_s"] + b["update_s"] for b in blocks]
    for k in splits:
        # "balanced": cut where the block profile (the real batch, threads and engine) balances the
        # stages; `run --partition balanced` times blocks in isolation instead, a rougher guide.
        split_at = None
        if ALIASES.get(partition, partition) == "time" and k <= len(blocks):
            split_at = tuple(str(i) for i in balanced_starts(costs, k)[1:])
        for r, (name, options, label) in ((r, e) for r in replicas for e in entries):
            cuts = split_at if make_method(name).placement(k, r).stages == k else None  # dp: one stage, nothing to cut
            rows_to_time.append((label, name, options, k, r, threads_per_stage, cuts))
    # Rounds: every row once per round, in the same order, and each row's median over the rounds. A shared
    # machine's speed drifts by tens of percent within minutes (a virtual CPU's host); rows timed minutes apart
    # would compare the drift, rows timed in every round compare the methods.
    timed = [[_time_row(base, row, partition, device, train_size, iterations) for row in rows_to_time]
             for _ in range(rounds)]
    measured = [_median_row([timed[i][j] for i in range(rounds)]) for j in range(len(rows_to_time))]

    # The profile gives each block's share of the work; its level is set by BP on one worker timed in these
    # rounds (the profile was taken minutes earlier, at the machine's speed then).
    calibration = measured[0]["per_iter"] / sum(costs) if profiled else 1.0
    reversible = reversible_blocks(model)

    def predicted(method, k: int, r: int, starts: list[int]):
        """The simulator's Prediction for this row (None where the profile cannot cost it)."""
        if not profiled:
            return None
        placement = method.placement(k, r)
        ranges = Partition(tuple(starts), len(blocks), "").ranges()
        return simulate(method, stage_costs(scaled_blocks(blocks, calibration), ranges, reversible), link,
                        replicas=placement.replicas, library=library_run(method),
                        microbatch_stages=microbatch_costs(method, micro_blocks, ranges, reversible, calibration),
                        corun=corun_slowdown(placement.ranks, factors.get(placement.ranks, 1.0)))

    bp1, bp_all = measured[0]["per_iter"], measured[1]["per_iter"]
    rows, breakdowns = [], []
    for (name, method_name, options, k, r, threads, _), result in zip(rows_to_time, measured):
        method = make_method(method_name, **options)
        placement = method.placement(k, r)
        label = f"{k}" if r == 1 else f"{k}x{r}"
        if result.get("reference"):  # BP in one process: the reference (the profile is calibrated to it)
            rows.append((name, label, f"1 x {threads}", result["per_iter"], None, None, "-", result["spread"],
                         method))
            continue
        prediction = predicted(method, k, r, result["starts"])
        rows.append((name, label, f"{placement.ranks} x {threads}", result["per_iter"], _seconds(prediction),
                     result["balance"], result["partition"], result["spread"], method))
        if result["breakdown"] is not None:
            breakdowns.append((name, label, placement, result["breakdown"], prediction))
    click.echo(f"{model}, batch {batch_size}, {device}, {iterations} timed iterations per row after warm-up "
               f"(pipeline filled) in each of {rounds} round(s), the median round's; synthetic data drawn by the "
               f"same batch loader; one invocation on {cpu_name()}")
    width = max(6, *(len(row[0]) for row in rows))
    click.echo(f"{'method':<{width}} {'K(xR)':>5} {'ranks x threads':>15} {'ms/iter':>8} {'img/s':>7} "
               f"{'vs BP 1x' + str(threads_per_stage):>9} {'vs BP 1x' + str(all_threads):>9} "
               f"{'balance':>7} {'sim ms':>7} {'sim/meas':>8} {'spread':>6}  partition")
    starred = False
    for name, k, workers, per_iter, pred, balance, part, spread, method in rows:
        stages = int(k.split("x")[0])
        star = profiled and stages > 1 and has_auxiliary_nets(method, stages)
        starred |= star
        pred_text = (f"{1000 * pred:6.0f}{'*' if star else ' '} {pred / per_iter:8.2f}" if pred
                     else f"{'-':>7} {'-':>8}")
        bal = f"{balance:7.2f}" if balance else f"{'-':>7}"
        noise = f"{100 * spread:5.0f}%" if spread is not None else f"{'-':>6}"
        click.echo(f"{name:<{width}} {k:>5} {workers:>15} {1000 * per_iter:8.0f} {batch_size / per_iter:7.0f} "
                   f"{bp1 / per_iter:8.2f}x {bp_all / per_iter:8.2f}x {bal} {pred_text} {noise}  {part}")
    click.echo(f"partition {partition}{' (cut by the block profile)' if ALIASES.get(partition) == 'time' else ''}; "
               "balance = slowest rank's compute time / mean (1.00 = even); spread = (slowest round - fastest) "
               "/ the median round, the row's own noise (a sim/meas closer to 1 than that is luck); "
               "sim = the timeline simulator's "
               f"prediction from the block profile ({profile_path(model, batch_size, device, threads_per_stage)}), "
               f"the measured link ({link.latency_s * 1e6:.0f} us, {link.bandwidth_Bps / 1e9:.2f} GB/s)"
               + (f", its block times scaled by {calibration:.2f} (BP 1 x {threads_per_stage} timed in these rounds / "
                  f"the profile's sum: the machine's speed now against when it was profiled)" if profiled else "")
               + (", the co-run factor (each rank's compute while K ranks share the CPU / alone, the median "
                  "of interleaved rounds): " + ", ".join(f"K={k} {f:.2f}x" for k, f in factors.items())
                  + ", charged while ranks compute together (n of a row's ranks at once: linear from 1.00 at "
                  "one to the factor at all of them)" if factors else "")
               + (", and one micro-batch's costs from a profile at B/M images (M = "
                  + ", ".join(map(str, micro_blocks)) + ")" if micro_blocks else "")
               + ("; KxR: K stages x R replicas, each replica on 1/R of every batch (dp: 1 stage x K R "
                  "replicas)" if max(replicas) > 1 else ""))
    if starred:
        click.echo("* without the auxiliary / synthetic-gradient nets, which the block profile does not cost")
    if any(library_run(row[-1]) for row in rows):
        click.echo("gpipe, 1f1b: through torch.distributed.pipelining (--engine pipelining), simulated micro-batch by "
                   "micro-batch; the library runs the stages itself, so those rows have no balance or breakdown")
    _print_breakdowns(breakdowns)
    if not profiled:
        click.echo(f"no predictions: the block profile is fp32 in the default layout, these runs amp {amp}"
                   f"{', channels-last' if channels_last else ''}")
    if save is not None:
        _save_speeds(save, model, batch_size, device, amp, channels_last, threads_per_stage, all_threads, rows)


def _time_row(base: dict[str, Any], row: tuple, partition: str, device: str, train_size: int,
              iterations: int) -> dict[str, Any]:
    """One timing of one row: seconds per iteration and, for K ranks, each
    rank's breakdown (seconds per iteration), the partition and the balance."""
    from ..engines.launch import spawn_ranks

    _, name, options, k, r, threads, cuts = row
    warm = 4
    if k == 1 and r == 1 and name == "bp":
        cfg = RunConfig(method="bp", splits=1, threads=threads, **base)
        return {"per_iter": timed_sequential(cfg, train_size, warm, iterations) / iterations, "breakdown": None,
                "reference": True}
    placement = make_method(name, **options).placement(k, r)
    cfg = _row_config(base, name, k, r, partition, threads, cuts, options)
    results = spawn_ranks(placement.ranks, torch.device(device), _timed_rank, (cfg, train_size, 2 * k + warm,
                                                                                iterations))
    out = {"per_iter": max(x["elapsed"] for x in results) / iterations, "breakdown": None, "balance": None,
           "starts": results[0]["starts"], "partition": results[0]["partition"]}
    if results[0]["breakdown"] is not None:  # the engine ran the stages' actions itself (not a library)
        busy = [x["busy"] for x in results]
        out.update(breakdown=[{key: x["breakdown"][key] / iterations for key in BREAKDOWN} for x in results],
                   balance=max(busy) / statistics.mean(busy))
    return out


def _median_row(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """A row over the rounds: the median round (its time, breakdown and
    balance), and the rounds' spread, (slowest - fastest) / median (None
    for one round): how far the machine moved under this row."""
    ordered = sorted(timings, key=lambda timing: timing["per_iter"])
    median = ordered[(len(ordered) - 1) // 2]
    spread = (ordered[-1]["per_iter"] - ordered[0]["per_iter"]) / median["per_iter"] if len(ordered) > 1 else None
    return {**median, "spread": spread}


def _seconds(prediction) -> float | None:
    return None if prediction is None else prediction.iteration_s


def _print_breakdowns(breakdowns: list[tuple]) -> None:
    """Where each rank's time went, in ms per iteration, beside the compute
    the simulator charged its stage (its busy share of the predicted
    iteration): a rank whose compute exceeds that, or whose time is lost
    outside compute and waiting, is what a gap between sim and measured
    comes from."""
    if not breakdowns:
        return
    click.echo("per rank, ms per iteration: compute (forward without the loader, backward, update), the "
               "simulator's compute for that stage, loader draws, waiting for a message, posting sends, other "
               "(the engine's bookkeeping, finishing sends)")
    click.echo(f"{'method':<6} {'K(xR)':>5} {'rank':>4} {'stage':>5} {'compute':>8} {'sim':>6} {'ratio':>6} "
               f"{'loader':>7} {'wait':>6} {'send':>6} {'other':>6} {'total':>6}")
    for name, label, placement, per_rank, prediction in breakdowns:
        for rank, parts in enumerate(per_rank):
            stage = placement.stage_of(rank)
            ms = {key: 1000 * parts[key] for key in BREAKDOWN}
            sim = 1000 * prediction.utilisation[stage] * prediction.iteration_s if prediction else None
            sim_text = f"{sim:6.0f} {ms['compute'] / sim:5.2f}x" if sim else f"{'-':>6} {'-':>6}"
            click.echo(f"{name:<6} {label:>5} {rank:>4} {stage:>5} {ms['compute']:8.1f} {sim_text} "
                       f"{ms['loader']:7.1f} {ms['wait']:6.1f} {ms['send']:6.1f} {ms['other']:6.1f} "
                       f"{sum(ms.values()):6.0f}")


def _save_speeds(path: Path, model: str, batch_size: int, device: str, amp: str, channels_last: bool,
                 threads_per_stage: int, all_threads: int, rows: list[tuple]) -> None:
    """The measured seconds per iteration, for tables' time-to-accuracy:
    BP on one process with all threads, each other method on K ranks."""
    from ..report.results import speed_key
    from ..runs import write_atomically

    speeds = {speed_key("bp", 1): next(per_iter for name, k, workers, per_iter, *_ in rows
                                       if name == "bp" and workers == f"1 x {all_threads}")}
    # (a method with options is keyed by its label: "gpipe[microbatches=4] K=2")
    speeds.update({speed_key(name, k): per_iter for name, k, _, per_iter, *_ in rows if k != "1"})  # k: "K" or "KxR"
    record = {"model": model, "batch_size": batch_size, "device": device, "amp": amp, "channels_last": channels_last,
              "hardware": f"{cpu_name()}, {os.cpu_count()} cores" if device == "cpu"
                          else torch.cuda.get_device_name(device),
              "workers": f"bp: 1 process x {all_threads} threads; others: K ranks x {threads_per_stage} thread(s)",
              "seconds_per_iteration": speeds, "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    click.echo(f"saved {path}")
