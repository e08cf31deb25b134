"""K up to 16 (issue 20): every method's schedule, memory estimate, training
and gradient diagnostics at K = 8 and 16 on a tiny deep net (ResNet-32 at
widths 4/8/16: 17 blocks), sequential engine."""
import copy

import pytest
import torch

from fdgbench.config import RunConfig
from fdgbench.plan import check_config
from fdgbench.method import make_method
from fdgbench.memory import estimate
from fdgbench.runs import RunDirectory
from fdgbench.schedule import horizon, steps_until_every_stage_updates, validate
from fdgbench.train import build_run, fit

from .helpers import model_for
from .test_methods import DATA, _variants

MODEL = "tiny_deep_resnet"


def _config(method, options, k, **fields):
    # Batch 16: dp splits it into K shards of 2 at K = 8 (BatchNorm needs more than one value per channel).
    return RunConfig(method=method, method_options=options, model=model_for(method, MODEL), splits=k,
                     dataset="synthetic", batch_size=16, **fields)


@pytest.mark.parametrize("method,options", list(_variants()))
@pytest.mark.parametrize("k", [8, 16])
def test_every_schedule_is_valid_and_every_stage_steps_at_large_k(method, options, k):
    m = make_method(method, **options)
    validate(m.schedule, k, horizon(k))
    assert steps_until_every_stage_updates(m.schedule, k) <= horizon(k)


@pytest.mark.parametrize("method,options", list(_variants()))
def test_every_method_estimates_its_memory_at_k16(method, options):
    cfg = _config(method, options, 16, epochs=1)
    check_config(cfg)
    stages = estimate(cfg, (3, 32, 32), 10)
    assert len(stages) == (1 if method == "dp" else 16)
    assert all(sum(s.state.values()) > 0 and s.held_bytes(16) > 0 for s in stages)


# One case per family by default (a delayed-gradient method, a local-learning one with a buffer, one with
# auxiliary nets shaped after the rest of the network, a micro-batched pipeline); every case is slow.
DEFAULT_AT_K8 = {"fdg-staleness=legacy", "dgl-async", "auglocal", "gpipe"}


def _k8_cases():
    for case in _variants():
        marks = () if case.id in DEFAULT_AT_K8 else (pytest.mark.slow,)
        yield pytest.param(*case.values, id=case.id, marks=marks)


@pytest.mark.parametrize("method,options", list(_k8_cases()))
def test_every_method_trains_every_stage_at_k8(tmp_path, method, options):
    """Every stage steps and stays finite once the pipeline has filled (FDG's
    stage 0 first steps at iteration 2(K-1) = 14), and the run records a
    test score."""
    probe = make_method(method, **options)
    steps = steps_until_every_stage_updates(probe.schedule, 8) + 2
    # 256 synthetic images at batch 16: 16 iterations per epoch.
    epochs = -(-steps // 16)
    trainer = build_run(_config(method, options, 8, epochs=epochs, max_steps=steps, lr=0.02), dataset=DATA)
    before = [copy.deepcopy(s.state_dict()) for s in trainer.stages]
    summary = fit(trainer, RunDirectory(tmp_path / "run"))
    assert summary["status"] == "finished"
    assert len(trainer.stages) == (1 if method == "dp" else 8)
    for k, (stage, old) in enumerate(zip(trainer.stages, before)):
        state = stage.state_dict()
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), k
        assert any(not torch.equal(v, old[n]) for n, v in state.items() if "weight" in n), k
    assert 0 <= summary["final_test_error"] <= 100
