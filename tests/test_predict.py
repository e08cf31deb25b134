"""Weight prediction (``--predict spectrain``, issue 19 item 3): a delayed
stage's forward runs at W - lr * s * v (v: SGD's momentum buffer, s: the
stage's delay in updates), and the delayed backward sees what its staleness
mode says. Checked against FDG K = 2 on a scalar chain worked by hand with
momentum; K = 1 (no delay) is BP exactly; each delay is the schedule's."""
import pytest
import torch
from torch import nn

from fdgbench.method import make_method
from fdgbench.optim import SGDConfig
from fdgbench.schedule import update_delays

from .helpers import Scale, ToyStream, engine_for, half_sse
from .test_methods import _hand_fdg_two_stages

XS = [1.0, -0.5, 2.0, 0.7, -1.2, 0.3, 1.5, -0.8]
YS = [0.5, 1.0, -1.0, 0.2, 0.9, -0.4, 0.1, 0.6]
LR, MOMENTUM = 0.1, 0.9


def _hand(mode, predict):
    """The hand computation of FDG K=2 (test_methods'), with momentum: stage 0's delay is 1 update."""
    return list(_hand_fdg_two_stages(mode, len(XS), LR, XS, YS, 0.9, 1.1, 0.8, MOMENTUM, predict))


def _fdg_run(mode, predict):
    stream = ToyStream(lambda t: torch.tensor([[XS[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[YS[t]]], dtype=torch.float64))
    modules = [nn.Sequential(Scale(0.9), Scale(1.1)), nn.Sequential(Scale(0.8))]
    engine, _ = engine_for(make_method("fdg", staleness=mode, predict=predict), modules, stream,
                           SGDConfig(lr=LR, momentum=MOMENTUM, weight_decay=0.0), half_sse)
    for t in range(len(XS)):
        engine.run_iteration(t)
    return [modules[0][0].w.item(), modules[0][1].w.item(), modules[1][0].w.item()]


@pytest.mark.parametrize("mode", ["legacy", "stash", "replay"])
def test_fdg_with_prediction_matches_the_hand_computation(mode):
    got = _fdg_run(mode, "spectrain")
    expected = _hand(mode, True)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)  # float64, a few hundred operations
    # Not vacuous: prediction changes the numbers (and the hand computation without it is FDG's).
    plain = _hand(mode, False)
    assert _fdg_run(mode, "none") == pytest.approx(plain, rel=1e-12, abs=1e-12)
    assert abs(plain[0] - expected[0]) > 1e-4


def test_the_forward_runs_at_the_predicted_weights_and_leaves_the_live_ones_exactly():
    stream = ToyStream(lambda t: torch.tensor([[XS[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[YS[t]]], dtype=torch.float64))
    modules = [nn.Sequential(Scale(0.9), Scale(1.1)), nn.Sequential(Scale(0.8))]
    engine, workers = engine_for(make_method("fdg", staleness="stash", predict="spectrain"), modules, stream,
                                 SGDConfig(lr=LR, momentum=MOMENTUM, weight_decay=0.0), half_sse)
    for t in range(3):  # stage 0 first steps at iteration 2
        engine.run_iteration(t)
    w0 = workers[0]
    live = [p.detach().clone() for p in w0.optimizer.params]
    bufs = w0.optimizer.directions()
    x = torch.tensor([[0.7]], dtype=torch.float64)
    out = w0.forward(99, x, None)
    predicted = [p - LR * 1 * v for p, v in zip(live, bufs)]
    assert out.item() == pytest.approx((predicted[1] * predicted[0] * 0.7).item(), rel=1e-14)
    assert all(torch.equal(p, q) for p, q in zip(w0.optimizer.params, live))  # bit for bit


@pytest.mark.parametrize("name", ["fdg", "ddg", "adl"])
def test_one_stage_has_no_delay_and_trains_as_bp(name):
    stream = ToyStream(lambda t: torch.tensor([[XS[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[YS[t]]], dtype=torch.float64))
    weights = {}
    for method, options in ((name, {"predict": "spectrain", **({"accumulate": 1} if name == "adl" else {})}),
                            ("bp", {})):
        modules = [nn.Sequential(Scale(0.9), Scale(1.1))]
        engine, _ = engine_for(make_method(method, **options), modules, stream,
                               SGDConfig(lr=LR, momentum=MOMENTUM, weight_decay=0.0), half_sse)
        for t in range(len(XS)):
            engine.run_iteration(t)
        weights[method] = [m.w.item() for m in modules[0]]
    assert weights[name] == weights["bp"]  # exactly


def test_each_stage_predicts_by_its_delay_in_updates():
    """FDG 2(K-1-k) - 1, DDG K-1-k, the last stage 0; ADL's mean over the batches one update applies."""
    fdg, ddg = make_method("fdg", predict="spectrain"), make_method("ddg", predict="spectrain")
    assert update_delays(fdg.schedule, 4) == [5, 3, 1, 0]
    assert update_delays(ddg.schedule, 4) == [3, 2, 1, 0]
    assert update_delays(make_method("adl", accumulate=2).schedule, 2) == [0.5, 0]


def test_predict_on_a_method_without_delay_is_one_line(cli, tmp_path):
    status, out, err = cli("run", "--method", "bp", "--predict", "spectrain", "--model", "tiny_resnet",
                           "--dataset", "synthetic", "--max-steps", "3", "--out", tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--predict" in err, err
    status, out, err = cli("run", "--method", "fdg", "--predict", "adam", "--model", "tiny_resnet",
                           "--dataset", "synthetic", "--max-steps", "3", "--out", tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "spectrain" in err, err


def _run_config(method, mode, k, **fields):
    from fdgbench.config import RunConfig

    return RunConfig(method=method, method_options={"staleness": mode, "predict": "spectrain"}, splits=k,
                     model="tiny_resnet", dataset="synthetic", lr=0.05, threads=1, deterministic=True, **fields)


@pytest.mark.parametrize("mode", ["legacy", "stash"])
def test_a_predicted_run_resumes_bit_for_bit(mode, tmp_path):
    """Mid-epoch 3 of FDG K=3: batches in flight were forwarded at predicted
    weights, which the checkpoint keeps (legacy's snapshot, stash's copies)."""
    from fdgbench.runs import RunDirectory

    from .test_checkpoint import BATCH, EPOCHS, _assert_resumed_equals_clean, _train_clean_and_interrupted

    cfg = _run_config("fdg", mode, 3, batch_size=BATCH, epochs=EPOCHS)
    _train_clean_and_interrupted(None, [cfg], tmp_path)
    _assert_resumed_equals_clean(RunDirectory(tmp_path / "clean0"), RunDirectory(tmp_path / "cut0"), 3, mode)


@pytest.mark.parametrize("method", ["fdg", pytest.param("ddg", marks=pytest.mark.slow)])
def test_a_predicted_run_is_the_same_on_the_distributed_engine(method, tmp_path):
    from .test_distributed import BATCH, STEPS, _check_parity

    cfg = _run_config(method, "legacy", 3, batch_size=BATCH, epochs=STEPS)
    assert _check_parity(3, [cfg], tmp_path) == [method]
