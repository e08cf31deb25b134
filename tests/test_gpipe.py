"""GPipe and 1F1B (methods/gpipe.py): the update is BP's on the whole batch
up to the order of the floating-point sums (a BatchNorm-free net), M = 1 is
BP exactly, BatchNorm sees micro-batches (its running statistics worked by
hand), the training loss is the batch's, and a bad M is one line. K = 1,
checkpoints and the distributed engine's parity are the generic per-method
tests (pytest -k gpipe)."""
import pytest
import torch
from torch import nn

from fdgbench.method import make_method
from fdgbench.optim import SGDConfig

from .helpers import ToyStream, engine_for
from .test_bad_input import _run_refused

B, STEPS = 8, 3


def _toy():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 6), nn.ReLU()).double(), nn.Linear(6, 3).double()]


def _stream():
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, B, 4, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, 3, (STEPS, B), generator=gen)
    return ToyStream(lambda t: xs[t], lambda t: ys[t])


def _train(method):
    modules = _toy()
    engine, workers = engine_for(method, modules, _stream(), SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4))
    for t in range(STEPS):
        engine.run_iteration(t)
    return [p.detach().clone() for m in modules for p in m.parameters()], workers


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_the_update_is_bps_on_the_whole_batch(name, microbatches):
    bp, _ = _train(make_method("bp"))
    mine, _ = _train(make_method(name, microbatches=microbatches))
    for a, b in zip(mine, bp):
        if microbatches == 1:  # one micro-batch is the batch: the same sums in the same order
            assert torch.equal(a, b)
        else:
            # Float64: a weight's gradient is a sum over the B samples, here in M partial sums each scaled by 1/M,
            # then added; reordering a sum of B terms moves it by at most about B * 2**-53 relative, and three SGD
            # steps (lr 0.1, momentum 0.9) carry that forward without amplifying it beyond a few times: 1e-12 is
            # far above that (~1e-14) and far below any real difference (a micro-batch's gradient alone differs
            # from the batch's by O(1)).
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_1f1b_gives_gpipes_numbers_bit_for_bit(microbatches):
    """The two differ only in when a stage runs which micro-batch, which
    the sequential engine does not act out: the same sums in the same order."""
    gpipe, _ = _train(make_method("gpipe", microbatches=microbatches))
    one_f_one_b, _ = _train(make_method("1f1b", microbatches=microbatches))
    bp, _ = _train(make_method("bp"))
    assert all(torch.equal(a, b) for a, b in zip(one_f_one_b, gpipe))
    assert not all(torch.equal(a, b) for a, b in zip(gpipe, bp))  # not vacuous: M > 1 moves the rounding


def test_the_training_loss_is_the_batchs():
    _, bp = _train(make_method("bp"))
    _, mine = _train(make_method("gpipe", microbatches=4))
    loss_bp, _, n_bp = bp[-1].metrics.totals().tolist()
    loss, _, n = mine[-1].metrics.totals().tolist()
    assert n == n_bp == STEPS * B
    assert loss == pytest.approx(loss_bp, rel=1e-12)  # the same weights up to rounding (above): the same losses


def test_batchnorm_sees_micro_batches():
    """One stage, a BatchNorm1d whose output is the logits: after one
    iteration at M = 2 its running mean took two momentum-0.1 steps, towards
    each half's mean in turn (by hand: 0.9 * 0.1 * mean(first half) + 0.1 *
    mean(second half)); BP takes one, towards the batch's mean."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    means = {}
    for name, m in (("bp", 1), ("gpipe", 2)):
        bn = nn.BatchNorm1d(3).double()
        options = {} if name == "bp" else {"microbatches": m}
        engine, _ = engine_for(make_method(name, **options), [bn], ToyStream(lambda t: x, lambda t: y))
        engine.run_iteration(0)
        means[name] = bn.running_mean.clone()
    torch.testing.assert_close(means["bp"], 0.1 * x.mean(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(means["gpipe"], 0.9 * 0.1 * x[:4].mean(0) + 0.1 * x[4:].mean(0), rtol=1e-15, atol=1e-17)


@pytest.mark.parametrize("args,message", [
    (["--microbatches", "0"], "--microbatches must be at least 1, got 0"),
    (["--microbatches", "3"], "gpipe: --microbatches 3 does not divide the batch of 32"),
])
def test_bad_microbatches_are_one_line(cli, tmp_path, args, message):
    _run_refused(cli, tmp_path, ["--method", "gpipe", *args], message)


def test_microbatches_on_a_method_without_them_is_one_line(cli, tmp_path):
    _run_refused(cli, tmp_path, ["--method", "fdg", "--microbatches", "2"],
                 "--microbatches is an option of gpipe, 1f1b, not fdg")
