"""Placement = stages x replicas: R replicas of each stage train as one
(the sequential replay equals whole-batch training where nothing depends on
the batch; the distributed engine's K x R ranks equal the replay), and what
cannot be replicated is refused in one line."""
from pathlib import Path

import pytest
import torch
from torch import nn

from fdgbench.config import RunConfig
from fdgbench.plan import check_config
from fdgbench.data import synthetic_dataset
from fdgbench.engines.launch import spawn_ranks
from fdgbench.engines.sequential import SequentialEngine
from fdgbench.errors import UserError
from fdgbench.method import make_method
from fdgbench.optim import SGDConfig
from fdgbench.placement import Placement, replay_shards
from fdgbench.runs import RunDirectory
from fdgbench.stage import StageContext
from fdgbench.train import build_run, fit

from .helpers import ToyStream

BATCH = 48
STEPS = 6


def _mean_sse(out, target):
    return 0.5 * ((out - target) ** 2).mean()


def _toy_run(method, replicas, steps=8):
    """A float64 two-stage MLP without batch-dependent layers, trained on
    batches of 4; returns its weights."""
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Linear(3, 5), nn.Tanh()).double(), nn.Linear(5, 2).double()]
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(steps + 4, 4, 3, generator=gen, dtype=torch.float64)
    ys = torch.randn(steps + 4, 4, 2, generator=gen, dtype=torch.float64)
    stream = ToyStream(lambda t: xs[t], lambda t: ys[t])
    workers = []
    for i, m in enumerate(modules):
        worker = method.make_worker(StageContext(i, 2, m, torch.device("cpu"), SGDConfig(lr=0.1), _mean_sse))
        workers.append(replay_shards(worker, replicas) if replicas > 1 else worker)
    engine = SequentialEngine(method, workers, stream)
    for t in range(steps):
        engine.run_iteration(t)
    return [p.detach().clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("name,options", [("bp", {}), ("fdg", {"staleness": "legacy"}), ("fdg", {"staleness": "stash"}),
                                          ("fdg", {"staleness": "replay", "beta": 0.5}), ("ddg", {}), ("fr", {}),
                                          ("adl", {"accumulate": 2})])
def test_replicas_of_a_batch_free_model_train_as_the_whole_batch(name, options):
    # With a mean loss and no batch-dependent layer, the mean of the R shards'
    # gradients is the whole batch's gradient: only float64 rounding differs
    # (a few dozen operations per weight over 8 steps: far below 1e-12).
    method = make_method(name, **options)
    whole, halves = _toy_run(method, 1), _toy_run(method, 2)
    for a, b in zip(whole, halves):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    # Not vacuous: the weights moved, and a delayed method's differ from BP's.
    reference = _toy_run(make_method("bp"), 2, steps=0 if name == "bp" else 8)
    assert any((a - r).abs().max() > 1e-6 for a, r in zip(halves, reference))


def test_placement_puts_each_replica_on_consecutive_ranks():
    p = Placement(3, 2)
    assert p.ranks == 6
    assert [(p.stage_of(r), p.replica_of(r)) for r in range(6)] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert all(p.rank_of(p.stage_of(r), p.replica_of(r)) == r for r in range(6))
    assert check_config(RunConfig(method="dp", splits=4, replicas=2)).placement == Placement(1, 8)
    assert check_config(RunConfig(method="fdg", splits=4, replicas=2)).placement == Placement(4, 2)


def _data():
    return synthetic_dataset(10, train=BATCH, test=64)


def _configs():
    # deterministic: the replicas' gradients are added in replica order on both engines (placement.py).
    base = dict(model="tiny_resnet", dataset="synthetic", batch_size=BATCH, epochs=STEPS, lr=0.05, threads=1,
                deterministic=True, splits=2, replicas=2)
    return [RunConfig(method="fdg", method_options={"staleness": "legacy"}, **base),
            RunConfig(method="dgl", **base),
            RunConfig(method="dp", **base)]


def _train_distributed(rank, configs, root):
    for i, cfg in enumerate(configs):
        cfg = RunConfig(**{**cfg.__dict__, "engine": "distributed"})
        fit(build_run(cfg, dataset=_data(), rank=rank), RunDirectory(Path(root) / f"d{i}"))


def test_fdg_x_dp_on_four_ranks_equals_the_sequential_replay(tmp_path):
    configs = _configs()
    spawn_ranks(4, torch.device("cpu"), _train_distributed, (configs, str(tmp_path)))
    threads = torch.get_num_threads()
    try:
        for i, cfg in enumerate(configs):
            fit(build_run(cfg, dataset=_data()), RunDirectory(tmp_path / f"s{i}"))
    finally:
        torch.set_num_threads(threads)
    for i, cfg in enumerate(configs):
        seq, dis = RunDirectory(tmp_path / f"s{i}"), RunDirectory(tmp_path / f"d{i}")
        stages = check_config(cfg).placement.stages
        # Bit for bit: the same kernels on the same shards, the mean added in replica order on both.
        # Every buffer too: each replica keeps its own BN statistics on both engines, and replica 0's are saved.
        for k in range(stages):
            a, b = seq.load_stage(k), dis.load_stage(k)
            assert a.keys() == b.keys() and any("running_mean" in n for n in a)
            assert all(torch.equal(a[n], b[n]) for n in a), (cfg.method, k)
        # Training totals: every replica's float64 loss sum, added across ranks by gloo in its own order
        # (4 terms: at most 4 * 2**-53 relative apart); the error counts are integers, so exact. (NaN where
        # FDG's last stage has seen no batch yet.)
        # Every other recorded number is exact: test loss and error (replica 0's pipeline and buffers score the
        # test set on both engines) and the per-stage meters (replica 0's).
        for a, b in zip(seq.metrics(), dis.metrics(), strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=4 * 2.0 ** -53, abs=0, nan_ok=True)
            exact = [key for key in a if key == "train_error" or key.startswith(("test_", "stage"))]
            assert len(exact) >= 3 and set(exact) <= set(b)
            assert all(a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True) for key in exact), cfg.method
        assert dis.read_json("config.json")["replicas"] == 2 and dis.is_done
        assert "-K2R2-" in RunDirectory.for_config(tmp_path, cfg.to_dict()).path.name


@pytest.mark.parametrize("fields,message", [
    (dict(method="dni", replicas=2), "dni cannot run 2 replicas: its sg step\\(s\\) outside the stage.s update"),
    (dict(method="fdg", replicas=2, diagnose=5), "--diagnose measures one stage's gradient"),
    (dict(method="fdg", replicas=3, batch_size=32), "--batch-size 32 must be a multiple of 3"),
    (dict(method="dp", splits=2, replicas=3, batch_size=32), "dp splits each batch across 6 replicas"),
    (dict(method="fdg", replicas=0), "--replicas must be at least 1, got 0"),
])
def test_what_cannot_be_replicated_is_refused_in_one_line(fields, message):
    cfg = RunConfig(**{"model": "tiny_resnet", "dataset": "synthetic", "batch_size": 32, "epochs": 1, **fields})
    with pytest.raises(UserError, match=message):
        check_config(cfg)
        build_run(cfg, dataset=synthetic_dataset(10, train=64, test=32))


def test_the_command_line_places_replicas_and_the_simulator_predicts_them(tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fdgbench", *args], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    run = cli("run", "--method", "fdg", "-K", "2", "--replicas", "2", "--model", "tiny_resnet", "--dataset",
              "synthetic", "--batch-size", "32", "--epochs", "1", "--max-steps", "6", "--threads", "1", "--no-progress",
              "--out", str(tmp_path / "runs"))
    assert run.returncode == 0, run.stderr
    assert "2 replicas of each stage replayed shard by shard" in run.stderr
    assert "fdg tiny_resnet K=2 R=2: final test error" in run.stdout
    (directory,) = (tmp_path / "runs").iterdir()
    assert directory.name.startswith("fdg-tiny_resnet-K2R2-") and RunDirectory(directory).is_done
    simulated = cli("bench", "simulate", "--model", "tiny_resnet", "--splits", "2", "--methods", "fdg,dp",
                    "--batch-size", "32", "--replicas", "2")
    assert simulated.returncode == 0, simulated.stderr
    assert "each stage has 2 replicas (K x 2 workers; dp: 1 stage x 2K)" in simulated.stdout
    rows = {r[1]: r for r in (line.split() for line in simulated.stdout.splitlines()) if r[:1] == ["2"]}
    assert set(rows) == {"fdg", "dp"} and all(float(r[2]) > 0 for r in rows.values())
