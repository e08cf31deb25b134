"""`bench simulate`: predicted iteration time, utilisation and speedup for each method and K."""
from __future__ import annotations

from dataclasses import dataclass
import statistics
from pathlib import Path
from typing import Any

import click

from ..config import RunConfig
from ..method import make_method
from ..plan import check_config
from ..models import reversible_blocks
from .profile import load_or_profile, model_block_names, profile_path, scaled_blocks




@dataclass
class GridPoint:
    """One method at one K in the simulator's grid."""

    prediction: Any  # simulator.Prediction
    speedup: float  # over BP on one worker
    balance: float | None  # slowest stage / mean (None for data-parallel)
    starred: bool  # auxiliary nets not costed


def method_entry(method) -> tuple[str, dict[str, Any], str]:
    """(name, options, label) of a grid's method: the label names the options given (``gpipe[microbatches=4]``)."""
    name, options = (method, {}) if isinstance(method, str) else method
    label = name + (f"[{','.join(f'{k}={v}' for k, v in options.items())}]" if options else "")
    return name, dict(options), label


def check_grid(model: str, splits: list[int], methods: list, batch_size: int, device: str, threads: int,
               replicas: int) -> None:
    """Refuse, before any profiling, a grid point `fdgbench run` would refuse
    (e.g. a batch its replicas cannot share): a prediction for a run that
    cannot exist is no prediction. The same checks as a run's
    (plan.check_config), for each method at each K the model's blocks
    allow; a larger K is a "no row" line of the table, not an error."""
    num_blocks = len(model_block_names(model))
    for k in (k for k in splits if k <= num_blocks):
        for name, options, _ in map(method_entry, methods):
            check_config(RunConfig(method=name, method_options=options, model=model, splits=k, replicas=replicas,
                                   partition="balanced", dataset="synthetic", batch_size=batch_size, device=device,
                                   threads=threads))


def simulate_grid(model: str, splits: list[int], methods: list, batch_size: int, device: str, threads: int,
                  bandwidth_gbps: float | None = None, latency_us: float | None = None, refresh: bool = False,
                  replicas: int = 1):
    """Per method (by its label, method_entry), the simulator's prediction at each
    K with ``replicas`` of each stage (None where K exceeds the blocks),
    stages balanced by the block profile; with the profile and link used. A
    micro-batched pipeline (gpipe, 1f1b) is predicted as
    torch.distributed.pipelining runs it (simulator.library_pipeline)."""
    from ..simulator import Link, has_auxiliary_nets, simulate, stage_costs
    from ..partition import Partition, balance, balanced_starts

    check_grid(model, splits, methods, batch_size, device, threads, replicas)
    profile = load_or_profile(model, batch_size, device, threads, refresh=refresh)
    blocks = profile["blocks"]
    measured = profile["link"]
    link = Link(measured["latency_s"] if latency_us is None else latency_us * 1e-6,
                measured["bandwidth_Bps"] if bandwidth_gbps is None else bandwidth_gbps * 1e9)
    costs = [b["forward_s"] + b["backward_s"] + b["update_s"] for b in blocks]
    reversible = reversible_blocks(model)
    whole = stage_costs(blocks, [range(len(blocks))])[0]
    bp_one = whole.forward + whole.backward + whole.update
    entries = [method_entry(m) for m in methods]
    micro_blocks = microbatch_profiles([make_method(name, **options) for name, options, _ in entries], model,
                                       batch_size, device, threads, refresh)
    grid: dict[str, list[GridPoint | None]] = {label: [] for _, _, label in entries}
    partitions: dict[int, Partition] = {}  # by stage count (dp's is one stage at every K)
    for k in splits:
        for name, options, label in entries:
            method = make_method(name, **options)
            placement = method.placement(k, replicas)
            if k > len(blocks):  # no row at this K (for any method: the rows compare methods at one K)
                grid[label].append(None)
                continue
            if placement.stages not in partitions:
                partitions[placement.stages] = Partition(balanced_starts(costs, placement.stages), len(blocks), "time")
            partition = partitions[placement.stages]
            pred = simulate(method, stage_costs(blocks, partition.ranges(), reversible), link,
                            replicas=placement.replicas, library=library_run(method),
                            microbatch_stages=microbatch_costs(method, micro_blocks, partition.ranges(), reversible))
            grid[label].append(GridPoint(pred, bp_one / pred.iteration_s,
                                        balance(costs, partition) if placement.stages > 1 else None,
                                        has_auxiliary_nets(method, placement.stages)))
    return grid, profile, link, bp_one


def library_run(method) -> bool:
    """Whether ``method`` is a micro-batched pipeline, predicted as the library runs it."""
    return getattr(method, "pipeline_schedule", None) is not None


def microbatch_profiles(methods: list, model: str, batch_size: int, device: str, threads: int,
                        refresh: bool = False) -> dict[int, list[dict]]:
    """The block profile at the micro-batch's size, B/M, for each M > 1 of
    the micro-batched pipelines among ``methods`` (Method instances), by M:
    what one micro-batch costs. A small batch runs less efficiently per
    image than its share of a large one (on a CPU, GPipe at M = 8 took 23%
    longer than 1/M of the batch's profile predicted), so 1/M of the
    batch's costs would flatter the pipelines."""
    counts = sorted({m.microbatches for m in methods if library_run(m) and m.microbatches > 1})
    return {m: load_or_profile(model, batch_size // m, device, threads, refresh=refresh)["blocks"] for m in counts}


def microbatch_costs(method, micro_blocks: dict[int, list[dict]], ranges, reversible, scale: float = 1.0):
    """The stage costs of one of ``method``'s micro-batches (simulate's
    ``microbatch_stages``) from ``microbatch_profiles``' blocks, each block's
    time times ``scale``; None for a method that has no micro-batches or M = 1."""
    from ..simulator import stage_costs

    if not library_run(method) or method.microbatches not in micro_blocks:
        return None
    return stage_costs(scaled_blocks(micro_blocks[method.microbatches], scale), ranges, reversible)


def predicted_speedups(model: str, splits: list[int], methods: list[str], batch_size: int, device: str,
                       threads: int) -> dict[str, list[float | None]]:
    grid = simulate_grid(model, splits, methods, batch_size, device, threads)[0]
    return {name: [p.speedup if p else None for p in points] for name, points in grid.items()}


def bench_simulate(model: str, splits: list[int], methods: list[str], batch_size: int, device: str, threads: int,
                   bandwidth_gbps: float | None, latency_us: float | None, reprofile: bool,
                   gantt: Path | None, replicas: int = 1) -> None:
    """Predicted speedups over BP on one worker, per method and K (with
    ``replicas`` of each stage), with stages balanced by the profile's
    measured block times."""
    from ..report.gantt import draw_gantt

    grid, profile, link, bp_one = simulate_grid(model, splits, methods, batch_size, device, threads, bandwidth_gbps,
                                                latency_us, reprofile, replicas)
    blocks = profile["blocks"]
    click.echo(f"{model}, batch {batch_size}: block profile {profile_path(model, batch_size, device, threads)} "
               f"({device}, {threads} thread(s) per worker); BP on one worker {1000 * bp_one:.0f} ms/iter; link "
               f"{link.latency_s * 1e6:.0f} us + {link.bandwidth_Bps / 1e9:.2f} GB/s"
               f"{'' if bandwidth_gbps is None and latency_us is None else ' (given)'}")
    if replicas > 1:
        click.echo(f"each stage has {replicas} replicas (K x {replicas} workers; dp: 1 stage x {replicas}K), "
                   f"each on 1/{replicas} of the batch, gradients all-reduced at every update")
    width = max(6, *(len(label) for label in grid))
    click.echo(f"{'K':>3} {'method':<{width}} {'ms/iter':>8} {'speedup':>8} {'util min/mean':>14} {'balance':>8}")
    drawn = starred = False
    for i, k in enumerate(splits):
        if k > len(blocks):
            click.echo(f"{k:>3} {model} has {len(blocks)} blocks, so K={k} is not possible (no row)")
            continue
        for name in grid:
            point = grid[name][i]
            pred = point.prediction
            util = f"{min(pred.utilisation):.2f}/{statistics.mean(pred.utilisation):.2f}"
            star = "*" if point.starred else " "
            starred |= point.starred
            bal = "-" if point.balance is None else f"{point.balance:8.2f}"
            click.echo(f"{k:>3} {name:<{width}} {1000 * pred.iteration_s:8.0f} {point.speedup:7.2f}x{star}"
                       f"{util:>14} {bal:>8}")
            if gantt is not None and not drawn and name == "fdg":
                paths = draw_gantt(pred.spans, gantt, f"simulated: fdg {model} K={k}, batch {batch_size}, "
                                   f"{threads} thread(s) per worker", count=6)
                click.echo(f"    timeline: {' '.join(map(str, paths))}")
                drawn = True
    click.echo("speedup = BP on one worker (sum of all blocks) / predicted time per iteration; util = busy "
               "fraction of each worker in steady state; dp's all-reduce is not overlapped with its backward "
               "(a pessimistic model)")
    if starred:
        click.echo("* without the auxiliary / synthetic-gradient nets, which the block profile does not cost")
    if any(library_run(make_method(name, **options)) for name, options, _ in map(method_entry, methods)):
        click.echo("gpipe, 1f1b: as torch.distributed.pipelining runs them (--engine pipelining): M micro-batches "
                   "through the library's schedule, the pipeline's bubble included, each costing a block profile "
                   "taken at B/M images")
