"""Starting the ranks of a distributed run, and stopping all of them when one
fails.

Two ways in: under ``torchrun`` (its environment names the rank, world size
and rendezvous; multi-node works by torchrun's own flags) or spawned here,
one process per rank on this machine, rendezvous through a temporary file.
In the spawned case this process watches the ranks: when one dies or raises,
the others get ``GRACE_S`` seconds to notice (a peer's closed socket makes
their pending receives fail) and are then terminated, and the failure comes
back as one line naming the rank and the cause. The ranks also die with
this process however it dies (``_die_with_parent``): orphaned ranks would
train on and collide with a rerun.
"""
from __future__ import annotations

import ctypes
import multiprocessing.connection
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import DivergedError, UserError, WorkerFailedError

GRACE_S = 10.0  # after the first failure, how long the other ranks get to exit on their own
TIMEOUT_ENV = "FDGBENCH_DIST_TIMEOUT"  # seconds a collective or receive may wait (default 600)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PARENT_POLL_S = 1.0  # how often a spawned rank checks that its parent is alive
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def threads_per_rank(world_size: int) -> int:
    """Intra-op threads for one rank when the user set none: the node's cores
    shared among the ranks on it (torchrun's LOCAL_WORLD_SIZE, else all of
    ``world_size``, spawned on this node)."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, (os.cpu_count() or 1) // max(1, ranks_here))


def backend_for(device: torch.device) -> str:
    """gloo on CPUs. On GPUs, NCCL for CUDA tensors and gloo beside it for CPU
    tensors: the object collectives (``broadcast_object_list``,
    ``all_gather_object``: rank 0's decisions, gathered meters and traces)
    then run on the CPU instead of staging pickles through GPU memory on a
    device NCCL would have to guess."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def check_ranks_fit(device: torch.device, ranks_on_node: int, gpus_on_node: int) -> None:
    """NCCL cannot run two ranks on one GPU: refuse before starting, instead
    of failing at the first collective with a misleading lost-contact error."""
    if device.type == "cuda" and ranks_on_node > gpus_on_node:
        raise UserError(f"the distributed engine needs one GPU per rank: {ranks_on_node} ranks on this node, "
                        f"{gpus_on_node} GPU(s); use fewer stages (-K), a node with more GPUs, or the sequential "
                        f"engine with --stage-devices (e.g. {','.join(['cuda:0'] * ranks_on_node)})")


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Rank r's device: the requested CPU, or GPU number ``local_rank``
    (check_ranks_fit has made sure there is one), made the current device."""
    if device.type != "cuda":
        return device
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def dist_timeout() -> timedelta:
    """How long a collective or receive may wait (``FDGBENCH_DIST_TIMEOUT``
    seconds, default 600); anything but a positive finite number is bad input."""
    text = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds < float("inf")):
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds, got '{text}'")
    return timedelta(seconds=seconds)


def init_process_group(device: torch.device, local_rank: int, rank: int | None = None,
                       world_size: int | None = None, init_file: str | None = None) -> torch.device:
    """Join the run's process group; returns this rank's device.

    On GPUs the rank's device is made current *before* the group exists and
    is bound to it (``device_id``): NCCL's collectives use the current device,
    so a group created first would put every local rank on cuda:0 ("Duplicate
    GPU detected")."""
    device = rank_device(device, local_rank)
    kwargs: dict[str, Any] = {"backend": backend_for(device), "timeout": dist_timeout()}
    if device.type == "cuda":
        kwargs["device_id"] = device
    if init_file is not None:
        kwargs.update(init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    dist.init_process_group(**kwargs)
    return device


def is_communication_error(exc: BaseException) -> bool:
    """A failure caused by a peer going away (secondary), not by this rank."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "nccl", "connection closed",
                                                                     "connection reset", "broken pipe"))


def spawn_ranks(world_size: int, device: torch.device, target: Callable[..., Any], args: tuple = ()) -> list[Any]:
    """Run ``target(rank, *args)`` in ``world_size`` spawned processes that
    form one process group; returns each rank's return value. A failure in any
    rank stops them all and raises UserError / DivergedError (when that is
    what the rank raised) or WorkerFailedError."""
    check_ranks_fit(device, world_size, torch.cuda.device_count() if device.type == "cuda" else 0)
    ctx = torch.multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="fdgbench-rdzv-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_entry, args=(r, world_size, str(device), init_file, reports, target, args,
                                                       os.getpid()), name=f"fdgbench-rank{r}")
                 for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            results, errors, hung = _watch(procs, reports)
        except BaseException:
            _stop(procs)
            raise
    if errors or any(p.exitcode != 0 for p in procs):
        raise _failure(procs, errors, hung)
    return [results[r] for r in range(world_size)]


def _rank_entry(rank: int, world_size: int, device: str, init_file: str, reports, target, args,
                parent_pid: int) -> None:
    # Ctrl-C and a closed terminal are the parent's to handle: it stops the ranks.
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    try:
        init_process_group(torch.device(device), rank, rank, world_size, init_file)
        result = target(rank, *args)
        dist.destroy_process_group()
        report, status = (rank, "ok", result), 0
    except BaseException as exc:  # reported to the parent as one line; the traceback only on request
        detail = traceback.format_exc() if os.environ.get("FDGBENCH_DEBUG") else None
        # no process-group teardown on this path: it can block on a dead peer
        report, status = (rank, "error", (type(exc).__name__, _first_line(exc), is_communication_error(exc), detail)), 1
    reports.put(report)
    reports.close()
    reports.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    # Straight out, past the interpreter's and the C++ libraries' teardown:
    # the rank's work is done and reported, and a native thread still joinable
    # at static destruction aborts the process ("terminate called without an
    # active exception", seen once in CI from a rank that had finished).
    os._exit(status)


def set_parent_death_signal(signum: int) -> bool:
    """Have the kernel send this process ``signum`` when its parent dies
    (Linux's prctl PR_SET_PDEATHSIG); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum) == 0
    except (OSError, AttributeError):
        return False  # no usable libc


def _die_with_parent(parent_pid: int) -> None:
    """End this rank when the process that spawned it dies. A parent that
    exits normally or by a signal it can handle stops its ranks itself
    (``_stop``); one killed by SIGKILL cannot. On Linux the kernel then sends
    this process SIGKILL (prctl PR_SET_PDEATHSIG; it fires when the spawning
    thread ends, and spawn_ranks' thread lives until the ranks end); elsewhere,
    and as a backstop, a thread polls the parent pid, which changes (to the
    reaper's) once the parent is gone."""
    set_parent_death_signal(signal.SIGKILL)  # where it works; the watchdog below does the job elsewhere

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # no teardown: the peers and the parent are gone or going

    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=watch, name="fdgbench-parent-watch", daemon=True).start()


def _watch(procs, reports) -> tuple[dict[int, Any], dict[int, tuple], list[int]]:
    """Wait for every rank; after the first failure give the others GRACE_S
    seconds, then stop them. Returns the results, the errors and the ranks
    still running when the grace period ended (hung, or stopped by a signal)."""
    results: dict[int, Any] = {}
    errors: dict[int, tuple] = {}
    hung: list[int] = []
    failed_at = None
    while True:
        _drain(reports, results, errors)
        if all(p.exitcode is not None for p in procs):
            break
        if failed_at is None and (errors or any(p.exitcode not in (None, 0) for p in procs)):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            hung = [r for r, p in enumerate(procs) if p.exitcode is None]
            _stop(procs)
            break
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.2)
    time.sleep(0.1)  # the last reports may still be in the queue's pipe
    _drain(reports, results, errors)
    return results, errors, hung


def _drain(reports, results: dict[int, Any], errors: dict[int, tuple]) -> None:
    try:
        while True:
            rank, kind, payload = reports.get_nowait()
            (results if kind == "ok" else errors)[rank] = payload
    except queue.Empty:
        pass


def _stop(procs) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _failure(procs, errors: dict[int, tuple], hung: list[int]) -> Exception:
    """The root cause: an error a rank raised itself, else a rank that died
    without a word, else a rank that hung while its peers timed out waiting
    for it, else the first lost-contact report."""
    own = {r: e for r, e in errors.items() if not e[2]}
    if own:
        rank = min(own)
        name, message, _, detail = own[rank]
        if detail:
            print(detail, flush=True)
        if name == "UserError":
            return UserError(message)
        if name == "DivergedError":
            return DivergedError(message)
        return WorkerFailedError(f"rank {rank} raised {name}: {message}")
    silent = [(r, p.exitcode) for r, p in enumerate(procs)
              if p.exitcode not in (0, None) and r not in errors and r not in hung]
    if silent:
        rank, code = silent[0]
        cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return WorkerFailedError(f"rank {rank} died ({cause}); the other ranks were stopped")
    silent_hung = [r for r in hung if r not in errors]
    if silent_hung:
        waited = os.environ.get(TIMEOUT_ENV, "600")
        return WorkerFailedError(f"rank {silent_hung[0]} stopped responding (its peers waited {waited} s, "
                                 f"{TIMEOUT_ENV}); every rank was stopped")
    if errors:
        rank = min(errors)
        name, message, _, _ = errors[rank]
        return lost_contact(rank, name, message)
    return WorkerFailedError("a rank was stopped before reporting")


def lost_contact(rank: int, name: str, message: str) -> WorkerFailedError:
    """The one line for a rank whose peer went away (died, was killed, or stopped responding)."""
    return WorkerFailedError(f"rank {rank} lost contact with a peer: {name}: {message}")


def lost_contact_of(rank: int, exc: BaseException) -> WorkerFailedError:
    return lost_contact(rank, type(exc).__name__, _first_line(exc))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:400]
