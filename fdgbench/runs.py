"""One directory per run, named by a hash of its config (DomainBed style):
config.json, env.json, metrics.jsonl (one self-describing line per epoch),
summary.json (status finished or diverged) and ``done``, written last. A
directory with ``done`` is the whole record that the run happened. While a
run trains, ``checkpoint/`` holds its latest epoch's checkpoint
(checkpoint.py); it is removed when the run ends. ``lock`` (a file
holding the owner's pid, locked with flock) keeps a second process out while
a run trains."""
from __future__ import annotations

import contextlib
import errno
import fcntl
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

from .errors import RunInUseError, UserError
from .numerics import numerics_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What a finished (or diverged) run leaves beside its records; cleared when it starts over or resumes.
OUTCOME_FILES = ("summary.json", "done", "trace.json")
LOCK = "lock"  # held (flock) by the process that owns a run directory while the run trains


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary path)`` and a rename (atomic
    on POSIX): a reader, or a run resumed after a crash, sees the old file or
    the whole new one, never half of it. On any failure the temporary file is
    removed (a full disk must not leave debris that fills it further), and an
    OS error (e.g. No space left on device) is one line naming ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers must not share one
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def save_tensors(path: Path, obj: Any) -> None:
    """``torch.save`` through write_atomically, into a folder made if need be
    (its failure is write_atomically's one line too). Saved into a file object: given
    a path, torch reports a full disk as an opaque RuntimeError, while a
    Python file raises OSError (ENOSPC) as write_atomically expects."""
    def write(tmp: Path) -> None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            torch.save(obj, f)

    write_atomically(path, write)


@contextlib.contextmanager
def name_checked(path: Path) -> Iterator[None]:
    """Probing ``path`` (exists, is_file, stat) where a name in it exceeds the
    file system's limit (255 bytes on most; a long ``--out``) is one line
    naming it: pathlib raises ENAMETOOLONG instead of answering False, and it
    would otherwise surface as a traceback from the first probe."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        longest = max(len(os.fsencode(part)) for part in Path(path).parts)
        raise UserError(f"cannot use {path}: a name in it is too long for the file system (its longest part has "
                        f"{longest} bytes)") from None


class DamagedRecord(UserError):
    """A record file of a run directory that cannot be read (torn, edited,
    deleted). ``path`` and ``problem`` let a reader that cannot start the run
    over (a table, a sweep) say what is wrong in its own words; the message
    itself is for ``fdgbench run``, whose --force starts it over."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}; --force starts the run over")


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class RunDirectory:
    _locked: set[Path] = set()  # directories this process holds the lock of (lock() is re-entrant)

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, root: str | os.PathLike, config: dict[str, Any], digest: str | None = None) -> "RunDirectory":
        """The directory of the run of ``config`` (a RunConfig's dict) under
        ``root``; ``digest``: its config_hash where the caller has it already."""
        replicas = f"R{config['replicas']}" if config.get("replicas", 1) > 1 else ""
        name = f"{config['method']}-{config['model']}-K{config['splits']}{replicas}-{digest or config_hash(config)}"
        return cls(Path(root) / name)

    @property
    def exists(self) -> bool:
        with name_checked(self.path):
            return self.path.exists()

    @property
    def is_done(self) -> bool:
        with name_checked(self.path):
            return (self.path / "done").is_file()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """An OS error while writing the directory is one user-facing line."""
        try:
            yield
        except OSError as exc:
            inside = f" ({exc.filename})" if exc.filename and Path(exc.filename) != self.path else ""
            raise UserError(f"cannot write the run directory {self.path}{inside}: {exc.strerror or exc}") from None

    def ensure_writable(self) -> None:
        """Fail before any work if the directory cannot be created or written."""
        with self._writing():
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            try:
                probe.write_text("")
            finally:
                probe.unlink(missing_ok=True)

    def remove_if_only_lock(self) -> None:
        """Remove the directory if its lock file is all it holds (a run that
        failed before writing anything). Call it while holding the lock."""
        with contextlib.suppress(OSError):
            if {p.name for p in self.path.iterdir()} <= {LOCK}:
                (self.path / LOCK).unlink(missing_ok=True)
                self.path.rmdir()

    def holder(self) -> str | None:
        """The pid of the process training this run (holding its lock), or
        None; takes nothing (a launcher's look before it starts a process)."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return None  # no lock file: nobody has held it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # releases the shared lock if it was taken

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own the directory while a run trains: a second process (the same
        command started twice) is refused with the owner's pid instead of
        writing every record twice. flock, so the OS releases the lock when
        its holder dies, however it dies: a stale lock file is taken over."""
        key = self.path.resolve()
        if key in RunDirectory._locked:  # this process holds it already (a re-check under the lock)
            yield
            return
        with self._writing():
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RunInUseError(f"run directory {self.path} in use by pid {holder}") from None
            with self._writing():
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            RunDirectory._locked.add(key)
            try:
                yield
            finally:
                RunDirectory._locked.discard(key)
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # no pid left behind to mislead a reader of the file
        finally:
            os.close(fd)  # releases the lock

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
        history = self.metrics(epochs)
        first = self.read_json("env.json")
        with self._writing():
            text = "".join(_metrics_line(record) for record in history)
            write_atomically(self.path / "metrics.jsonl", lambda tmp: tmp.write_text(text))
            for name in OUTCOME_FILES:
                (self.path / name).unlink(missing_ok=True)
            first.setdefault("resumed", []).append({"after_epoch": epochs, **env})
            self.write_json("env.json", first)
        return history

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
        write_atomically(self.path / name, lambda tmp: tmp.write_text(text))

    def read_json(self, name: str) -> dict[str, Any]:
        """One of the run's JSON records (each an object); a damaged one is one line naming it."""
        path = self.path / name
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise DamagedRecord(path, "is missing") from None
        except (OSError, ValueError) as exc:
            raise DamagedRecord(path, f"is unreadable ({getattr(exc, 'strerror', None) or exc})") from None
        if not isinstance(obj, dict):
            raise DamagedRecord(path, "is not a JSON object")
        return obj

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add an epoch's record. The file is rewritten whole (a few hundred
        lines at most) through write_atomically, so a full disk or a kill never
        leaves a torn last line."""
        path = self.path / "metrics.jsonl"
        with self._writing():
            text = (path.read_text() if path.is_file() else "") + _metrics_line(record)
        write_atomically(path, lambda tmp: tmp.write_text(text))

    def metrics(self, epochs: int | None = None) -> list[dict[str, Any]]:
        """The epochs' records (the first ``epochs`` of them; what lies past
        them is not read, so a resume drops a damaged record past its
        checkpoint like any other); a damaged one is one line naming the file."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines()[:epochs], 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append(None)
            if not isinstance(records[-1], dict):
                raise DamagedRecord(path, f"line {number} is not a metrics record (torn or edited)")
        return records

    def save_stage(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Stage k's final weights and buffers (each rank saves its own)."""
        save_tensors(self.path / "stages" / f"stage{k}.pt", state)

    def load_stage(self, k: int) -> dict[str, torch.Tensor]:
        return torch.load(self.path / "stages" / f"stage{k}.pt", map_location="cpu")

    def finish(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)
        stamp = datetime.now(timezone.utc).isoformat() + "\n"
        write_atomically(self.path / "done", lambda tmp: tmp.write_text(stamp))


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
        "cpu": cpu_name(),  # rounding differs between CPUs even with the same kernel set: a cell says where it ran
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


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
