"""One plan from config to result (issue 18, item 1): the walk of one run
from the command line to its training builds the method, the model, the
partition and every stage's worker once each and resolves (checks) the
config once; the memory guard measures the run's own workers and leaves
them as if it had not."""
import collections
import dataclasses
from dataclasses import replace

import pytest
import torch

import fdgbench.execute as execute
import fdgbench.memory as memory
import fdgbench.plan as plan_module
import fdgbench.runs as runs
import fdgbench.train as train
from fdgbench.cli import train as train_cli
from fdgbench.config import RunConfig
from fdgbench.data import synthetic_dataset
from fdgbench.execute import RunOptions
from fdgbench.plan import Plan, check_config
from fdgbench.runs import RunDirectory

from .helpers import method_configs
from .test_checkpoint import _same
from .test_methods import case_id

RUN = ["run", "--method", "fdg", "--model", "tiny_resnet", "--dataset", "synthetic", "-K", "3", "--epochs", "1",
       "--max-steps", "6", "--batch-size", "16", "--device", "cpu", "--no-progress"]


@pytest.fixture
def counted(monkeypatch):
    """Counts, by what was built: config checks, method objects, config hashes,
    models and partitions (real and weightless ones apart, and memory.estimate's
    CPU copies apart from the run's), and stage contexts (one per worker built)."""
    counts = collections.Counter()

    def counting(key, fn, tag=lambda *a, **k: ""):
        def wrapper(*args, **kwargs):
            counts[key + tag(*args, **kwargs)] += 1
            return fn(*args, **kwargs)
        return wrapper

    def on_meta(model, *args, **kwargs):
        return "[meta]" if next(model.parameters()).is_meta else ""

    check = counting("check_config", plan_module.check_config)
    for module in (plan_module, execute, train_cli):
        monkeypatch.setattr(module, "check_config", check)
    monkeypatch.setattr(plan_module, "make_method", counting("make_method", plan_module.make_method))
    monkeypatch.setattr(plan_module, "config_hash", counting("config_hash", plan_module.config_hash))
    monkeypatch.setattr(runs, "config_hash", counting("config_hash", runs.config_hash))
    # The plan checks K and the cut points on a weightless (meta) model; the run builds the real one.
    monkeypatch.setattr(plan_module, "build_model", counting("build_model[meta]", plan_module.build_model))
    monkeypatch.setattr(train, "build_model", counting("build_model", train.build_model))
    monkeypatch.setattr(memory, "build_model", counting("build_model[copy]", memory.build_model))
    monkeypatch.setattr(plan_module, "make_partition", counting("make_partition", plan_module.make_partition, on_meta))
    monkeypatch.setattr(train, "make_partition", counting("make_partition", train.make_partition, on_meta))
    monkeypatch.setattr(memory, "make_partition", counting("make_partition[copy]", memory.make_partition))
    monkeypatch.setattr(Plan, "stage_context", counting("stage_context", Plan.stage_context))
    monkeypatch.setattr(memory, "_estimate", counting("estimate[copies]", memory._estimate))
    return counts


def test_one_run_resolves_its_config_once_and_builds_each_piece_once(cli, tmp_path, counted):
    status, out, err = cli(*RUN, "--out", tmp_path, "--ignore-memory-check")
    assert status == 0, err
    assert counted == {"check_config": 1, "make_method": 1, "config_hash": 1, "build_model[meta]": 1,
                       "make_partition[meta]": 1, "build_model": 1, "make_partition": 1, "stage_context": 3}


def test_the_memory_guard_measures_the_runs_own_stages_and_builds_nothing(cli, tmp_path, counted, monkeypatch):
    """The guard (sequential engine) measures the workers the run built, on
    their devices, before it trains: no second model, partition, worker,
    check or hash; the per-rank engines' guard, which must run before the
    ranks build theirs, is the only user of the CPU copies (memory.estimate)."""
    measured = []
    monkeypatch.setattr(execute, "estimate_built", lambda run: measured.append(run) or memory.estimate_built(run))
    status, out, err = cli(*RUN, "--out", tmp_path)
    assert status == 0, err
    assert len(measured) == 1
    assert counted == {"check_config": 1, "make_method": 1, "config_hash": 1, "build_model[meta]": 1,
                       "make_partition[meta]": 1, "build_model": 1, "make_partition": 1, "stage_context": 3}


def test_compare_resolves_each_config_once_and_hands_the_plans_on(cli, tmp_path, counted, monkeypatch):
    handed = []
    train_run = execute.train_run

    def recording(plan_or_config, *args, **kwargs):
        handed.append(plan_or_config)
        return train_run(plan_or_config, *args, **kwargs)
    monkeypatch.setattr(train_cli, "train_run", recording)
    status, out, err = cli("compare", "--methods", "bp,fdg", *RUN[3:], "--out", tmp_path, "--ignore-memory-check")
    assert status == 0, err
    assert [p.cfg.method for p in handed] == ["bp", "fdg"] and all(isinstance(p, Plan) for p in handed)
    assert counted["check_config"] == 2 and counted["make_method"] == 2 and counted["config_hash"] == 2


def test_a_plan_is_immutable_and_names_what_the_config_resolves_to():
    plan = check_config(RunConfig(method="dp", model="tiny_resnet", splits=4, device="cpu"))
    assert (plan.placement.stages, plan.placement.replicas, plan.num_stages) == (1, 4, 1)
    assert plan.method.name == "dp" and plan.engine.name == "sequential"
    assert plan.config_hash == runs.config_hash(plan.cfg.to_dict())
    assert plan.directory("out").path.name.endswith(plan.config_hash)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cfg = RunConfig()


# Every kind of stage state the guard must put back: weight versions (fdg stash, 2bw), batches in flight with
# their weights (fdg legacy), a replay buffer (dgl-async), outputs awaiting their gradient (dni), auxiliary
# nets and their meters (infopro, auglocal), micro-batches (gpipe), replicas replayed shard by shard (dp). The
# other methods and modes run with `-m slow`.
GUARD_CASES = {("fdg", "legacy"), ("fdg", "stash"), ("2bw", None), ("dgl-async", None), ("dni", "pipelined"),
               ("infopro", None), ("auglocal", None), ("gpipe", None), ("dp", None)}


def _guard_cases() -> list:
    configs = method_configs(2, model="tiny_resnet", dataset="synthetic", batch_size=16, epochs=2, max_steps=12,
                             lr=0.05, threads=1, warmup_epochs=0)
    return [pytest.param(cfg, id=case_id(cfg.method, cfg.method_options),
                         marks=() if (cfg.method, next(iter(cfg.method_options.values()), None)) in GUARD_CASES
                         else pytest.mark.slow) for cfg in configs]


@pytest.mark.parametrize("cfg", _guard_cases())
def test_the_memory_guard_leaves_the_run_it_measured_as_if_unmeasured(cfg, tmp_path):
    """The guard measures the run's own workers before it trains, then puts
    them back: the guarded run's metrics and final weights equal those of
    the same run with --ignore-memory-check, bit for bit, and it did measure."""
    datasets = {"synthetic": synthetic_dataset(10, train=16 * 6, test=32)}
    measured = []
    guarded = RunOptions(out=str(tmp_path / "guarded"), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(execute, "estimate_built", lambda run: measured.append(memory.estimate_built(run)) or measured[-1])
        _, guarded_dir, _ = execute.train_run(cfg, guarded, datasets)
    _, plain_dir, _ = execute.train_run(cfg, replace(guarded, out=str(tmp_path / "plain"), ignore_memory_check=True),
                                        datasets)
    assert len(measured) == 1 and all(s.graph.per_image > 0 for s in measured[0])
    a, b = RunDirectory(guarded_dir), RunDirectory(plain_dir)
    assert len(a.metrics()) == len(b.metrics()) == 2
    for x, y in zip(a.metrics(), b.metrics()):
        assert x.keys() == y.keys()
        for key in x.keys() - {"epoch_seconds", "images_per_s"}:
            assert _same(x[key], y[key]), (key, x[key], y[key])
    for k in range(check_config(cfg).num_stages):
        x, y = a.load_stage(k), b.load_stage(k)
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x), k
