"""Checkpoints of a run in progress: written at the end of every epoch but
the last, so an interrupted run resumes where it stopped and continues
exactly as if it had not (tests/test_checkpoint.py checks that bit for bit).

A decoupled pipeline is never drained, so "where it stopped" includes the
batches in flight: each stage's held graphs (rebuilt on resume from their
inputs and forward-time weights, staleness.py), the messages sent and not
yet received, and whatever a method carries over (auxiliary nets, stored
activations, accumulating gradients). Engines and workers say what that is
(``checkpoint_state`` / ``restore_state``); this module only stores it.

Layout, under the run directory::

    checkpoint/epoch<E>/rank<r>.pt   one per process (the sequential engine is rank 0
                                     and holds every stage): stages, messages, RNG
    checkpoint/latest.json           {"epoch": E, "iteration": T, "ranks": R, "partition": ...}

Each part and the pointer carry the run's config hash (the one in the run
directory's name), checked on resume: a part or a whole checkpoint copied
from another run (another seed, another method) is refused, not resumed.

Every file is written under a temporary name and renamed (atomic on POSIX).
``latest.json`` moves to epoch E only once every rank's file for E is in
place, and epoch E-1's files are removed only after that, so a crash at any
moment leaves one complete checkpoint that the pointer names.
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .runs import name_checked, save_tensors, write_atomically

FOLDER = "checkpoint"
POINTER = "latest.json"
HASH = "config_hash"  # the key, in a part and in the pointer, of the run's config hash


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (nested dicts, lists and tuples of tensors) with every tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def rng_state(devices: list[torch.device]) -> dict[str, Any]:
    """Every generator a run might draw from (training itself draws from
    none: batches and augmentation are seeded per iteration, data.py)."""
    import numpy

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": numpy.random.get_state()}
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    if cuda:
        state["cuda"] = {i: torch.cuda.get_rng_state(i) for i in cuda}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    for index, cuda_state in state.get("cuda", {}).items():
        torch.cuda.set_rng_state(cuda_state, index)


def _folder(run_path: Path) -> Path:
    return Path(run_path) / FOLDER


def _part(run_path: Path, epoch: int, rank: int) -> Path:
    return _folder(run_path) / f"epoch{epoch}" / f"rank{rank}.pt"


def save_part(run_path: Path, epoch: int, rank: int, state: dict[str, Any]) -> None:
    """This process's state after ``epoch`` epochs."""
    save_tensors(_part(run_path, epoch, rank), state)


def publish(run_path: Path, info: dict[str, Any]) -> None:
    """Point ``latest.json`` at a checkpoint whose every part is written."""
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    write_atomically(_folder(run_path) / POINTER, lambda tmp: tmp.write_text(text))


def prune(run_path: Path, keep_epoch: int, rank: int) -> None:
    """Remove this rank's parts of checkpoints older than ``keep_epoch``
    (each rank its own: on several nodes each may write to its own disk)."""
    for folder in _folder(run_path).glob("epoch*"):
        if folder.name[5:].isdigit() and int(folder.name[5:]) < keep_epoch:
            (folder / f"rank{rank}.pt").unlink(missing_ok=True)
            try:
                folder.rmdir()  # once every rank has removed its part
            except OSError:
                pass


def remove(run_path: Path) -> None:
    """Drop every checkpoint (the run finished, or starts over)."""
    shutil.rmtree(_folder(run_path), ignore_errors=True)


def latest(run_path: Path, config_hash: str | None = None) -> dict[str, Any] | None:
    """The checkpoint a resume starts from, or None if there is none; with
    ``config_hash``, one written by the run of that config only."""
    path = _folder(run_path) / POINTER
    with name_checked(run_path):
        if not path.is_file():
            return None
    try:
        info = json.loads(path.read_text())
        int(info["epoch"]), int(info["iteration"]), int(info["ranks"])
        starts = info["partition"]["starts"]
        if not (starts and starts[0] == 0 and all(isinstance(s, int) for s in starts)
                and all(a < b for a, b in zip(starts, starts[1:]))):
            raise ValueError(f"stage starts {starts}")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"the checkpoint pointer {path} is unreadable ({exc}); --force starts the run over") from None
    if config_hash is not None:
        check_owner(path, info, config_hash)
    return info


def check_owner(path: Path, record: dict[str, Any], config_hash: str) -> None:
    """``record`` (a part or the pointer, read from ``path``) belongs to the run of ``config_hash``."""
    theirs = record.get(HASH)
    if theirs != config_hash:
        whose = f"config hash {theirs}" if theirs else "no config hash"
        raise UserError(f"{path} belongs to another run ({whose}, this run's is {config_hash}); "
                        f"--force starts the run over")


def load_part(run_path: Path, epoch: int, rank: int, config_hash: str) -> dict[str, Any]:
    path = _part(run_path, epoch, rank)
    if not path.is_file():
        raise UserError(f"checkpoint part {path} is missing (was the run directory moved between machines?); "
                        f"--force starts the run over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UserError(f"checkpoint part {path} is unreadable ({str(exc).splitlines()[0]}); "
                        f"--force starts the run over") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint part {path} is not a checkpoint; --force starts the run over")
    check_owner(path, state, config_hash)
    return state


def damaged_part(run_path: Path, epoch: int, rank: int, exc: Exception) -> UserError:
    """The one-line error for a part that loaded but does not fit this run
    (another partition, edited content): restoring it failed with ``exc``."""
    cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return UserError(f"checkpoint part {_part(run_path, epoch, rank)} does not fit this run ({cause}); "
                     f"--force starts the run over")
