"""One directory per run, named by a hash of its config (DomainBed style):
config.json, env.json, metrics.jsonl (one self-describing line per epoch),
summary.json (status finished or diverged) and ``done``, written last. A
directory with ``done`` is the whole record that the run happened. While a
run trains, ``checkpoint/`` holds its latest epoch's checkpoint
(checkpoint.py); it is removed when the run ends."""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .numerics import numerics_settings

from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What a finished (or diverged) run leaves beside its records; cleared when it starts over or resumes.
OUTCOME_FILES = ("summary.json", "done", "trace.json")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary path)`` and a rename (atomic
    on POSIX): a reader, or a run resumed after a crash, sees the old file or
    the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, root: str | os.PathLike, config: dict[str, Any]) -> "RunDirectory":
        name = f"{config['method']}-{config['model']}-K{config['splits']}-{config_hash(config)}"
        return cls(Path(root) / name)

    @property
    def is_done(self) -> bool:
        return (self.path / "done").is_file()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """An OS error while writing the directory is one user-facing line."""
        try:
            yield
        except OSError as exc:
            raise UserError(f"cannot write the run directory {self.path}: {exc.strerror or exc}") from None

    def ensure_writable(self) -> None:
        """Fail before any work if the directory cannot be created or written."""
        with self._writing():
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()

    def start(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        """Create (or reset) the directory for a fresh run."""
        with self._writing():
            self.path.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", *OUTCOME_FILES):
                (self.path / name).unlink(missing_ok=True)
            self.write_json("config.json", config)
            self.write_json("env.json", env)

    def resume(self, epochs: int, env: dict[str, Any]) -> list[dict[str, Any]]:
        """Continue the run from its checkpoint after ``epochs`` epochs: records
        of later epochs (written before the interruption, past the
        checkpoint) are dropped, env.json gains an entry under "resumed".
        Returns the kept records."""
        history = self.metrics()[:epochs]
        with self._writing():
            text = "".join(_metrics_line(record) for record in history)
            write_atomically(self.path / "metrics.jsonl", lambda tmp: tmp.write_text(text))
            for name in OUTCOME_FILES:
                (self.path / name).unlink(missing_ok=True)
            first = self.read_json("env.json")
            first.setdefault("resumed", []).append({"after_epoch": epochs, **env})
            self.write_json("env.json", first)
        return history

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
        write_atomically(self.path / name, lambda tmp: tmp.write_text(text))

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(_metrics_line(record))

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def save_stage(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Stage k's final weights and buffers (each rank saves its own)."""
        folder = self.path / "stages"
        folder.mkdir(exist_ok=True)
        write_atomically(folder / f"stage{k}.pt", lambda tmp: torch.save(state, tmp))

    def load_stage(self, k: int) -> dict[str, torch.Tensor]:
        return torch.load(self.path / "stages" / f"stage{k}.pt", map_location="cpu")

    def finish(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)
        (self.path / "done").write_text(datetime.now(timezone.utc).isoformat() + "\n")


def _metrics_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def environment(devices: list[torch.device], seed: int) -> dict[str, Any]:
    import numpy
    import torchvision

    env: dict[str, Any] = {
        "seed": seed,
        "started": datetime.now(timezone.utc).isoformat(),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "user": _user(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "devices": [str(d) for d in devices],
        "git": git_revision(),
        "numerics": numerics_settings(),
    }
    if any(d.type == "cuda" for d in devices):
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpus"] = sorted({torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"})
    return env


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
