"""Checkpoints and resume: a run interrupted mid-epoch and resumed from its
last checkpoint equals the uninterrupted run, bit for bit (every metric of
every epoch, every stage's final weights and buffers), for every method,
staleness mode and forward variant, on both engines; the CLI and sweeps
resume on their own; damaged checkpoints are one-line errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdgbench import checkpoint
from fdgbench.data import synthetic_dataset
from fdgbench.engines.launch import spawn_ranks
from fdgbench.method import make_method
from fdgbench.runs import RunDirectory, config_hash
from fdgbench.schedule import hold_span
from fdgbench.train import build_run, fit

from .helpers import method_configs
from .test_methods import case_id

BATCH = 48  # divisible by 2 and 3 (dp's shards)
STEPS_PER_EPOCH = 3
EPOCHS = 4
# Mid-epoch 3: the resume starts from the checkpoint after epoch 2 (iteration
# 6), where FDG K=3's stage 0 holds four batches forwarded with four different
# weights (its first update is at iteration 4), the case a legacy graph rebuild
# must get right. Interrupting after epoch 1 would not exercise it.
STOP_AT = 7
TIMING = ("epoch_seconds", "images_per_s")


class Interrupted(Exception):
    pass


def _data():
    return synthetic_dataset(10, train=BATCH * STEPS_PER_EPOCH, test=64)


def _configs(k, engine="sequential"):
    # deterministic: dp's replicas sum their gradients in replica order (placement.py).
    return method_configs(k, model="tiny_resnet", dataset="synthetic", batch_size=BATCH, epochs=EPOCHS, lr=0.05,
                          threads=1, engine=engine, deterministic=True)


def _interrupt(trainer, at):
    """Make ``trainer`` stop at the start of iteration ``at``, as a killed
    process would, except that a distributed rank first takes the messages
    in flight (so the next test's ranks start clean)."""
    run_iteration = trainer.engine.run_iteration

    def wrapped(t):
        if t == at:
            trainer.engine.finish(t)
            raise Interrupted
        run_iteration(t)

    trainer.engine.run_iteration = wrapped


def _train_clean_and_interrupted(rank, configs, root):
    """Per config: an uninterrupted run, and a run interrupted at STOP_AT and
    resumed by a fresh Run from the checkpoint on disk (``rank``: this
    process's rank on the distributed engine, or None)."""
    for i, cfg in enumerate(configs):
        fit(build_run(cfg, dataset=_data(), rank=rank), RunDirectory(Path(root) / f"clean{i}"))
        cut = RunDirectory(Path(root) / f"cut{i}")
        trainer = build_run(cfg, dataset=_data(), rank=rank)
        _interrupt(trainer, STOP_AT)
        try:
            fit(trainer, cut)
            raise AssertionError("the run was not interrupted")
        except Interrupted:
            pass
        saved = checkpoint.latest(cut.path)
        assert saved["epoch"] == STOP_AT // STEPS_PER_EPOCH and saved["iteration"] == 6
        fit(build_run(cfg, dataset=_data(), rank=rank, resume=saved), cut)


def _same(a, b):
    return a == b or (a != a and b != b)  # NaN: an epoch with no meter readings


def _assert_resumed_equals_clean(clean, cut, stages, label):
    clean_m, cut_m = clean.metrics(), cut.metrics()
    assert len(clean_m) == len(cut_m) == EPOCHS, label
    for a, b in zip(clean_m, cut_m):
        assert a.keys() == b.keys(), label
        for key in a.keys() - set(TIMING):
            assert _same(a[key], b[key]), (label, a["epoch"], key, a[key], b[key])
    for k in range(stages):
        x, y = clean.load_stage(k), cut.load_stage(k)
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), (label, k, name)
    assert cut.is_done and not (cut.path / "checkpoint").exists(), label
    assert [r["after_epoch"] for r in cut.read_json("env.json")["resumed"]] == [2], label


# K = 3: first, middle and last stages (K=2 runs through the CLI test below). One case per method and
# mode, named like test_methods' (`pytest -k dni`); the distributed test below spawns its ranks once for all.
@pytest.mark.parametrize("cfg", [pytest.param(c, id=case_id(c.method, c.method_options)) for c in _configs(3)])
def test_interrupted_and_resumed_equals_uninterrupted_on_the_sequential_engine(cfg, tmp_path):
    _train_clean_and_interrupted(None, [cfg], tmp_path)
    _assert_resumed_equals_clean(RunDirectory(tmp_path / "clean0"), RunDirectory(tmp_path / "cut0"),
                                 1 if cfg.method == "dp" else cfg.splits, f"{cfg.method} {cfg.method_options}")


def _replicated_configs(engine):
    """K = 2 x R = 2: FDG legacy (batches in flight with their forward's
    weights, per replica) and ADL (gradients accumulated across iterations,
    per replica, at the checkpoint)."""
    from fdgbench.config import RunConfig

    base = dict(model="tiny_resnet", splits=2, replicas=2, dataset="synthetic", batch_size=BATCH, epochs=EPOCHS,
                lr=0.05, threads=1, engine=engine, deterministic=True)
    return [RunConfig(method="fdg", method_options={"staleness": "legacy"}, **base),
            RunConfig(method="adl", method_options={"accumulate": 2}, **base)]


@pytest.mark.parametrize("engine", ["sequential", "distributed"])
def test_replicated_stages_resume_bit_identically_on_either_engine(engine, tmp_path):
    configs = _replicated_configs(engine)
    if engine == "distributed":
        # FDG alone: a rank's accumulated gradients (ADL) are its .grad, which every resume test restores.
        configs = configs[:1]
        spawn_ranks(4, torch.device("cpu"), _train_clean_and_interrupted, (configs, str(tmp_path)))
    else:
        _train_clean_and_interrupted(None, configs, tmp_path)
    for i, cfg in enumerate(configs):
        _assert_resumed_equals_clean(RunDirectory(tmp_path / f"clean{i}"), RunDirectory(tmp_path / f"cut{i}"), 2,
                                     f"{cfg.method} R=2 {engine}")


def test_legacy_under_bf16_autocast_resumes_bit_identically(tmp_path):
    """The rebuilt graphs of a checkpoint make their own bf16 weight copies,
    which the backward refills from the live weights as the lost ones were."""
    from fdgbench.config import RunConfig

    cfg = RunConfig(method="fdg", method_options={"staleness": "legacy"}, model="tiny_resnet", splits=3,
                    dataset="synthetic", batch_size=BATCH, epochs=EPOCHS, lr=0.05, threads=1, amp="bf16",
                    channels_last=True)
    _train_clean_and_interrupted(None, [cfg], tmp_path)
    _assert_resumed_equals_clean(RunDirectory(tmp_path / "clean0"), RunDirectory(tmp_path / "cut0"), 3, "bf16")


def test_interrupted_and_resumed_equals_uninterrupted_on_the_distributed_engine(tmp_path):
    k = 3  # the middle rank receives and sends in both directions
    configs = _configs(k, engine="distributed")
    spawn_ranks(k, torch.device("cpu"), _train_clean_and_interrupted, (configs, str(tmp_path)))
    for i, cfg in enumerate(configs):
        # dp too: with --deterministic every gradient element is the same
        # replica-ordered sum, however the all-reduce would order it.
        _assert_resumed_equals_clean(RunDirectory(tmp_path / f"clean{i}"), RunDirectory(tmp_path / f"cut{i}"),
                                     1 if cfg.method == "dp" else k, f"{cfg.method} {cfg.method_options}")


def test_the_checkpoint_holds_batches_in_flight_with_the_weights_of_their_forwards(tmp_path):
    """What makes the resume above non-trivial: FDG K=3 (legacy) has four
    batches in flight at stage 0 at the checkpoint, forwarded with weights
    that differ from the live ones, and a message in flight per boundary and
    direction."""
    cfg = next(c for c in _configs(3) if c.method == "fdg" and c.method_options["staleness"] == "legacy")
    trainer = build_run(cfg, dataset=_data())
    _interrupt(trainer, STOP_AT)
    with pytest.raises(Interrupted):
        fit(trainer, RunDirectory(tmp_path / "run"))
    state = checkpoint.load_part(tmp_path / "run", 2, 0, config_hash(cfg.to_dict()))["engine"]
    stage0 = state["stages"][0]
    assert [h["batch"] for h in stage0["held"]] == [2, 3, 4, 5]  # FDG: stage 0 back-propagates batch t-4
    live = [v for n, v in stage0["module"].items() if "running" not in n and "num_batches" not in n]
    assert not all(torch.equal(w, v) for w, v in zip(stage0["held"][0]["weights"], live))
    assert sorted((m["key"][0], m["key"][1], m["key"][2]) for m in state["messages"]) == [
        ("act", 0, 1), ("act", 1, 2), ("grad", 1, 0), ("grad", 2, 1)]
    assert hold_span(make_method("fdg").schedule, 3) == 4 and hold_span(make_method("bp").schedule, 3) == 0


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fdgbench", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


TINY = ["run", "--method", "fdg", "--model", "tiny_resnet", "-K", "2", "--dataset", "synthetic", "--train-subset", "96",
        "--test-subset", "64", "--batch-size", "32", "--epochs", "4", "--threads", "1", "--no-progress"]


def _only_run(out: Path) -> RunDirectory:
    (path,) = [p for p in out.iterdir() if p.is_dir()]
    return RunDirectory(path)


def _numbers(run: RunDirectory):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in run.metrics()]


def test_a_killed_run_resumes_from_its_checkpoint_on_either_engine(tmp_path):
    clean = _cli(*TINY, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    expected = _numbers(_only_run(tmp_path / "clean"))
    # Sequential: the process is killed (SIGKILL) in epoch 3.
    out = tmp_path / "seq"
    killed = _cli(*TINY, "--out", str(out), env={"FDGBENCH_FAULT": "0:7:kill"})
    assert killed.returncode == -9
    run = _only_run(out)
    assert checkpoint.latest(run.path)["epoch"] == 2 and len(run.metrics()) == 2
    # A record written past the checkpoint (killed between an epoch's record and its checkpoint) is dropped.
    run.append_metrics({**run.metrics()[-1], "epoch": 3})
    resumed = _cli(*TINY, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run.path.name} from its checkpoint after epoch 2" in resumed.stderr
    assert _numbers(run) == expected and not (run.path / "checkpoint").exists()
    # Distributed: rank 1 is killed; the parent stops rank 0. The resumed
    # ranks give the sequential engine's numbers (the engines agree bit for bit).
    out = tmp_path / "dist"
    killed = _cli(*TINY, "--engine", "distributed", "--out", str(out), env={"FDGBENCH_FAULT": "1:7:kill"})
    assert killed.returncode == 1 and "rank 1 died" in killed.stderr
    resumed = _cli(*TINY, "--engine", "distributed", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "from its checkpoint after epoch 2" in resumed.stderr
    assert _numbers(_only_run(out)) == expected


@pytest.fixture
def interrupted_run(tmp_path, monkeypatch, cli):
    """An FDG run stopped by an exception in epoch 3 (in-process, fast)."""
    out = tmp_path / "runs"
    monkeypatch.setenv("FDGBENCH_FAULT", "0:7:raise")
    with pytest.raises(RuntimeError, match="fault injected"):
        cli(*TINY, "--out", out)
    monkeypatch.delenv("FDGBENCH_FAULT")
    return out, _only_run(out)


def test_a_damaged_checkpoint_is_one_line_and_force_starts_over(interrupted_run, cli):
    out, run = interrupted_run
    part = run.path / "checkpoint" / "epoch2" / "rank0.pt"
    part.write_bytes(part.read_bytes()[:1000])  # cut short
    status, _, err = cli(*TINY, "--out", out)
    # After the "resuming" and run-description lines, one error line, no traceback.
    assert status == 2 and "Traceback" not in err and err.count("error:") == 1
    assert err.strip().splitlines()[-1].startswith(f"error: checkpoint part {part} is unreadable")
    part.unlink()
    status, _, err = cli(*TINY, "--out", out)
    assert status == 2 and err.strip().splitlines()[-1].startswith(f"error: checkpoint part {part} is missing")
    (run.path / "checkpoint" / "latest.json").write_text("{not json")
    status, _, err = cli(*TINY, "--out", out)
    assert status == 2 and err.strip() == (f"error: the checkpoint pointer {run.path / 'checkpoint' / 'latest.json'}"
                                           " is unreadable (Expecting property name enclosed in double quotes: "
                                           "line 1 column 2 (char 1)); --force starts the run over")
    status, _, err = cli(*TINY, "--out", out, "--force")
    assert status == 0 and "resuming" not in err
    assert run.is_done and len(run.metrics()) == EPOCHS and "resumed" not in run.read_json("env.json")


def test_a_part_written_before_the_pointer_moved_is_ignored(interrupted_run, cli, tmp_path):
    """Killed after writing epoch 3's part but before latest.json moved to it:
    the resume uses epoch 2's complete checkpoint, and the run equals an
    uninterrupted one."""
    out, run = interrupted_run
    folder = run.path / "checkpoint"
    shutil.copytree(folder / "epoch2", folder / "epoch3")
    (folder / "epoch3" / "rank0.pt").write_bytes(b"half-written")
    status, _, err = cli(*TINY, "--out", out)
    assert status == 0 and "after epoch 2" in err
    status, _, _ = cli(*TINY, "--out", tmp_path / "clean")
    assert status == 0
    assert _numbers(run) == _numbers(_only_run(tmp_path / "clean")) and not folder.exists()


SPEC = """
title = "Resume test"
dataset = "synthetic"
[[columns]]
id = "FDG"
method = "fdg"
[[rows]]
id = "Tiny K=2"
model = "tiny_resnet"
splits = 2
[presets.smoke]
epochs = 4
seeds = 1
train_subset = 96
test_subset = 64
batch_size = 32
threads = 1
"""


def test_a_sweep_resumes_its_interrupted_run(tmp_path):
    spec = tmp_path / "resume.toml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    killed = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--no-progress",
                  env={"FDGBENCH_FAULT": "0:6:kill"})
    assert killed.returncode == -9
    dry = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--dry-run")
    assert "incomplete, resumes after epoch 2" in dry.stdout
    status = _cli("sweep", "status", str(spec), "--preset", "smoke", "--out", str(out))
    assert "1 running" in status.stdout and "(1 can resume from a checkpoint)" in status.stdout
    swept = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--no-progress")
    assert swept.returncode == 0, swept.stderr
    assert "from its checkpoint after epoch 2" in swept.stderr and "1 finished" in swept.stdout
    run = _only_run(out / "resume-smoke")
    assert run.is_done and len(run.metrics()) == EPOCHS
    assert json.loads((run.path / "summary.json").read_text())["epochs_completed"] == EPOCHS


def test_a_sweep_into_committed_records_skips_them_and_restarts_a_cut_run_cleanly(tmp_path):
    """What a fresh clone holds under a committed results root: done runs'
    records without weights, and a run cut off mid-way whose checkpoint was
    not committed. The sweep skips the first and starts the second over."""
    spec = tmp_path / "records.toml"
    spec.write_text(SPEC.replace("seeds = 1", "seeds = 2"))
    out = tmp_path / "runs"
    first = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--no-progress")
    assert first.returncode == 0, first.stderr
    done, cut = [RunDirectory(p) for p in sorted((out / "records-smoke").iterdir())]
    before = done.read_json("summary.json")
    clone = tmp_path / "clone"
    for run, keep in ((done, ("config.json", "env.json", "metrics.jsonl", "summary.json", "done")),
                      (cut, ("config.json", "env.json"))):  # as committed: no weights, lock or checkpoint
        target = clone / "records-smoke" / run.path.name
        target.mkdir(parents=True)
        for name in keep:
            shutil.copy(run.path / name, target / name)
    lines = cut.metrics()[:2]  # the cut run had recorded two epochs
    (clone / "records-smoke" / cut.path.name / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in lines))
    dry = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(clone), "--dry-run")
    assert "done (finished)" in dry.stdout and "incomplete, starts over (no checkpoint)" in dry.stdout
    again = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(clone), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "1 done before, 1 finished" in again.stdout
    redone = RunDirectory(clone / "records-smoke" / cut.path.name)
    assert redone.is_done and len(redone.metrics()) == EPOCHS
    assert redone.metrics() == [{**m, **{k: r[k] for k in TIMING}} for m, r in zip(cut.metrics(), redone.metrics())]
    assert RunDirectory(clone / "records-smoke" / done.path.name).read_json("summary.json") == before


def test_sweeps_side_by_side_share_out_a_presets_runs(tmp_path):
    """A run whose directory another process holds (its lock) is left to that
    process: the sweep trains the others, says which it left, and exits 0; a
    later sweep trains the one left once its lock is free."""
    import fcntl

    from fdgbench.report.specs import load_spec

    spec = tmp_path / "shared.toml"
    spec.write_text(SPEC.replace("seeds = 1", "seeds = 2"))
    out = tmp_path / "runs"
    held, free = (RunDirectory.for_config(out / "shared-smoke", c.config.to_dict())
                  for c in load_spec(str(spec)).cells("smoke"))
    held.path.mkdir(parents=True)
    fd = os.open(held.path / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a second sweep training that run would
    try:
        swept = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--no-progress")
    finally:
        os.close(fd)
    assert swept.returncode == 0, swept.stderr
    assert "seed 0: another process is training it" in swept.stdout
    assert "1 finished" in swept.stdout and "1 left to other processes" in swept.stdout
    assert free.is_done and not held.is_done
    again = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "1 done before, 1 finished" in again.stdout, again.stdout + again.stderr
    assert held.is_done
