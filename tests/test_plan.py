"""One plan from config to result (issue 18, item 1): the walk of one run
from the command line to its training builds the method, the model, the
partition and every stage's worker once each and resolves (checks) the
config once; the memory guard measures its own CPU copy of the stages, and
nothing else."""
import collections
import dataclasses

import pytest

import fdgbench.execute as execute
import fdgbench.memory as memory
import fdgbench.plan as plan_module
import fdgbench.runs as runs
import fdgbench.train as train
from fdgbench.cli import train as train_cli
from fdgbench.config import RunConfig
from fdgbench.plan import Plan, check_config

RUN = ["run", "--method", "fdg", "--model", "tiny_resnet", "--dataset", "synthetic", "-K", "3", "--epochs", "1",
       "--max-steps", "6", "--batch-size", "16", "--device", "cpu", "--no-progress"]


@pytest.fixture
def counted(monkeypatch):
    """Counts, by what was built: config checks, method objects, config hashes,
    models and partitions (real and weightless ones apart, and the memory
    guard's apart from the run's), and stage contexts (one per worker built)."""
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
    # The plan checks K and the cut points on a weightless (meta) model; the run and the guard build real ones.
    original_build = plan_module.build_model

    def build_meta(*args, **kwargs):
        counts["build_model[meta]"] += 1
        return original_build(*args, **kwargs)
    monkeypatch.setattr(plan_module, "build_model", build_meta)
    monkeypatch.setattr(train, "build_model", counting("build_model", train.build_model))
    monkeypatch.setattr(memory, "build_model", counting("build_model[guard]", memory.build_model))
    monkeypatch.setattr(plan_module, "make_partition", counting("make_partition", plan_module.make_partition, on_meta))
    monkeypatch.setattr(train, "make_partition", counting("make_partition", train.make_partition, on_meta))
    monkeypatch.setattr(memory, "make_partition", counting("make_partition[guard]", memory.make_partition))
    monkeypatch.setattr(Plan, "stage_context", counting("stage_context", Plan.stage_context))
    monkeypatch.setattr(memory, "_estimate", counting("guard", memory._estimate))
    return counts


def test_one_run_resolves_its_config_once_and_builds_each_piece_once(cli, tmp_path, counted):
    status, out, err = cli(*RUN, "--out", tmp_path, "--ignore-memory-check")
    assert status == 0, err
    assert counted == {"check_config": 1, "make_method": 1, "config_hash": 1, "build_model[meta]": 1,
                       "make_partition[meta]": 1, "build_model": 1, "make_partition": 1, "stage_context": 3}


def test_the_memory_guard_adds_only_its_own_cpu_copy_of_the_stages(cli, tmp_path, counted):
    """The guard measures what each stage keeps by running a step on a copy
    (it must not touch the run's weights, and it runs before the run's
    device memory is taken): one more model, partition and set of workers,
    from the same plan (no second check, method or hash)."""
    status, out, err = cli(*RUN, "--out", tmp_path)
    assert status == 0, err
    assert counted == {"check_config": 1, "make_method": 1, "config_hash": 1, "build_model[meta]": 1,
                       "make_partition[meta]": 1, "build_model": 1, "make_partition": 1, "guard": 1,
                       "build_model[guard]": 1, "make_partition[guard]": 1, "stage_context": 6}


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
