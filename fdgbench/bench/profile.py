"""Block profiles (each block's forward and backward time, measured once and saved), the co-run factor and the link between ranks: what the simulator predicts from."""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from ..data import synthetic_dataset
from ..errors import UserError
from ..config import RunConfig
from ..train import build_run




PROFILE_DIR = "results/profiles"


def profile_path(model: str, batch_size: int, device: str, threads: int) -> Path:
    return Path(PROFILE_DIR) / f"{model}-b{batch_size}-{device.replace(':', '')}-t{threads}.json"


def profile_blocks(model: str, batch_size: int, device: str, threads: int, iterations: int = 5) -> dict[str, Any]:
    """Every block's forward, backward and update seconds (medians over
    ``iterations`` after two warm-up iterations), measured by running BP with
    one block per stage on the sequential engine with ``threads`` threads;
    plus each block's output size. Restores this process's thread count."""
    from ..engines.simulate import summarize_spans
    from ..engines.trace import Tracer
    from ..models import build_model

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
               "output_bytes": 4 * batch_size * math.prod(trainer.output_shapes[i]),
               "parameter_bytes": 4 * sum(p.numel() for p in trainer.stages[i].parameters())}
              for i, name in enumerate(trainer.block_names)]
    return {"model": model, "batch_size": batch_size, "device": device, "threads": threads,
            "iterations": iterations, "blocks": blocks,
            "measured": "sequential engine, BP with one block per stage; medians per action",
            "env": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "hostname": socket.gethostname()}}


def load_or_profile(model: str, batch_size: int, device: str, threads: int, refresh: bool = False) -> dict[str, Any]:
    from ..models import build_model

    with torch.device("meta"):
        build_model(model)  # an unknown name fails here, before "profiling ..." is announced
    path = profile_path(model, batch_size, device, threads)
    if path.is_file() and not refresh:
        saved = json.loads(path.read_text())
        if all("parameter_bytes" in b for b in saved["blocks"]):  # older profiles lack what replicas all-reduce
            return saved
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
    from ..engines.launch import spawn_ranks

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
    from ..engines.launch import spawn_ranks

    small, large = spawn_ranks(2, torch.device(device), _pingpong, ([4, nbytes], repeats, device))[0]
    return {"latency_s": small, "bandwidth_Bps": nbytes / max(large - small, 1e-9), "probe_bytes": nbytes,
            "measured": f"median one-way send/recv over {repeats} round trips, 2 local ranks"}
