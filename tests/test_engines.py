"""Engines behind one interface, chosen from a registry by name: a new engine
is one registration, and nothing above the engines names one."""
import pytest

from fdgbench.config import RunConfig
from fdgbench.plan import check_config
from fdgbench.data import synthetic_dataset
from fdgbench.engines import registry
from fdgbench.engines.sequential import SequentialEngine
from fdgbench.errors import UserError
from fdgbench.runs import RunDirectory
from fdgbench.train import build_run, fit

BASE = dict(method="fdg", model="tiny_resnet", dataset="synthetic", batch_size=32, epochs=2, threads=1)


def test_a_registered_engine_trains_a_run_with_nothing_else_changed(tmp_path, monkeypatch):
    registry.engine_names()  # the built-in engines registered first
    built = []

    def build(run):
        built.append(run.cfg.engine)
        return SequentialEngine(run.method, run.workers, run.stream, run.observer, run.tracer, run.stages, run.probe)

    monkeypatch.setitem(registry._ENGINES, "counted", registry.EngineInfo(
        "counted", "the sequential engine, counting its builds", per_rank=False, build=build,
        describe=lambda run: "counted engine"))
    data = synthetic_dataset(10, train=64, test=32)
    runs, descriptions = {}, {}
    for engine in ("counted", "sequential"):
        trainer = build_run(RunConfig(engine=engine, **BASE), dataset=data)
        descriptions[engine] = trainer.describe()
        runs[engine] = RunDirectory(tmp_path / engine)
        fit(trainer, runs[engine])
    assert built == ["counted"] and descriptions["counted"].endswith(", counted engine")
    assert descriptions["sequential"].endswith(", sequential engine, 1 thread(s)")
    # The same computation through the registry's door: the same numbers.
    assert [m["test_error"] for m in runs["counted"].metrics()] == [m["test_error"] for m in runs["sequential"].metrics()]
    assert runs["counted"].read_json("config.json")["engine"] == "counted"


def test_an_unknown_engine_is_one_line_naming_the_registered_ones():
    with pytest.raises(UserError, match=r"^unknown engine 'nope' \(--engine\); known: sequential, distributed"):
        check_config(RunConfig(engine="nope", **BASE))


def test_what_an_engine_refuses_comes_from_its_registration():
    # --diagnose needs an engine that diagnoses; the distributed engine's own check refuses --stage-devices.
    with pytest.raises(UserError, match="--diagnose runs on the sequential engine"):
        check_config(RunConfig(engine="distributed", diagnose=5, **BASE))
    assert registry.engine_info("sequential").diagnoses and not registry.engine_info("distributed").diagnoses
    assert [registry.engine_info(n).per_rank for n in ("sequential", "distributed")] == [False, True]
