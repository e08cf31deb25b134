"""The distributed engine (gloo, CPU): parity with the sequential engine for
every method at K = 2 and 3, the CLI (spawned and torchrun), faults, traces."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fdgbench.data import synthetic_dataset
from fdgbench.engines.launch import spawn_ranks
from fdgbench.engines.trace import read_trace
from fdgbench.method import all_methods
from fdgbench.runs import RunDirectory
from fdgbench.config import RunConfig
from fdgbench.train import build_run, fit

from .helpers import method_configs

BATCH = 48  # divisible by 2 and 3, so dp's shards are equal
STEPS = 6


def _data():
    # One batch per epoch: metrics.jsonl then holds every iteration's training loss.
    return synthetic_dataset(10, train=BATCH, test=64)


def _configs(k):
    # deterministic: dp's replicas sum their gradients in replica order (placement.py), as the sequential replay does.
    return method_configs(k, model="tiny_resnet", dataset="synthetic", batch_size=BATCH, epochs=STEPS, lr=0.05,
                          threads=1, deterministic=True)


def _train_distributed(rank, configs, root):
    for i, cfg in enumerate(configs):
        cfg = RunConfig(**{**cfg.__dict__, "engine": "distributed"})
        fit(build_run(cfg, dataset=_data(), rank=rank), RunDirectory(Path(root) / f"d{i}"))


def _train_sequential(configs, root):
    threads = torch.get_num_threads()
    try:
        for i, cfg in enumerate(configs):
            fit(build_run(cfg, dataset=_data()), RunDirectory(Path(root) / f"s{i}"))
    finally:
        torch.set_num_threads(threads)


# K = 3 has a first, a middle and a last rank; K = 2 (slow: 33 s) adds no new kind of rank. At K = 2, FDG and
# dp are checked against the sequential engine by the channels-last test below, FDG, DGL and dp x 2 replicas
# in test_placement.py.
@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_distributed_engine_matches_sequential_for_every_method(k, tmp_path):
    checked = _check_parity(k, _configs(k), tmp_path)
    assert set(checked) == {m.name for m in all_methods()}


# Issue 20's local-learning methods at K = 4 (every stage but the last has an auxiliary net, two middle ranks).
@pytest.mark.slow
def test_distributed_engine_matches_sequential_for_the_local_learning_methods_at_k4(tmp_path):
    configs = [c for c in _configs(4) if c.method in ("infopro", "auglocal")]
    assert _check_parity(4, configs, tmp_path) == ["infopro", "auglocal"]


def _check_parity(k, configs, tmp_path):
    """Train ``configs`` on both engines and compare every metric, meter,
    parameter and buffer; returns the methods checked."""
    spawn_ranks(k, torch.device("cpu"), _train_distributed, (configs, str(tmp_path)))
    _train_sequential(configs, tmp_path)
    checked = []
    for i, cfg in enumerate(configs):
        seq, dis = RunDirectory(tmp_path / f"s{i}"), RunDirectory(tmp_path / f"d{i}")
        label = f"{cfg.method} {cfg.method_options}"
        seq_m, dis_m = seq.metrics(), dis.metrics()
        assert len(seq_m) == len(dis_m) == STEPS, label
        stages = 1 if cfg.method == "dp" else k
        # Bit for bit: the same kernels on the same shapes in the same order.
        # dp's training loss is the exception: each replica's loss sum (float64)
        # is added across ranks by gloo's all-reduce, in its own order; K
        # float64 terms in another order differ by at most K * 2**-53 relative.
        losses = "train_loss" if cfg.method == "dp" else None
        for a, b in zip(seq_m, dis_m):
            if losses:
                assert a[losses] == pytest.approx(b[losses], rel=k * 2.0 ** -53, abs=0), label
        # Test scores too for dp: both engines keep each replica's BN statistics and score with replica 0's.
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            if key == losses:
                continue
            assert [m[key] for m in seq_m] == [m[key] for m in dis_m], (label, key)
        for s in range(stages):  # every parameter and buffer (BN running statistics and batch counts)
            a, b = seq.load_stage(s), dis.load_stage(s)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[n], b[n]) for n in a), (label, s)
        # Per-stage meters (auxiliary and synthetic-gradient losses) reach rank 0's records.
        meter_keys = sorted(key for key in seq_m[-1] if key.startswith("stage"))
        assert [[m[key] for key in meter_keys] for m in seq_m] == [[m[key] for key in meter_keys] for m in dis_m]
        assert dis.read_json("config.json")["engine"] == "distributed"
        assert dis.is_done
        checked.append(cfg.method)
    return checked


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fdgbench", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


TINY = ["--model", "tiny_resnet", "--dataset", "synthetic", "--batch-size", "32", "--epochs", "2", "--max-steps",
        "40", "--threads", "1", "--no-progress"]


def test_cli_spawned_and_torchrun_ranks_give_the_same_run(tmp_path):
    spawned = _cli("run", "--method", "fdg", "-K", "2", "--engine", "distributed", "--trace", "--out",
                   str(tmp_path / "a"), *TINY)
    assert spawned.returncode == 0, spawned.stderr
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    launched = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "fdgbench", "run", "--method",
                               "fdg", "-K", "2", "--engine", "distributed", "--out", str(tmp_path / "b"), *TINY],
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("final test error") == 1  # rank 0 alone reports
    (a,), (b,) = (list((tmp_path / x).iterdir()) for x in "ab")
    assert a.name == b.name  # the same config, so the same run directory name
    ra, rb = RunDirectory(a), RunDirectory(b)
    assert [m["train_loss"] for m in ra.metrics()] == [m["train_loss"] for m in rb.metrics()]
    assert all(torch.equal(ra.load_stage(1)[n], v) for n, v in rb.load_stage(1).items())
    # Every rank measured its own stage's memory; rank 0 recorded both (FDG's stage 0 holds two batches).
    sa, sb = ra.read_json("summary.json"), rb.read_json("summary.json")
    assert sa["stage0_memory_bytes"] > sa["stage1_memory_bytes"] > 0
    assert [sa[f"stage{k}_memory_bytes"] for k in (0, 1)] == [sb[f"stage{k}_memory_bytes"] for k in (0, 1)]
    # The trace: every action of both stages, each inside the run's time span.
    spans, meta = read_trace(a / "trace.json")
    assert meta["engine"] == "distributed" and {s.stage for s in spans} == {0, 1}
    forwards = {(s.stage, s.name) for s in spans if s.category == "forward"}
    assert forwards == {(0, f"F{t}") for t in range(40)} | {(1, f"F{t - 1}") for t in range(1, 40)}
    assert all(s.duration >= 0 and s.start >= -0.5 for s in spans)
    assert {s.category for s in spans} >= {"forward", "backward", "update", "send", "recv"}


@pytest.mark.parametrize("mode,cause", [("raise", "raised RuntimeError: fault injected"),
                                        ("kill", "died (killed by SIGKILL)")])
def test_a_failing_rank_stops_the_run_with_one_line(mode, cause, tmp_path):
    start = time.monotonic()
    result = _cli("run", "--method", "fdg", "-K", "3", "--engine", "distributed", "--out", str(tmp_path), *TINY,
                  env={"FDGBENCH_FAULT": f"1:5:{mode}"}, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: rank 1 ") and cause in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    # Bounded: start-up (~10 s) plus the grace period (10 s), with room for a loaded machine.
    assert elapsed < 60
    run = next(tmp_path.iterdir())
    assert not RunDirectory(run).is_done


def test_a_hung_rank_stops_the_run_within_the_timeout(tmp_path):
    # Rank 1 SIGSTOPs itself: alive but silent. Rank 0's receive gives up after
    # FDGBENCH_DIST_TIMEOUT (5 s); the parent then stops every rank.
    start = time.monotonic()
    result = _cli("run", "--method", "fdg", "-K", "2", "--engine", "distributed", "--out", str(tmp_path), *TINY,
                  env={"FDGBENCH_FAULT": "1:5:stop", "FDGBENCH_DIST_TIMEOUT": "5"}, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 stopped responding"), result.stderr
    # Start-up (~10 s) + the timeout (5 s) + the grace period (10 s) + stopping (5 s), with room for load.
    assert elapsed < 75


def test_channels_last_messages_keep_their_layout_and_match_the_sequential_engine(tmp_path):
    # FDG sends channels-last activations and gradients both ways (and through
    # evaluation); dp at K=2 uses the all-reduce's own sum (not --deterministic),
    # which equals the sequential replay at two replicas (placement.py).
    configs = [RunConfig(**{**cfg.__dict__, "channels_last": True, "deterministic": False})
               for cfg in _configs(2) if cfg.method in ("fdg", "dp") and cfg.method_options.get("staleness") != "replay"]
    spawn_ranks(2, torch.device("cpu"), _train_distributed, (configs, str(tmp_path)))
    _train_sequential(configs, tmp_path)
    for i, cfg in enumerate(configs):
        seq, dis = RunDirectory(tmp_path / f"s{i}"), RunDirectory(tmp_path / f"d{i}")
        label = f"{cfg.method} {cfg.method_options}"
        # dp (1 stage x 2 replicas): its loss sum over 2 ranks is a + b = b + a, so every metric is exact too.
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert [m[key] for m in seq.metrics()] == [m[key] for m in dis.metrics()], (label, key)
        for s in range(1 if cfg.method == "dp" else 2):
            a, b = seq.load_stage(s), dis.load_stage(s)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[n], b[n]) for n in a), (label, s)


def test_more_ranks_than_gpus_is_refused_in_one_line():
    from fdgbench.engines.launch import check_ranks_fit
    from fdgbench.errors import UserError

    check_ranks_fit(torch.device("cuda"), 2, 2)
    check_ranks_fit(torch.device("cpu"), 4, 0)
    with pytest.raises(UserError, match="needs one GPU per rank: 2 ranks on this node, 1 GPU"):
        check_ranks_fit(torch.device("cuda"), 2, 1)


def test_gantt_plot_of_a_traced_run_and_its_errors(tmp_path):
    result = _cli("run", "--method", "dgl", "-K", "2", "--engine", "distributed", "--trace", "--out", str(tmp_path),
                  *TINY)
    assert result.returncode == 0, result.stderr
    run = next(tmp_path.iterdir())
    plotted = _cli("plot", "gantt", str(run), "--iterations", "4")
    assert plotted.returncode == 0, plotted.stderr
    assert all((run / f"gantt.{ext}").stat().st_size > 1000 for ext in ("png", "svg"))
    drawn = (run / "gantt.svg").read_text()
    assert "stage 0" in drawn and "stage 1" in drawn and "dgl" in drawn  # one row per stage, the run named
    assert "forward" in drawn and "backward" in drawn  # the legend names what was drawn
    missing = _cli("plot", "gantt", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'trace.json'} not found; record the run with --trace"]


@pytest.mark.parametrize("args,message", [
    (["--stage-devices", "cpu,cpu"], "--stage-devices is for the sequential engine"),
    (["--method", "dp", "-K", "3", "--batch-size", "32"], "--batch-size 32 must be a multiple of 3"),
    (["--engine", "pipeline"], "Invalid value for '--engine'"),
])
def test_distributed_option_errors_are_one_line(args, message, tmp_path):
    result = _cli("run", "--model", "tiny_resnet", "--dataset", "synthetic", "--engine", "distributed",
                  "--out", str(tmp_path), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_simulate_benchmark_predicts_every_method_and_says_which_k_cannot_be(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block profile is saved under results/profiles here
    result = _cli("bench", "simulate", "--model", "tiny_resnet", "--splits", "2,8", "--methods", "bp,fdg,dgl,dp",
                  "--batch-size", "16")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["2"]]
    assert [r[1] for r in rows] == ["bp", "fdg", "dgl", "dp"]
    speedup = {r[1]: float(r[3].rstrip("x*")) for r in rows}  # * marks unprofiled auxiliary nets
    # Split BP gains only what overlapping stage 1's update with stage 0's backward
    # gives (a few % on this tiny net); FDG cannot beat 2x at K=2.
    assert speedup["bp"] < 1.1 < speedup["fdg"] <= 2.0
    assert "tiny_resnet has 5 blocks, so K=8 is not possible" in result.stdout
    assert (tmp_path / "results/profiles/tiny_resnet-b16-cpu-t1.json").is_file()


def test_speedup_benchmark_prints_every_row_with_ratios_and_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _cli("bench", "speedup", "--model", "tiny_resnet", "--methods", "fdg,dp", "--batch-size", "32",
                  "--iterations", "3", "--all-threads", "2", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    rows = {(r[0], r[1], r[2] + r[3] + r[4]): r for r in (line.split() for line in result.stdout.splitlines())
            if r[:1] in (["bp"], ["fdg"], ["dp"]) and r[3] == "x"}  # the main table ("K x threads")
    assert set(rows) == {("bp", "1", "1x1"), ("bp", "1", "1x2"), ("fdg", "2", "2x1"), ("dp", "2", "2x1")}
    assert rows[("bp", "1", "1x1")][7] == "1.00x"  # the reference row
    fdg = rows[("fdg", "2", "2x1")]
    assert float(fdg[7].rstrip("x")) > 0 and float(fdg[9]) >= 1.0  # a ratio, and balance = slowest / mean
    assert float(fdg[11]) > 0 and fdg[12] == "-"  # simulated / measured; no spread from one round
    assert "partition balanced (cut by the block profile)" in result.stdout
    assert re.search(r"co-run factor \(each rank's compute while K ranks share the CPU / alone, the median of "
                     r"interleaved rounds\): K=2 \d+\.\d\dx", result.stdout)
    assert re.search(r"its block times scaled by \d+\.\d\d \(BP 1 x 1 timed in these rounds", result.stdout)
    assert "in each of 1 round(s), the median round's" in result.stdout
    # Where each rank's time went: one line per rank, its parts adding up to its time, the slowest rank's the row's.
    parts = [r for r in (line.split() for line in result.stdout.splitlines())
             if len(r) == 12 and r[0] in ("fdg", "dp") and r[3] != "x"]
    assert [(r[0], r[2], r[3]) for r in parts] == [("fdg", "0", "0"), ("fdg", "1", "1"), ("dp", "0", "0"),
                                                   ("dp", "1", "0")]
    for r in parts:
        compute, loader, wait, send, other, total = (float(r[i]) for i in (4, 7, 8, 9, 10, 11))
        assert float(r[6].rstrip("x")) > 0 and compute > 0 and min(loader, wait, send) >= 0
        assert compute + loader + wait + send + other == pytest.approx(total, abs=0.5 + 0.01 * total)
    assert max(float(r[11]) for r in parts[:2]) == pytest.approx(float(fdg[5]), abs=1)  # ms/iter


def test_speedup_benchmark_runs_gpipe_through_the_library_with_its_bubble_predicted(tmp_path, monkeypatch):
    """gpipe (with its own options) is measured through torch.distributed.pipelining, as users run it, and
    predicted by the simulator's micro-batch timeline; the library runs the stages, so no balance or breakdown."""
    monkeypatch.chdir(tmp_path)
    result = _cli("bench", "speedup", "--model", "tiny_resnet", "--methods", "gpipe[microbatches=2]",
                  "--batch-size", "32", "--iterations", "2", "--all-threads", "2", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    (row,) = [r for r in (line.split() for line in result.stdout.splitlines()) if r[:1] == ["gpipe[microbatches=2]"]]
    assert row[1:5] == ["2", "2", "x", "1"] and float(row[7].rstrip("x")) > 0  # K, ranks x threads, a ratio
    assert row[9] == "-" and float(row[10]) > 0 and float(row[11]) > 0  # no balance; simulated ms, sim/measured
    assert "through torch.distributed.pipelining (--engine pipelining)" in result.stdout
    assert "per rank, ms per iteration" not in result.stdout  # its only row has no breakdown to print
    # a micro-batch is costed from its own profile, at 32 / 2 images, taken in this invocation
    assert "one micro-batch's costs from a profile at B/M images (M = 2)" in result.stdout
    assert (tmp_path / "results/profiles/tiny_resnet-b16-cpu-t1.json").is_file()


@pytest.mark.slow  # spawns ranks again (~15 s); the speed file's use is tested in test_tables without it
def test_speedup_benchmark_saves_the_speeds_time_to_accuracy_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _cli("bench", "speedup", "--model", "tiny_resnet", "--methods", "fdg", "--batch-size", "16",
                  "--iterations", "1", "--all-threads", "2", "--amp", "bf16", "--channels-last", "--save", "s.json")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert set(saved["seconds_per_iteration"]) == {"bp", "fdg K=2"}
    assert saved["amp"] == "bf16" and saved["channels_last"] is True and "2 threads" in saved["workers"]
    assert all(v > 0 for v in saved["seconds_per_iteration"].values())
    assert "no predictions: the block profile is fp32" in result.stdout


@pytest.mark.slow  # ~25 s of torchrun start-ups; the spawned ranks' lost-contact line is in the default suite
def test_a_rank_killed_under_torchrun_leaves_its_peer_one_line_and_the_run_resumes(tmp_path):
    # torchrun's agent reports the dead rank; the survivor, whose receive fails with gloo's "Connection reset by
    # peer", used to print a full traceback and no `error: rank N` line.
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "fdgbench", "run", "--method", "fdg", "-K",
               "2", "--engine", "distributed", "--out", str(tmp_path), "--model", "tiny_resnet", "--dataset", "synthetic",
               "--batch-size", "32", "--train-subset", "64", "--epochs", "6", "--threads", "1", "--no-progress"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FDGBENCH_FAULT": "1:7:kill", "FDGBENCH_DIST_TIMEOUT": "60"})
    assert killed.returncode != 0
    ours = [line for line in killed.stderr.splitlines() if line.startswith("error: ")]
    assert ours and all(line.startswith("error: rank 0 lost contact with a peer: ") for line in ours), killed.stderr
    assert "fdgbench/engines" not in killed.stderr  # no traceback through the suite's code
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after epoch 3" in resumed.stderr  # 2 iterations an epoch
