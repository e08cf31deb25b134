"""`bench step` and `bench precision`: iteration times of the sequential engine, interleaved rounds, medians."""
from __future__ import annotations

import statistics
import time

import click
import torch

from ..data import synthetic_dataset
from ..config import RunConfig, parse_device
from ..train import Run, build_run




def _interleaved_medians(trainers: list[Run], warmups: list[int], iterations: int, rounds: int) -> list[float]:
    """Seconds per sequential-engine iteration of each trainer: a warm-up
    (pipeline fill, allocator and kernel caches), then ``rounds`` rounds
    that time ``iterations`` iterations of every trainer in turn, so drift
    in the machine's load touches all alike; the median round per trainer."""
    next_t = [0] * len(trainers)

    def timed(i: int, n: int) -> float:
        tr = trainers[i]
        tr.sync_compute()
        t0 = time.perf_counter()
        for _ in range(n):
            tr.engine.run_iteration(next_t[i])
            next_t[i] += 1
        tr.sync_compute()
        return (time.perf_counter() - t0) / n

    for i, warmup in enumerate(warmups):
        timed(i, warmup)
    per_round = [[timed(i, iterations) for i in range(len(trainers))] for _ in range(rounds)]
    return [statistics.median(r[i] for r in per_round) for i in range(len(trainers))]


def bench_step(model: str, splits: list[int], batch_size: int, iterations: int, rounds: int, device: str,
               threads: int | None, staleness: str) -> None:
    """Mean sequential-engine iteration time (data batch, forward, backward,
    update of every stage) of FDG at each K vs BP unsplit, in interleaved
    rounds after a warm-up that fills FDG's pipeline; medians over rounds."""
    parse_device(device)
    data = synthetic_dataset(10, train=batch_size * 4, test=batch_size)
    configs = [("bp", 1, {})] + [("fdg", k, {"staleness": staleness}) for k in splits]
    trainers = []
    for method, k, options in configs:
        cfg = RunConfig(method=method, method_options=options, model=model, splits=k, dataset="synthetic",
                        batch_size=batch_size, device=device, threads=threads)
        trainers.append(build_run(cfg, dataset=data))
    medians = _interleaved_medians(trainers, [2 * k + 2 for _, k, _ in configs], iterations, rounds)
    click.echo(f"{model}, batch {batch_size}, {device}, {torch.get_num_threads()} thread(s), staleness {staleness}: "
               f"median over {rounds} interleaved rounds of {iterations} iterations")
    for (method, k, _), tr, m in zip(configs, trainers, medians):
        ratio = m / medians[0]
        part = f" [{tr.partition.strategy}: {tr.partition_text}]" if k > 1 else ""
        click.echo(f"  {method:<4} K={k}  {1000 * m:8.1f} ms/iter  {ratio:5.3f}x BP{part}")
    click.echo("  target: FDG <= 1.15x BP (same FLOPs per iteration; the difference is bookkeeping)")


# The speed switches a run's config offers, each keeping every method's semantics
# (legacy included under bf16: staleness.KeptGraphUnderAutocast).
PRECISIONS = {"fp32": {}, "channels-last": {"channels_last": True}, "bf16": {"amp": "bf16"},
              "bf16+channels-last": {"amp": "bf16", "channels_last": True}}


def bench_precision(model: str, methods: list[str], splits: int, batch_size: int, iterations: int, rounds: int,
                    threads: int | None, compile_reference: bool) -> None:
    """Each method's sequential-engine iteration (K stages, default options)
    at every precision and memory format in PRECISIONS, interleaved in one
    invocation, as ratios to its own fp32 eager time; then torch.compile on
    the unsplit model's plain training step against the same step eager,
    the reference for what compilation would add (the engines do not
    compile: a delayed backward through a compiled graph would need its own
    proof that each staleness mode keeps its meaning)."""
    if threads:
        torch.set_num_threads(threads)
    data = synthetic_dataset(10, train=batch_size * 4, test=batch_size)
    trainers, labels = [], []
    for name in methods:
        for precision, fields in PRECISIONS.items():
            cfg = RunConfig(method=name, model=model, splits=splits, dataset="synthetic", batch_size=batch_size,
                            threads=threads, **fields)
            trainers.append(build_run(cfg, dataset=data))
            labels.append((name, precision))
    medians = _interleaved_medians(trainers, [2 * splits + 2] * len(trainers), iterations, rounds)
    steps = 50_000 // batch_size  # the batch stream drops an epoch's last partial batch
    click.echo(f"{model}, K={splits}, batch {batch_size}, sequential engine, {torch.get_num_threads()} thread(s): "
               f"ms/iteration, median of {rounds} interleaved rounds of {iterations}; speedup over the method's "
               f"fp32; s/epoch = ms/iteration x {steps} (CIFAR-10's 50,000 images)")
    click.echo(f"{'method':<6} " + " ".join(f"{p:>22}" for p in PRECISIONS))
    for i, name in enumerate(methods):
        row = medians[i * len(PRECISIONS):(i + 1) * len(PRECISIONS)]
        cells = [f"{1000 * m:6.0f} ({row[0] / m:4.2f}x) {m * steps:4.0f}s" for m in row]
        click.echo(f"{name:<6} " + " ".join(f"{c:>22}" for c in cells))
    if compile_reference:
        click.echo(_compile_reference(model, batch_size, iterations, rounds))


def _compile_reference(model: str, batch_size: int, iterations: int, rounds: int) -> str:
    """torch.compile (inductor) vs eager on the unsplit model's plain SGD
    step, fp32, interleaved rounds; one line, or why it could not run."""
    from ..models import build_model

    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))

    def step_fn(compiled: bool):
        torch.manual_seed(0)
        net = build_model(model, 10)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        forward = torch.compile(net) if compiled else net

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
        return step

    try:
        steps = [step_fn(False), step_fn(True)]
        t0 = time.perf_counter()
        for s in steps:
            s(), s()  # compiles the forward and backward graphs
        compile_s = time.perf_counter() - t0
    except Exception as exc:  # inductor needs a C++ compiler; its absence is a finding, not a crash
        return f"torch.compile: unavailable here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    rounds_s = []
    for _ in range(rounds):
        times = []
        for s in steps:
            t0 = time.perf_counter()
            for _ in range(iterations):
                s()
            times.append((time.perf_counter() - t0) / iterations)
        rounds_s.append(times)
    eager, compiled = (statistics.median(r[i] for r in rounds_s) for i in range(2))
    return (f"torch.compile reference, {model} unsplit plain SGD step, fp32: eager {1000 * eager:.0f} ms, compiled "
            f"{1000 * compiled:.0f} ms ({eager / compiled:.2f}x; {compile_s:.0f} s to compile); not used by the "
            f"engines (see `fdgbench bench precision --help`)")
