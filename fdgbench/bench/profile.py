"""Block profiles (each block's forward and backward time, measured once and saved), the co-run factor and the link between ranks: what the simulator predicts from."""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import click
import torch

from ..data import synthetic_dataset
from ..errors import UserError
from ..config import RunConfig
from ..runs import write_atomically
from ..train import build_run




PROFILE_DIR = "results/profiles"
# What each block of a profile must hold: a finite number, positive or (where
# a block may legitimately have none) non-negative. A block without
# parameters has no update span (profile_blocks records 0) and no parameter bytes.
BLOCK_FIELDS = {"forward_s": True, "backward_s": True, "update_s": False, "output_bytes": True,
                "parameter_bytes": False}
# The fastest plausible one-way link between two ranks on one machine. On a
# CPU the ranks copy through shared memory, bounded by memory bandwidth (tens
# to a few hundred GB/s); between two GPUs NVLink 4 (H100) carries 450 GB/s
# each way. A probe that says more than 1 TB/s timed noise, not the link.
MAX_LINK_BPS = 1e12
# Where the 4-byte and the large message take nearly the same time, their
# difference is noise; the probe grows the message by this factor, up to this
# size (64 MiB: well past any link's latency x bandwidth, and quick to send).
LINK_PROBE_GROWTH = 8
LINK_PROBE_MAX_BYTES = 64 * 2**20


def profile_path(model: str, batch_size: int, device: str, threads: int) -> Path:
    return Path(PROFILE_DIR) / f"{model}-b{batch_size}-{device.replace(':', '')}-t{threads}.json"


def model_block_names(model: str) -> list[str]:
    """The model's block names, from a weightless (meta) model: instant, and
    an unknown name fails here, before anything is measured."""
    from ..models import build_model

    with torch.device("meta"):
        return list(build_model(model).block_names)


def profile_blocks(model: str, batch_size: int, device: str, threads: int, iterations: int = 5) -> dict[str, Any]:
    """Every block's forward, backward and update seconds (medians over
    ``iterations`` after two warm-up iterations), measured by running BP with
    one block per stage on the sequential engine with ``threads`` threads;
    plus each block's output size. Restores this process's thread count."""
    from ..simulator import summarize_spans
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
    """The block profile (and link) of ``model`` at this batch, device and
    thread count: the saved one if it is sound and this model's, else
    measured now and saved."""
    names = model_block_names(model)  # an unknown name fails here, before "profiling ..." is announced
    path = profile_path(model, batch_size, device, threads)
    expected = {"model": model, "batch_size": batch_size, "device": device, "threads": threads}
    profile = None if refresh else read_profile(path, expected, names)
    if profile is None:
        click.echo(f"profiling {model} (batch {batch_size}, {device}, {threads} thread(s)) -> {path}", err=True)
        profile = profile_blocks(model, batch_size, device, threads)
        save_profile(path, profile)  # before the link probe, which may refuse: the blocks are not measured again
    if "link" not in profile:
        largest = max(b["output_bytes"] for b in profile["blocks"][:-1] or profile["blocks"])  # the messages sent
        profile["link"] = measure_link(device, largest)
        save_profile(path, profile)
    return profile


def save_profile(path: Path, profile: dict[str, Any]) -> None:
    """Write the profile atomically: a kill mid-write leaves the old file
    or none, never half of one for the next prediction to read."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write the profile {path}: {exc.strerror or exc}") from None
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(profile, indent=1) + "\n"))


def read_profile(path: Path, expected: dict[str, Any], block_names: list[str]) -> dict[str, Any] | None:
    """The profile saved at ``path`` (without its link, to be measured
    again, where that alone is implausible), or None where there is none or
    it cannot be used: unreadable (a kill mid-write by an older version),
    another model's blocks, or values no measurement gives. This tool wrote
    it, so an unusable one is measured again, with one warning line naming
    it, rather than refused."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and undecodable bytes
        problem = f"it cannot be read ({exc})"
    else:
        problem = profile_problem(saved, expected, block_names)
    if problem:
        _warn_unusable(path, problem, "measuring the profile again")
        return None
    if "link" in saved and (problem := link_problem(saved["link"])):
        _warn_unusable(path, problem, "measuring the link again")
        del saved["link"]
    return saved


def _warn_unusable(path: Path, problem: str, action: str) -> None:
    click.echo(f"warning: ignoring the saved {path}: {problem}; {action}", err=True)


def profile_problem(saved: Any, expected: dict[str, Any], block_names: list[str]) -> str | None:
    """What makes a saved profile unusable for ``expected`` (model, batch,
    device, threads) with these blocks, or None. Its link is link_problem's."""
    if not isinstance(saved, dict) or not isinstance(saved.get("blocks"), list):
        return "it is not a block profile (no list of blocks)"
    for key, value in expected.items():
        if saved.get(key) != value:
            return f"it is for {key} {saved.get(key)!r}, not {value!r}"
    names = [b.get("name") if isinstance(b, dict) else None for b in saved["blocks"]]
    if names != block_names:  # a stale or cut-short profile would balance and predict other stages
        return (f"its {len(names)} block(s) ({', '.join(map(str, names))}) are not {expected['model']}'s "
                f"{len(block_names)} ({', '.join(block_names)})")
    for block in saved["blocks"]:
        for key, positive in BLOCK_FIELDS.items():
            if not _is_measure(block.get(key), positive):
                return f"block {block['name']}'s {key} is {_shown(block, key)}, not a {_sign(positive)} finite number"
    corun = saved.get("corun", {})
    if not isinstance(corun, dict) or not all(k.isdigit() and _is_measure(v, True) for k, v in corun.items()):
        return f"its co-run factors {corun!r} are not positive finite numbers by rank count"
    return None


def link_problem(link: Any) -> str | None:
    """What makes a measured link implausible (see MAX_LINK_BPS), or None."""
    if not isinstance(link, dict):
        return f"its link {link!r} is not a measurement"
    if not _is_measure(link.get("latency_s"), True):
        return f"its link latency_s is {_shown(link, 'latency_s')}, not a positive finite number"
    bandwidth = link.get("bandwidth_Bps")
    if not _is_measure(bandwidth, True) or bandwidth > MAX_LINK_BPS:
        shown = f"{bandwidth / 1e9:.2f} GB/s" if _is_measure(bandwidth, False) else _shown(link, "bandwidth_Bps")
        return f"its link bandwidth {shown} is implausible (not positive, or over {MAX_LINK_BPS / 1e9:.0f} GB/s)"
    return None


def _is_measure(value: Any, positive: bool) -> bool:
    """A finite number (not a bool), above zero or at least zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def _sign(positive: bool) -> str:
    return "positive" if positive else "non-negative"


def _shown(record: dict, key: str) -> str:
    return repr(record[key]) if key in record else "missing"


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


# Co-run factors are the median of this many interleaved rounds. A shared
# machine's speed drifts by tens of percent within minutes (seen on a 2-core
# Intel Xeon VM: one process's BP step went from 545 to 900 ms and back), so
# "alone" and "together" are timed next to each other, not minutes apart.
CORUN_ROUNDS = 3


def corun_factor(model: str, batch_size: int, threads: int, ranks: int, iterations: int = 6,
                 rounds: int = CORUN_ROUNDS) -> float:
    """How much slower a rank computes while ``ranks`` processes (``threads``
    threads each) share this CPU than alone: the caches, memory bandwidth and
    cores they share, which a block profile taken by one process alone does
    not see. Measured on the unsplit model in interleaved rounds (alone,
    together, alone, together, ..., alone), each together timing against the
    mean of the alone timings either side of it; the median of the ratios."""
    from ..engines.launch import spawn_ranks

    def timed(count: int) -> float:
        return statistics.mean(spawn_ranks(count, torch.device("cpu"), _timed_solo_steps,
                                           (model, batch_size, threads, iterations)))

    alone, ratios = [timed(1)], []
    for _ in range(rounds):
        together = timed(ranks)
        alone.append(timed(1))
        ratios.append(together / statistics.mean(alone[-2:]))
    return statistics.median(ratios)


def corun_factors(profile: dict[str, Any], path: Path, splits: list[int], rounds: int = CORUN_ROUNDS
                  ) -> dict[int, float]:
    """The co-run factor of each K (1.0 on GPUs, where each rank has its own
    device), measured once per K in ``rounds`` rounds and kept in the profile
    file (factors kept from another number of rounds, or from before rounds,
    are measured again)."""
    if profile["device"] != "cpu":
        return {k: 1.0 for k in splits}
    if profile.get("corun_rounds") != rounds:
        profile["corun"], profile["corun_rounds"] = {}, rounds
    saved = profile["corun"]
    missing = [k for k in splits if k > 1 and str(k) not in saved]
    for k in missing:
        click.echo(f"measuring the co-run factor of {k} ranks x {profile['threads']} thread(s) -> {path}", err=True)
        saved[str(k)] = corun_factor(profile["model"], profile["batch_size"], profile["threads"], k, rounds=rounds)
    if missing:
        save_profile(path, profile)
    return {k: saved.get(str(k), 1.0) for k in splits}


def corun_slowdown(ranks: int, factor: float) -> Callable[[int], float]:
    """simulate's ``corun`` for ``ranks`` workers whose co-run factor (all of
    them computing at once) is ``factor``: n computing at once run
    1 + (factor - 1)(n - 1)/(ranks - 1) times slower, 1 alone. Only the two
    ends are measured; the straight line between them is an assumption. A
    factor measured below 1 (two ranks faster together than alone: seen at
    0.97-0.98 on a 2-core Xeon, inside its noise) is used as measured."""
    if ranks < 2:
        return lambda n: 1.0
    return lambda n: 1.0 + (factor - 1.0) * (n - 1) / (ranks - 1)


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


def _pingpong_times(device: str, sizes: list[int], repeats: int) -> list[float]:
    """Median one-way seconds of a message of each of ``sizes`` bytes between two local ranks."""
    from ..engines.launch import spawn_ranks

    return spawn_ranks(2, torch.device(device), _pingpong, (sizes, repeats, device))[0]


def measure_link(device: str, nbytes: int, repeats: int = 20) -> dict[str, float]:
    """Latency (a 4-byte message's one-way time) and bandwidth between two
    ranks on this machine (torch.distributed send/recv): from an ``nbytes``
    message, or a larger one (LINK_PROBE_GROWTH) where that one's transfer
    does not clearly stand out of the timing noise. Refused (one line) if
    even the largest gives no plausible figure: every later prediction would
    use it silently."""
    size = nbytes
    while True:
        small, large = _pingpong_times(device, [4, size], repeats)
        link = link_from_timings(small, large, size, repeats)
        if link is not None:
            return link
        if size >= LINK_PROBE_MAX_BYTES:
            raise UserError(f"the link probe between two local ranks ({device}) gave no plausible bandwidth: "
                            f"{size} bytes took {large * 1e6:.1f} us one way, 4 bytes {small * 1e6:.1f} us; the "
                            f"machine may be too busy to time it: try again when it is quieter")
        size = min(size * LINK_PROBE_GROWTH, LINK_PROBE_MAX_BYTES)


def link_from_timings(small: float, large: float, nbytes: int, repeats: int) -> dict[str, float] | None:
    """The link from the median one-way times of a 4-byte and an ``nbytes``
    message, or None where they cannot give one. The transfer (their
    difference) must be at least the latency: then jitter of the order of
    the latency moves the bandwidth by a bounded fraction, where a near-zero
    difference would turn it into any figure at all (a stored 524288 GB/s)."""
    transfer = large - small
    if not (transfer > 0 and transfer >= small):  # (also false for NaN)
        return None
    link = {"latency_s": small, "bandwidth_Bps": nbytes / transfer, "probe_bytes": nbytes,
            "measured": f"median one-way send/recv over {repeats} round trips, 2 local ranks"}
    return None if link_problem(link) else link
