"""Faults a user met (issue 10): a killed or terminated parent of spawned
ranks, the same run started twice, a full disk, foreign or damaged
checkpoints and records, a checkpoint left beside a done run, and reruns of
diverged runs. Each is one line and the README's exit status, never a
traceback."""
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fdgbench import checkpoint, train
from fdgbench.runs import RunDirectory

from .test_checkpoint import TINY, _only_run, interrupted_run  # noqa: F401 (a fixture)

# Checkpoint after epoch 2 of 4 in the interrupted run (tests/test_checkpoint.py).
FORCE = "; --force starts the run over"


def _last_error(status: int, err: str) -> str:
    """The one error line of a failed command (after its progress lines)."""
    assert status == 2 and "Traceback" not in err and err.count("error:") == 1, err
    return err.strip().splitlines()[-1]


# -- 2. ranks die with their parent ------------------------------------------------------------------

def _process_state(pid: int) -> str | None:
    """The /proc state letter of ``pid``, None once it is gone (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in "ZX" else state


def _spawned_ranks(parent: int) -> list[int]:
    ranks = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and b"spawn_main" in cmdline:
                ranks.append(int(entry.name))
    return ranks


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


LONG_RUN = ["run", "--method", "fdg", "--model", "tiny_resnet", "-K", "2", "--engine", "distributed", "--dataset",
            "synthetic", "--train-subset", "64", "--test-subset", "64", "--batch-size", "32", "--epochs", "10000",
            "--threads", "1", "--no-progress"]


def _start_training(tmp_path: Path):
    """A spawned distributed run, returned once its ranks have checkpointed an epoch."""
    out = tmp_path / "runs"
    log = open(tmp_path / "stderr.txt", "w")
    (tmp_path / "tmp").mkdir()  # the spawned ranks' rendezvous folder is made here
    proc = subprocess.Popen([sys.executable, "-m", "fdgbench", *LONG_RUN, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    _wait_for(lambda: proc.poll() is not None or list(out.glob("*/checkpoint/latest.json")), 180, "a checkpoint")
    assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
    ranks = _spawned_ranks(proc.pid)
    assert len(ranks) == 2
    return proc, ranks, _only_run(out)


def test_ranks_die_with_a_parent_killed_by_sigkill(tmp_path):
    proc, ranks, run = _start_training(tmp_path)
    proc.kill()
    proc.wait()
    _wait_for(lambda: not any(_process_state(r) for r in ranks), 10, "the orphaned ranks to die")
    # Nothing holds the directory any more: a rerun would own it alone.
    with run.lock():
        pass


# SIGHUP (the terminal closed) used to end the run silently with 129 and leave the rendezvous folder behind.
# SIGHUP (slow: ~20 s) runs the same handler as SIGTERM (cli.STOP_SIGNALS), which the default suite keeps.
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_the_parent_stops_the_ranks_keeps_the_checkpoint_and_exits_128_plus_it(tmp_path, signum):
    proc, ranks, run = _start_training(tmp_path)
    assert list((tmp_path / "tmp").glob("fdgbench-rdzv-*"))  # not vacuous: the folder exists while training
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 128 + signum
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (the same command resumes")
    assert not any(_process_state(r) for r in ranks)
    assert checkpoint.latest(run.path) is not None and not run.is_done
    assert not list((tmp_path / "tmp").glob("fdgbench-rdzv-*"))


WATCHED = """
import os, subprocess, sys, time
if sys.argv[1] == "parent":
    child = subprocess.Popen([sys.executable, __file__, "child"], stdout=sys.stdout)
    time.sleep(600)
else:
    sys.platform = "portable"  # no prctl: the watchdog thread alone must notice
    from fdgbench.engines import launch
    launch.PARENT_POLL_S = 0.1
    launch._die_with_parent(os.getppid())
    print(os.getpid(), flush=True)
    time.sleep(600)
"""


def test_the_watchdog_ends_a_rank_whose_parent_is_gone_without_prctl(tmp_path):
    script = tmp_path / "watched.py"
    script.write_text(WATCHED)
    parent = subprocess.Popen([sys.executable, str(script), "parent"], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _process_state(child)
    finally:
        parent.kill()
        parent.wait()
    _wait_for(lambda: _process_state(child) is None, 5, "the watched child to exit")


# -- 3. one process per run directory ------------------------------------------------------------------

HOLD = """
import sys, time
from fdgbench.runs import RunDirectory
with RunDirectory(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_run_directory_in_use_is_refused_and_a_dead_owners_lock_taken_over(interrupted_run, cli):
    out, run = interrupted_run
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, _, err = cli(*TINY, "--out", out)
        assert _last_error(status, err) == f"error: run directory {run.path} in use by pid {holder.pid}"
        assert "resuming" not in err and not run.is_done  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    assert (run.path / "lock").read_text().strip() == str(holder.pid)  # left by a process that is gone
    status, _, err = cli(*TINY, "--out", out)
    assert status == 0, err
    assert run.is_done and len(run.metrics()) == 4


# -- 5. a full disk -------------------------------------------------------------------------------------

class _FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


SHORT = ["run", "--method", "fdg", "--model", "tiny_resnet", "-K", "2", "--dataset", "synthetic", "--train-subset",
         "64", "--test-subset", "64", "--batch-size", "32", "--epochs", "2", "--threads", "1", "--no-progress",
         "--trace"]


@pytest.mark.parametrize("name", ["config.json", "env.json", "metrics.jsonl", "rank0.pt", "latest.json",
                                  "stage1.pt", "trace.json", "summary.json", "done"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_files(name, cli, tmp_path, monkeypatch):
    real_open = io.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if isinstance(file, (str, os.PathLike)) and Path(file).name == f".{name}.{os.getpid()}.tmp" else f

    monkeypatch.setattr(io, "open", open_on_full_disk)
    status, _, err = cli(*SHORT, "--out", tmp_path)
    line = _last_error(status, err)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(io, "open", real_open)  # space freed: the same command completes the run
    status, _, err = cli(*SHORT, "--out", tmp_path)
    assert status == 0, err
    run = _only_run(tmp_path)  # (a failure at config.json, the first record, leaves no directory to count)
    assert line.startswith(f"error: cannot write {run.path}/") and line.endswith(f"/{name}: No space left on device")
    assert run.is_done and len(run.metrics()) == 2


# -- 6. foreign or damaged checkpoints and records ------------------------------------------------------

def _interrupt(cli, out, monkeypatch, *args) -> RunDirectory:
    """Another run of TINY (with ``args``) stopped in epoch 3, under ``out``."""
    monkeypatch.setenv("FDGBENCH_FAULT", "0:7:raise")
    with pytest.raises(RuntimeError, match="fault injected"):
        cli(*TINY, *args, "--out", out)
    monkeypatch.delenv("FDGBENCH_FAULT")
    return _only_run(out)


def _hash(run: RunDirectory) -> str:
    return run.path.name.rsplit("-", 1)[1]


def test_a_part_copied_from_a_run_with_another_seed_is_refused(interrupted_run, cli, tmp_path, monkeypatch):
    out, run = interrupted_run
    other = _interrupt(cli, tmp_path / "seed1", monkeypatch, "--seed", "1")
    part = run.path / "checkpoint" / "epoch2" / "rank0.pt"
    shutil.copy(other.path / "checkpoint" / "epoch2" / "rank0.pt", part)
    status, _, err = cli(*TINY, "--out", out)
    assert _last_error(status, err) == (f"error: {part} belongs to another run (config hash {_hash(other)}, "
                                        f"this run's is {_hash(run)}){FORCE}")


def test_another_methods_checkpoint_is_refused(interrupted_run, cli, tmp_path, monkeypatch):
    out, run = interrupted_run
    other = _interrupt(cli, tmp_path / "ddg", monkeypatch, "--method", "ddg")
    shutil.rmtree(run.path / "checkpoint")
    shutil.copytree(other.path / "checkpoint", run.path / "checkpoint")
    status, _, err = cli(*TINY, "--out", out)
    assert _last_error(status, err) == (f"error: {run.path / 'checkpoint' / 'latest.json'} belongs to another run "
                                        f"(config hash {_hash(other)}, this run's is {_hash(run)}){FORCE}")


def test_a_loadable_part_with_wrong_content_is_one_line(interrupted_run, cli):
    out, run = interrupted_run
    part = run.path / "checkpoint" / "epoch2" / "rank0.pt"
    state = torch.load(part, weights_only=False)
    state["engine"]["stages"][0]["module"] = {}  # the right run's part, emptied of stage 0's weights
    torch.save(state, part)
    status, _, err = cli(*TINY, "--out", out)
    line = _last_error(status, err)
    assert line.startswith(f"error: checkpoint part {part} does not fit this run (") and line.endswith(FORCE)
    torch.save({"not": "a checkpoint"}, part)
    status, _, err = cli(*TINY, "--out", out)
    assert _last_error(status, err) == f"error: {part} belongs to another run (no config hash, this run's is " \
                                       f"{_hash(run)}){FORCE}"


def test_a_changed_partition_is_one_line(interrupted_run, cli):
    out, run = interrupted_run
    pointer = run.path / "checkpoint" / "latest.json"
    text = pointer.read_text()
    starts = checkpoint.latest(run.path)["partition"]["starts"]
    moved = [0, starts[1] + 1]
    pointer.write_text(text.replace(f"{starts[1]}\n", f"{moved[1]}\n", 1))
    assert checkpoint.latest(run.path)["partition"]["starts"] == moved
    status, _, err = cli(*TINY, "--out", out)
    line = _last_error(status, err)
    assert line.startswith(f"error: checkpoint part {run.path / 'checkpoint' / 'epoch2' / 'rank0.pt'} does not fit "
                           f"this run (") and line.endswith(FORCE)
    pointer.write_text(text.replace(f"{starts[1]}\n", "9\n", 1))  # past tiny_resnet's 5 blocks
    status, _, err = cli(*TINY, "--out", out)
    assert _last_error(status, err) == ("error: the checkpoint pointer's stages [0, 9] do not fit 2 stage(s) of "
                                        f"tiny_resnet (5 blocks){FORCE}")


def test_a_torn_metrics_line_is_one_line_or_dropped_past_the_checkpoint(interrupted_run, cli):
    out, run = interrupted_run
    metrics = run.path / "metrics.jsonl"
    kept = metrics.read_text()
    lines = kept.splitlines()  # epochs 1 and 2
    metrics.write_text(f"{lines[0]}\n{lines[1][:40]}")  # epoch 2's record, torn: the resume needs it
    status, _, err = cli(*TINY, "--out", out)
    assert _last_error(status, err) == (f"error: {metrics} line 2 is not a metrics record (torn or edited)"
                                        f"{FORCE}")
    metrics.write_text(kept + lines[-1][:40])  # torn past the checkpoint: dropped with the epochs past it
    status, _, err = cli(*TINY, "--out", out)
    assert status == 0, err
    assert [m["epoch"] for m in run.metrics()] == [1, 2, 3, 4]


def test_a_garbage_env_json_is_one_line(interrupted_run, cli):
    out, run = interrupted_run
    env = run.path / "env.json"
    env.write_text("\x00garbage")
    status, _, err = cli(*TINY, "--out", out)
    line = _last_error(status, err)
    assert line.startswith(f"error: {env} is unreadable (") and line.endswith(FORCE)
    env.write_text("[1, 2]")
    status, _, err = cli(*TINY, "--out", out)
    assert _last_error(status, err) == f"error: {env} is not a JSON object{FORCE}"


# -- 9. a checkpoint left beside a done run ------------------------------------------------------------

def test_a_checkpoint_left_beside_a_done_run_is_removed(interrupted_run, cli):
    out, run = interrupted_run
    leftover = run.path / "checkpoint"
    kept = run.path.parent / "kept-checkpoint"
    shutil.copytree(leftover, kept)
    assert cli(*TINY, "--out", out)[0] == 0 and run.is_done and not leftover.exists()
    shutil.copytree(kept, leftover)  # as if killed between writing done and removing the checkpoint
    status, out_text, err = cli(*TINY, "--out", out)
    assert status == 0 and "already done" in out_text, err
    assert not leftover.exists()


# -- 4. rerunning a diverged run ------------------------------------------------------------------------

DIVERGING = [*TINY, "--lr", "1e30"]  # TINY: "run", "--method", "fdg", then the options


def _diverges_twice(cli, *args):
    """Run ``args`` twice: both exit 3 with the same verdict; returns the run's summary."""
    status, _, err = cli(*args)
    assert status == 3 and "Traceback" not in err, err
    verdict = err.strip().splitlines()[-1]
    assert verdict.startswith("diverged: training loss is nan")
    status, out, err = cli(*args)
    assert (status, err.strip().splitlines()[-1]) == (3, verdict) and "Traceback" not in err
    return out


def test_rerunning_a_run_that_diverged_in_epoch_1_exits_3_again(cli, tmp_path):
    _diverges_twice(cli, *DIVERGING, "--out", tmp_path)
    assert _only_run(tmp_path).read_json("summary.json")["epochs_completed"] == 0


def test_rerunning_a_run_that_diverged_later_exits_3_again(cli, tmp_path, monkeypatch):
    lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda t, *args: 1e30 if t >= 3 else lr_at(t, *args))  # from epoch 2
    status, _, err = cli(*TINY, "--out", tmp_path)
    monkeypatch.setattr(train, "lr_at", lr_at)
    assert status == 3, err
    verdict = err.strip().splitlines()[-1]
    run = _only_run(tmp_path)
    assert run.read_json("summary.json")["epochs_completed"] == 1
    status, out, err = cli(*TINY, "--out", tmp_path)
    assert (status, err.strip()) == (3, verdict) and "already done" not in out


def test_rerunning_a_compare_where_every_method_diverged_exits_3_again(cli, tmp_path):
    args = ["compare", "--methods", "bp,fdg", *DIVERGING[3:], "--out", tmp_path]
    first = cli(*args)
    second = cli(*args)
    assert first[0] == second[0] == 3
    diverged = [[line for line in err.splitlines() if line.startswith("diverged:")] for _, _, err in (first, second)]
    assert diverged[0] == diverged[1] and len(diverged[0]) == 3  # bp, fdg, then the verdict
