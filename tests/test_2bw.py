"""PipeDream-2BW (methods/pipedream_2bw.py) against a hand computation of
W(t+1) = W(t) - lr * grad f_t(W(t-1)) on a two-stage scalar chain, every
stage one step late; checkpoints keep both versions. K = 1 (BP exactly), the
schedule, both engines and resume are the generic per-method tests
(pytest -k 2bw)."""
import pytest
import torch

from fdgbench.method import make_method
from fdgbench.optim import SGDConfig

from .helpers import Scale, ToyStream, engine_for, half_sse

LR = 0.1
X = [1.0, 2.0, -1.0, 0.5]
TARGET = [0.5, 1.0, 0.3, -0.2]


def _grads(w0, w1, t):
    """d/dw of 0.5 (w1 w0 x - target)^2 at (w0, w1), by hand."""
    x, y = X[t], TARGET[t]
    r = w1 * w0 * x - y
    return r * w1 * x, r * w0 * x


def test_every_update_applies_the_gradient_at_the_previous_weights_worked_by_hand():
    modules = [Scale(0.8), Scale(1.5)]
    stream = ToyStream(lambda t: torch.tensor([[X[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[TARGET[t]]], dtype=torch.float64))
    engine, workers = engine_for(make_method("2bw"), modules, stream, SGDConfig(lr=LR, momentum=0.0, weight_decay=0.0),
                                 loss_fn=half_sse)
    live = [(0.8, 1.5)]  # W(0); W(-1) = W(0)
    for t in range(len(X)):
        engine.run_iteration(t)
        previous = live[t - 1] if t > 0 else live[0]
        g0, g1 = _grads(*previous, t)
        live.append((live[t][0] - LR * g0, live[t][1] - LR * g1))
        got = (modules[0].w.item(), modules[1].w.item())
        assert got == pytest.approx(live[t + 1], rel=1e-14), t
        # and the older version each stage keeps is W(t) now
        assert (workers[0].previous.w.item(), workers[1].previous.w.item()) == pytest.approx(live[t], rel=1e-14)
    # Not BP: BP's second step uses the gradient at W(1), a different number here.
    bp_second = (live[1][0] - LR * _grads(*live[1], 1)[0])
    assert abs(bp_second - live[2][0]) > 1e-3


def test_the_older_version_is_checkpointed_and_restored():
    modules = [Scale(0.8), Scale(1.5)]
    stream = ToyStream(lambda t: torch.tensor([[X[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[TARGET[t]]], dtype=torch.float64))
    engine, workers = engine_for(make_method("2bw"), modules, stream, SGDConfig(lr=LR), loss_fn=half_sse)
    engine.run_iteration(0)
    state = workers[0].checkpoint_state()
    with torch.no_grad():
        workers[0].previous.w.fill_(7.0)
    workers[0].restore_state(state)
    assert workers[0].previous.w.item() == pytest.approx(0.8)  # W(0), the version the next batch runs on


def test_replicas_are_one_line(cli, tmp_path):
    from .test_bad_input import _run_refused

    _run_refused(cli, tmp_path, ["--method", "2bw", "--replicas", "2"], "2bw runs one replica per stage")
