"""Benchmarks: every figure is a ratio of things measured side by side in the
same invocation (this machine is shared and noisy; absolute seconds are not
trusted), and every timing says what it includes."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from .data import BatchStream, Normalizer, load_dataset, synthetic_dataset
from .errors import UserError
from .config import RunConfig, check_config, parse_device
from .train import Run, build_run


def bench_data(dataset: str, data_dir: str, batch_size: int, threads: int) -> None:
    """One training epoch of batches (crop + flip + normalise) from the
    device-resident loader vs torchvision's per-image PIL transforms in a
    DataLoader with no worker processes, as the reference scripts do."""
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    torch.set_num_threads(threads)
    ds = load_dataset(dataset, data_dir)
    mean, std = ds.channel_stats()
    stream = BatchStream(ds.train_images, ds.train_labels, batch_size, seed=0,
                         normalizer=Normalizer(mean, std, torch.device("cpu")))

    t0 = time.perf_counter()
    for t in range(stream.steps_per_epoch):
        x, y = stream.batch(t)
    ours = time.perf_counter() - t0

    class PerImage(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.images = ds.train_images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision's CIFAR
            self.labels = ds.train_labels.tolist()
            self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                        T.Normalize(mean.tolist(), std.tolist())])

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int):
            return self.transform(Image.fromarray(np.ascontiguousarray(self.images[i]))), self.labels[i]

    loader = torch.utils.data.DataLoader(PerImage(), batch_size=batch_size, shuffle=True, num_workers=0,
                                         drop_last=True)
    t0 = time.perf_counter()
    for x_ref, y_ref in loader:
        pass
    reference = time.perf_counter() - t0
    if x.shape != x_ref.shape:  # the two loaders must time the same work
        raise RuntimeError(f"the loaders' batches differ in shape: {tuple(x.shape)} vs {tuple(x_ref.shape)}")
    n = stream.steps_per_epoch * batch_size
    click.echo(f"one epoch of {dataset} ({ds.description}): {stream.steps_per_epoch} batches of {batch_size}, "
               f"random crop (pad 4) + flip + normalise, CPU, {threads} thread(s)")
    click.echo(f"  device-resident batch loader        {ours:8.2f} s  {n / ours:10.0f} img/s")
    click.echo(f"  torchvision per-image, 0 workers    {reference:8.2f} s  {n / reference:10.0f} img/s")
    click.echo(f"  speedup {reference / ours:.1f}x (target >= 20x)")


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
            check_config(cfg)
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
    from .models import build_model

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


MEMORY_CONFIGS = (("bp", None), ("fdg", "legacy"), ("fdg", "stash"), ("fdg", "replay"), ("ddg", "legacy"),
                  ("ddg", "stash"), ("fr", None), ("dgl", None), ("dni", None))


def bench_memory(model: str, splits: int, batch_size: int, threads: int | None) -> None:
    """Per stage, for BP and each method and staleness mode: the bytes
    measured in real iterations on the CPU (sequential engine, synthetic
    data, saved-tensor hooks until the pipeline has filled) beside the
    estimate the start-of-run guard uses (memory.estimate), and their ratio."""
    import gc

    from .memory import MiB, estimate

    data = synthetic_dataset(10, train=batch_size * 2, test=batch_size)
    image_shape = tuple(data.train_images.shape[1:])
    click.echo(f"{model}, K={splits}, batch {batch_size}, CPU, synthetic data: MiB per stage, measured / expected "
               f"= ratio (xN = batches whose graph the stage holds at its peak)")
    click.echo("measured: storages autograd saved for the backward (each once) + inputs/outputs + what the mode "
               "keeps, at the peak over the pipeline's fill and 2 more iterations, + weights, grads, optimizer state")
    click.echo("expected: (bytes one batch keeps, fitted on batches 2 and 4) x batches held (from the schedule) "
               "+ state; the guard budgets 1.35x this for backward buffers and the allocator")
    header = f"{'method':<12}" + "".join(f"{'stage ' + str(k):>30}" for k in range(splits)) + f"{'total':>24}"
    click.echo(header)
    for method, staleness in MEMORY_CONFIGS:
        cfg = RunConfig(method=method, method_options={"staleness": staleness} if staleness else {}, model=model,
                        splits=splits, dataset="synthetic", batch_size=batch_size, threads=threads)
        expected = estimate(cfg, image_shape, 10)
        trainer = build_run(cfg, dataset=data)
        for t in range(trainer.hold_span + 3):
            trainer.memory.watch(t)
            trainer.engine.run_iteration(t)
        measured = trainer.memory.record()
        del trainer
        gc.collect()
        cells, total_m, total_e = [], 0.0, 0.0
        for e in expected:
            m, x = measured[f"stage{e.index}_memory_bytes"], e.peak_bytes(batch_size)
            total_m, total_e = total_m + m, total_e + x
            cells.append(f"{m / MiB:9.1f} / {x / MiB:9.1f} = {m / x:4.2f} x{e.batches()}")
        label = method + (f" {staleness}" if staleness else "")
        click.echo(f"{label:<12}" + "".join(f"{c:>30}" for c in cells)
                   + f"{total_m / MiB:>10.1f} / {total_e / MiB:>9.1f}")


# -- profiles, the link, and the speedup benchmark ----------------------------------------------

PROFILE_DIR = "results/profiles"


def profile_path(model: str, batch_size: int, device: str, threads: int) -> Path:
    return Path(PROFILE_DIR) / f"{model}-b{batch_size}-{device.replace(':', '')}-t{threads}.json"


def profile_blocks(model: str, batch_size: int, device: str, threads: int, iterations: int = 5) -> dict[str, Any]:
    """Every block's forward, backward and update seconds (medians over
    ``iterations`` after two warm-up iterations), measured by running BP with
    one block per stage on the sequential engine with ``threads`` threads;
    plus each block's output size. Restores this process's thread count."""
    from .engines.simulate import summarize_spans
    from .engines.trace import Tracer
    from .models import build_model

    with torch.device("meta"):
        num_blocks = len(build_model(model))
    data = synthetic_dataset(10, train=batch_size * 2, test=batch_size)
    cfg = RunConfig(method="bp", model=model, splits=num_blocks, partition="uniform", dataset="synthetic",
                    batch_size=batch_size, device=device, threads=threads)
    saved_threads = torch.get_num_threads()
    try:
        tracer = Tracer()
        trainer = build_run(cfg, dataset=data, tracer=tracer)
        for t in range(2 + iterations):
            if t == 2:
                trainer.sync_compute()
                tracer.start(trainer.devices)
            trainer.engine.run_iteration(t)
        trainer.sync_compute()
    finally:
        torch.set_num_threads(saved_threads)
    med = summarize_spans(tracer.spans)
    blocks = [{"name": name, "forward_s": med[(i, "forward")], "backward_s": med[(i, "backward")],
               "update_s": med.get((i, "update"), 0.0),
               "output_bytes": 4 * batch_size * math.prod(trainer.output_shapes[i])}
              for i, name in enumerate(trainer.block_names)]
    params = sum(p.numel() for s in trainer.stages for p in s.parameters())
    return {"model": model, "batch_size": batch_size, "device": device, "threads": threads,
            "iterations": iterations, "parameter_bytes": 4 * params, "blocks": blocks,
            "measured": "sequential engine, BP with one block per stage; medians per action",
            "env": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "hostname": socket.gethostname()}}


def load_or_profile(model: str, batch_size: int, device: str, threads: int, refresh: bool = False) -> dict[str, Any]:
    from .models import build_model

    with torch.device("meta"):
        build_model(model)  # an unknown name fails here, before "profiling ..." is announced
    path = profile_path(model, batch_size, device, threads)
    if path.is_file() and not refresh:
        return json.loads(path.read_text())
    click.echo(f"profiling {model} (batch {batch_size}, {device}, {threads} thread(s)) -> {path}", err=True)
    profile = profile_blocks(model, batch_size, device, threads)
    profile["link"] = measure_link(device, max(b["output_bytes"] for b in profile["blocks"][:-1] or profile["blocks"]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile, indent=1) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the profile {path}: {exc.strerror or exc}") from None
    return profile


def _timed_solo_steps(rank: int, model: str, batch_size: int, threads: int, iterations: int) -> float:
    """One rank's seconds per unsplit BP iteration, started together with its
    peers (a barrier), so k ranks time the same work while sharing the CPU."""
    import torch.distributed as dist

    cfg = RunConfig(method="bp", model=model, splits=1, dataset="synthetic", batch_size=batch_size, threads=threads)
    trainer = build_run(cfg, dataset=synthetic_dataset(10, train=batch_size * 4, test=batch_size))
    for t in range(2):
        trainer.engine.run_iteration(t)
    dist.barrier()
    t0 = time.perf_counter()
    for t in range(2, 2 + iterations):
        trainer.engine.run_iteration(t)
    dist.barrier()  # until the last rank is done: one that finished early stops competing for the CPU
    return (time.perf_counter() - t0) / iterations


def corun_factor(model: str, batch_size: int, threads: int, ranks: int, iterations: int = 6) -> float:
    """How much slower a rank computes while ``ranks`` processes (``threads``
    threads each) share this CPU than alone: the caches, memory bandwidth and
    cores they share, which a block profile taken by one process alone does
    not see. Measured on the unsplit model, alone and then together."""
    from .engines.launch import spawn_ranks

    alone = spawn_ranks(1, torch.device("cpu"), _timed_solo_steps, (model, batch_size, threads, iterations))[0]
    together = spawn_ranks(ranks, torch.device("cpu"), _timed_solo_steps, (model, batch_size, threads, iterations))
    return statistics.mean(together) / alone


def corun_factors(profile: dict[str, Any], path: Path, splits: list[int]) -> dict[int, float]:
    """The co-run factor of each K (1.0 on GPUs, where each rank has its own
    device), measured once per K and kept in the profile file."""
    if profile["device"] != "cpu":
        return {k: 1.0 for k in splits}
    saved = profile.setdefault("corun", {})
    missing = [k for k in splits if k > 1 and str(k) not in saved]
    for k in missing:
        click.echo(f"measuring the co-run factor of {k} ranks x {profile['threads']} thread(s) -> {path}", err=True)
        saved[str(k)] = corun_factor(profile["model"], profile["batch_size"], profile["threads"], k)
    if missing:
        try:
            path.write_text(json.dumps(profile, indent=1) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write the profile {path}: {exc.strerror or exc}") from None
    return {k: saved.get(str(k), 1.0) for k in splits}


def scaled_blocks(blocks: list[dict], factor: float) -> list[dict]:
    """Blocks whose compute takes ``factor`` times as long (sizes unchanged)."""
    keys = ("forward_s", "backward_s", "update_s")
    return [{**b, **{key: b[key] * factor for key in keys}} for b in blocks]


def _pingpong(rank: int, sizes: list[int], repeats: int, device: str) -> list[float]:
    import torch.distributed as dist

    # On GPUs the rank's device is current (launch.init_process_group) and NCCL's
    # send/recv return before the transfer is done: the clock stops after the
    # compute stream, which waits for the receive, has caught up.
    on_gpu = torch.device(device).type == "cuda"
    out = []
    for nbytes in sizes:
        buf = torch.zeros(max(1, nbytes // 4), device=device)
        times = []
        for _ in range(repeats + 2):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if on_gpu:
                torch.cuda.current_stream().synchronize()
            times.append((time.perf_counter() - t0) / 2)
        out.append(statistics.median(times[2:]))
    return out


def measure_link(device: str, nbytes: int, repeats: int = 20) -> dict[str, float]:
    """One-way time of a 4-byte and an ``nbytes`` message between two ranks
    on this machine (torch.distributed send/recv): latency and bandwidth."""
    from .engines.launch import spawn_ranks

    small, large = spawn_ranks(2, torch.device(device), _pingpong, ([4, nbytes], repeats, device))[0]
    return {"latency_s": small, "bandwidth_Bps": nbytes / max(large - small, 1e-9), "probe_bytes": nbytes,
            "measured": f"median one-way send/recv over {repeats} round trips, 2 local ranks"}


def _timed_rank(rank: int, cfg: RunConfig, train_size: int, warmup: int, iterations: int) -> dict[str, Any]:
    """One rank of a speedup measurement: warm up (fill the pipeline), then
    time ``iterations`` iterations from a common start to the moment every
    rank has finished and drained (the last barrier)."""
    import torch.distributed as dist

    from .engines.trace import Tracer

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


def _timed_sequential(cfg: RunConfig, train_size: int, warmup: int, iterations: int) -> float:
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


def bench_speedup(model: str, splits: list[int], methods: list[str], batch_size: int, iterations: int,
                  partition: str, device: str, threads_per_stage: int, all_threads: int, amp: str = "off",
                  channels_last: bool = False, save: Path | None = None, reuse_profile: bool = False) -> None:
    """Throughput of each method on K ranks (one per stage, ``threads_per_stage``
    threads each) against BP on one worker with as many threads per worker,
    and BP with ``all_threads`` threads, in one invocation; beside each, the
    simulator's prediction from this machine's block profile and link."""
    from .engines.launch import spawn_ranks
    from .engines.simulate import Link, has_auxiliary_nets, simulate, simulate_data_parallel, stage_costs
    from .method import make_method
    from .partition import ALIASES, Partition, balanced_starts

    parse_device(device)
    train_size = batch_size * 8
    # Profiled afresh by default: a profile kept from another time (another load on
    # the machine, another build) is not "measured side by side" with these rows.
    profile = load_or_profile(model, batch_size, device, threads_per_stage, refresh=not reuse_profile)
    link = Link(profile["link"]["latency_s"], profile["link"]["bandwidth_Bps"])
    blocks = profile["blocks"]
    base = dict(model=model, dataset="synthetic", batch_size=batch_size, device=device, amp=amp,
                channels_last=channels_last)
    profiled = amp == "off" and not channels_last  # the block profile is fp32, default layout

    # K ranks on one CPU compute slower than the one process the profile timed (co-run factor).
    factors = corun_factors(profile, profile_path(model, batch_size, device, threads_per_stage), splits) \
        if profiled else {}

    def predicted(method_name: str, k: int, starts: list[int]) -> float | None:
        if not profiled:
            return None
        method = make_method(method_name)
        costs = scaled_blocks(blocks, factors.get(k, 1.0))
        if method.data_parallel:
            whole = stage_costs(costs, [range(len(costs))])[0]
            return simulate_data_parallel(whole, k, profile["parameter_bytes"], link).iteration_s
        ranges = Partition(tuple(starts), len(costs), "").ranges()
        return simulate(method, stage_costs(costs, ranges), link).iteration_s

    rows = []
    warm = 4
    bp1 = _timed_sequential(RunConfig(method="bp", splits=1, threads=threads_per_stage, **base), train_size, warm,
                            iterations) / iterations
    rows.append(("bp", 1, f"1 x {threads_per_stage}", bp1, predicted("bp", 1, [0]), None, "-"))
    bp_all = _timed_sequential(RunConfig(method="bp", splits=1, threads=all_threads, **base), train_size, warm,
                               iterations) / iterations
    rows.append(("bp", 1, f"1 x {all_threads}", bp_all, None, None, "-"))
    costs = [b["forward_s"] + b["backward_s"] + b["update_s"] for b in blocks]
    for k in splits:
        # "balanced": cut where the block profile (the real batch, threads and engine) balances the
        # stages; `run --partition balanced` times blocks in isolation instead, a rougher guide.
        split_at = None
        if ALIASES.get(partition, partition) == "time" and k <= len(blocks):
            split_at = tuple(str(i) for i in balanced_starts(costs, k)[1:])
        for name in methods:
            cuts = None if make_method(name).data_parallel else split_at  # replicas: nothing to cut
            cfg = RunConfig(method=name, splits=k, partition="explicit" if cuts else partition, split_at=cuts,
                            threads=threads_per_stage, engine="distributed", **base)
            check_config(cfg)
            results = spawn_ranks(k, torch.device(device), _timed_rank, (cfg, train_size, 2 * k + warm, iterations))
            per_iter = max(r["elapsed"] for r in results) / iterations
            busy = [r["busy"] for r in results]
            balance = max(busy) / statistics.mean(busy)
            rows.append((name, k, f"{k} x {threads_per_stage}", per_iter, predicted(name, k, results[0]["starts"]),
                         balance, results[0]["partition"]))
    click.echo(f"{model}, batch {batch_size}, {device}, {iterations} timed iterations per row after warm-up "
               f"(pipeline filled); synthetic data drawn by the same batch loader; one invocation")
    click.echo(f"{'method':<6} {'K':>2} {'workers x threads':>17} {'ms/iter':>8} {'img/s':>7} "
               f"{'vs BP 1x' + str(threads_per_stage):>9} {'vs BP 1x' + str(all_threads):>9} "
               f"{'balance':>7} {'sim ms':>7} {'sim/meas':>8}  partition")
    starred = False
    for name, k, workers, per_iter, pred, balance, part in rows:
        star = profiled and k > 1 and has_auxiliary_nets(make_method(name), k)
        starred |= star
        pred_text = (f"{1000 * pred:6.0f}{'*' if star else ' '} {pred / per_iter:8.2f}" if pred
                     else f"{'-':>7} {'-':>8}")
        bal = f"{balance:7.2f}" if balance else f"{'-':>7}"
        click.echo(f"{name:<6} {k:>2} {workers:>17} {1000 * per_iter:8.0f} {batch_size / per_iter:7.0f} "
                   f"{bp1 / per_iter:8.2f}x {bp_all / per_iter:8.2f}x {bal} {pred_text}  {part}")
    click.echo(f"partition {partition}{' (cut by the block profile)' if ALIASES.get(partition) == 'time' else ''}; "
               "balance = slowest rank's compute time / mean (1.00 = even); sim = the timeline simulator's "
               f"prediction from the block profile ({profile_path(model, batch_size, device, threads_per_stage)}), "
               f"the measured link ({link.latency_s * 1e6:.0f} us, {link.bandwidth_Bps / 1e9:.2f} GB/s)"
               + (", and the co-run factor (each rank's compute while K ranks share the CPU / alone): "
                  + ", ".join(f"K={k} {f:.2f}x" for k, f in factors.items()) if factors else ""))
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
    from .report.tables import speed_key
    from .runs import write_atomically

    speeds = {speed_key("bp", 1): next(per_iter for name, k, workers, per_iter, *_ in rows
                                       if name == "bp" and workers == f"1 x {all_threads}")}
    speeds.update({speed_key(name, k): per_iter for name, k, _, per_iter, *_ in rows if k > 1})
    record = {"model": model, "batch_size": batch_size, "device": device, "amp": amp, "channels_last": channels_last,
              "hardware": f"{_cpu_name()}, {os.cpu_count()} cores" if device == "cpu"
                          else torch.cuda.get_device_name(device),
              "workers": f"bp: 1 process x {all_threads} threads; others: K ranks x {threads_per_stage} thread(s)",
              "seconds_per_iteration": speeds, "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    click.echo(f"saved {path}")


@dataclass
class GridPoint:
    """One method at one K in the simulator's grid."""

    prediction: Any  # engines.simulate.Prediction
    speedup: float  # over BP on one worker
    balance: float | None  # slowest stage / mean (None for data-parallel)
    starred: bool  # auxiliary nets not costed


def simulate_grid(model: str, splits: list[int], methods: list[str], batch_size: int, device: str, threads: int,
                  bandwidth_gbps: float | None = None, latency_us: float | None = None, refresh: bool = False):
    """Per method, the simulator's prediction at each K (None where K exceeds
    the blocks), stages balanced by the block profile; with the profile and
    link used."""
    from .engines.simulate import Link, has_auxiliary_nets, simulate, simulate_data_parallel, stage_costs
    from .method import make_method
    from .partition import Partition, balance, balanced_starts

    profile = load_or_profile(model, batch_size, device, threads, refresh=refresh)
    blocks = profile["blocks"]
    measured = profile["link"]
    link = Link(measured["latency_s"] if latency_us is None else latency_us * 1e-6,
                measured["bandwidth_Bps"] if bandwidth_gbps is None else bandwidth_gbps * 1e9)
    costs = [b["forward_s"] + b["backward_s"] + b["update_s"] for b in blocks]
    whole = stage_costs(blocks, [range(len(blocks))])[0]
    bp_one = whole.forward + whole.backward + whole.update
    grid: dict[str, list[GridPoint | None]] = {name: [] for name in methods}
    for k in splits:
        partition = Partition(balanced_starts(costs, k), len(blocks), "time") if k <= len(blocks) else None
        for name in methods:
            method = make_method(name)
            if partition is None:
                grid[name].append(None)
            elif method.data_parallel:
                pred = simulate_data_parallel(whole, k, profile["parameter_bytes"], link)
                grid[name].append(GridPoint(pred, bp_one / pred.iteration_s, None, False))
            else:
                pred = simulate(method, stage_costs(blocks, partition.ranges()), link)
                grid[name].append(GridPoint(pred, bp_one / pred.iteration_s, balance(costs, partition),
                                            has_auxiliary_nets(method, k)))
    return grid, profile, link, bp_one


def predicted_speedups(model: str, splits: list[int], methods: list[str], batch_size: int, device: str,
                       threads: int) -> dict[str, list[float | None]]:
    grid = simulate_grid(model, splits, methods, batch_size, device, threads)[0]
    return {name: [p.speedup if p else None for p in points] for name, points in grid.items()}


def bench_simulate(model: str, splits: list[int], methods: list[str], batch_size: int, device: str, threads: int,
                   bandwidth_gbps: float | None, latency_us: float | None, reprofile: bool,
                   gantt: Path | None) -> None:
    """Predicted speedups over BP on one worker, per method and K, with stages
    balanced by the profile's measured block times."""
    from .report.gantt import draw_gantt

    grid, profile, link, bp_one = simulate_grid(model, splits, methods, batch_size, device, threads, bandwidth_gbps,
                                                latency_us, reprofile)
    blocks = profile["blocks"]
    click.echo(f"{model}, batch {batch_size}: block profile {profile_path(model, batch_size, device, threads)} "
               f"({device}, {threads} thread(s) per worker); BP on one worker {1000 * bp_one:.0f} ms/iter; link "
               f"{link.latency_s * 1e6:.0f} us + {link.bandwidth_Bps / 1e9:.2f} GB/s"
               f"{'' if bandwidth_gbps is None and latency_us is None else ' (given)'}")
    click.echo(f"{'K':>3} {'method':<6} {'ms/iter':>8} {'speedup':>8} {'util min/mean':>14} {'balance':>8}")
    drawn = starred = False
    for i, k in enumerate(splits):
        if k > len(blocks):
            click.echo(f"{k:>3} {model} has {len(blocks)} blocks, so K={k} is not possible (no row)")
            continue
        for name in methods:
            point = grid[name][i]
            pred = point.prediction
            util = f"{min(pred.utilisation):.2f}/{statistics.mean(pred.utilisation):.2f}"
            star = "*" if point.starred else " "
            starred |= point.starred
            bal = "-" if point.balance is None else f"{point.balance:8.2f}"
            click.echo(f"{k:>3} {name:<6} {1000 * pred.iteration_s:8.0f} {point.speedup:7.2f}x{star}"
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


def estimate_sweep_seconds(configs: list[RunConfig], data_dir: str = "data") -> float:
    """Seconds the runs will take here: each model's BP iteration time (3
    timed iterations after one warm-up, synthetic data at the run's batch and
    device) times each run's iterations. Evaluation is not counted."""
    from .data import load_dataset

    per_iteration: dict[tuple, float] = {}
    total = 0.0
    for cfg in configs:
        key = (cfg.model, cfg.batch_size, cfg.device, cfg.dataset)
        if key not in per_iteration:
            probe = RunConfig(method="bp", model=cfg.model, splits=1, dataset="synthetic", batch_size=cfg.batch_size,
                              device=cfg.device, threads=cfg.threads)
            per_iteration[key] = _timed_sequential(probe, cfg.batch_size * 2, 1, 3) / 3
        train_images = cfg.train_subset or (50000 if cfg.dataset.startswith("cifar") else
                                            len(load_dataset(cfg.dataset, data_dir).train_labels))
        steps = cfg.epochs * (train_images // cfg.batch_size)
        total += per_iteration[key] * min(steps, cfg.max_steps or steps)
    return total
