"""PETRA (methods/petra.py) and the reversible networks (models/revnet.py):
inversion, an independent hand computation, what a stage keeps, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fdgbench.config import RunConfig
from fdgbench.data import synthetic_dataset
from fdgbench.method import make_method
from fdgbench.models import build_model, is_reversible
from fdgbench.models.revnet import ReversibleBlock
from fdgbench.optim import SGDConfig
from fdgbench.train import build_run

from .helpers import ToyStream, engine_for, half_sse

U32 = 2.0**-24  # float32's unit roundoff


def _gain(f: nn.Module, x: torch.Tensor, scale: float) -> float:
    """How much ``f`` (float64) amplifies a perturbation of size ``scale``: max |f(x + d) - f(x)| / max |d|."""
    d = scale * torch.randn_like(x)
    with torch.no_grad():
        return float((f(x + d) - f(x)).abs().max() / d.abs().max())


@pytest.mark.parametrize("channels", [8, 32])
def test_inversion_rebuilds_the_input(channels):
    torch.manual_seed(0)
    block = ReversibleBlock(channels).double().train()
    x = torch.randn(4, channels, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        # float64: exact arithmetic but for rounding (unit roundoff 1.1e-16): the sums cancel to 1e-13 of max|y|.
        assert (block.inverse(y) - x).abs().max() <= 1e-13 * y.abs().max()
    # float32: x2 = (x2 + G) - G rounds twice (2u of the largest of x, y; G sees the same y1 both times). x1 =
    # y1 - F(x2') rounds twice too, and F(x2') differs from the forward's F(x2) by F's gain times x2's error
    # (measured in float64) plus F's own float32 evaluation error, once in each evaluation (e_f: float32 F
    # against float64 F on the same input).
    half = channels // 2
    gain = _gain(block.f, x[:, half:], 1e-6)
    with torch.no_grad():
        f64 = block.f(x[:, half:])
        block32, x32 = block.float(), x.float()
        e_f = float((block32.f(x32[:, half:]).double() - f64).abs().max())
        y32 = block32(x32)
        err = (block32.inverse(y32) - x32).abs()
    scale = max(float(x32.abs().max()), float(y32.abs().max()))
    err2 = float(err[:, half:].max())
    assert err2 <= 2 * U32 * scale * 1.01
    assert err[:, :half].max() <= (2 * U32 * scale + gain * err2 + 2 * e_f) * 1.01


def test_inversion_under_bf16_autocast_is_float32_exact():
    """The coupling sums stay float32 under autocast (F and G in bf16 see the
    same values in the forward and the inversion), so the rebuild costs
    float32 roundings, not bf16 ones (2**-8 relative)."""
    torch.manual_seed(0)
    block = ReversibleBlock(16).train()
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
        back = block.inverse(y)
    assert y.dtype == torch.float32
    scale = max(float(x.abs().max()), float(y.abs().max()))
    # F recomputed at x2 rebuilt to 2u: bf16 rounds F's input again, so F's output may move by a bf16
    # step of |F| where x2's rebuild crossed a rounding boundary; far below a bf16 step of the values.
    assert (back - x).abs().max() <= 2.0**-9 * scale
    assert (back - x)[:, 8:].abs().max() <= 2 * U32 * scale * 1.01


@pytest.mark.parametrize("name", ["revnet20", "revnet56", "revnet18", "tiny_revnet"])
def test_reversible_models_keep_their_resnets_blocks(name):
    model = build_model(name)
    resnet = build_model(name.replace("revnet", "resnet") if name != "tiny_revnet" else "tiny_resnet")
    if name != "tiny_revnet":
        assert model.block_names == resnet.block_names  # the same cut points, so the same partitions
    for block in model.blocks:  # a block is reversible exactly where it keeps its input's shape
        x = torch.randn(2, *_input_shape(model, block))
        assert is_reversible(block) == (block(x).shape == x.shape and not isinstance(block, nn.Sequential))


def _input_shape(model, block):
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        for b in model.blocks:
            if b is block:
                return tuple(x.shape[1:])
            x = b(x)


class ScalarCoupling(nn.Module):
    """y1 = x1 + a x2, y2 = x2 + b y1 on two features: a reversible block
    whose gradients are written out by hand below."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([a], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([b], dtype=torch.float64))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.a * x2
        return torch.cat([y1, x2 + self.b * y1], dim=1)

    def inverse(self, y):
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.b * y1
        return torch.cat([y1 - self.a * x2, x2], dim=1)


class Dot(nn.Module):
    def __init__(self, w1: float, w2: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[w1], [w2]], dtype=torch.float64))

    def forward(self, h):
        return h @ self.w


def _hand_petra_three_stages(xs, ys, lr, m, rebuild=True):
    """PETRA, K = 3, stages (a0, b0) coupling, (a1, b1) coupling, (w1, w2)
    dot product, loss 0.5 (out - y)^2, plain SGD, written out by hand.
    Stage k forwards batch t-k and back-propagates batch t-4+k (stage 2: its
    own batch t-2); messages arrive one iteration later. A coupling's
    backward rebuilds its input from the output sent back with the gradient,
    at its current weights (``rebuild=False``: it uses the input it received
    instead, DSP's replay). Every stage steps after the backward of batches
    m-1, 2m-1, ... on the mean of the m gradients."""
    a, b = [0.9, -0.6], [0.5, 1.2]
    w = [0.8, -0.7]
    acc = {k: [0.0, 0.0] for k in range(3)}
    act, sent, kept = {}, {}, {}

    def coupling(k, x):
        x1, x2 = x
        y1 = x1 + a[k] * x2
        return (y1, x2 + b[k] * y1)

    def inverse(k, y):
        y1, y2 = y
        x2 = y2 - b[k] * y1
        return (y1 - a[k] * x2, x2)

    def coupling_backward(k, x, g):
        """(da, db, dx) at input x with output gradient g, current weights."""
        (x1, x2), (g1, g2) = x, g
        y1 = x1 + a[k] * x2
        g_y1 = g1 + b[k] * g2
        return g_y1 * x2, g2 * y1, (g_y1, g2 + a[k] * g_y1)

    def accumulate(k, batch, grads, params):
        acc[k] = [s + d for s, d in zip(acc[k], grads)]
        if (batch + 1) % m == 0:
            new = [p - lr * s / m for p, s in zip(params, acc[k])]
            acc[k] = [0.0, 0.0]
            return new
        return params

    for t in range(len(xs)):
        for k in (0, 1):  # the couplings: backward of batch t-4+k (message of t-1), then forward of batch t-k
            batch = t - 4 + k
            if batch >= 0:
                g, y = sent.pop((k, batch))
                x = inverse(k, y) if rebuild else kept.pop((k, batch))
                da, db, dx = coupling_backward(k, x, g)
                if k == 1:
                    sent[(0, batch, "next")] = (dx, x)
                a[k], b[k] = accumulate(k, batch, (da, db), (a[k], b[k]))
            batch = t - k
            if batch >= 0:
                x = (xs[t], -0.5 * xs[t]) if k == 0 else act.pop((0, batch))
                kept[(k, batch)] = x
                act[(k, batch, "next")] = coupling(k, x)
        batch = t - 2  # the last stage: forward, loss, backward of its batch, send back gradient and input
        if batch >= 0:
            h = act.pop((1, batch))
            r = w[0] * h[0] + w[1] * h[1] - ys[batch]
            sent[(1, batch, "next")] = ((r * w[0], r * w[1]), h)
            w = accumulate(2, batch, (r * h[0], r * h[1]), w)
        for box in (act, sent):  # this iteration's sends arrive in the next
            for key in [key for key in box if key[-1] == "next"]:
                box[key[:-1]] = box.pop(key)
    return [a[0], b[0], a[1], b[1], *w]


@pytest.mark.parametrize("m", [1, 2])
def test_petra_matches_hand_computation(m):
    xs = [1.0, -0.5, 2.0, 0.7, -1.2, 0.3, 1.5, -0.8, 0.4, -1.0, 0.9, 0.2]
    ys = [0.5, 1.0, -1.0, 0.2, 0.9, -0.4, 0.1, 0.6, -0.3, 0.8, -0.2, 0.4]
    lr = 0.1
    stream = ToyStream(lambda t: torch.tensor([[xs[t], -0.5 * xs[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[ys[t]]], dtype=torch.float64))
    modules = [nn.Sequential(ScalarCoupling(0.9, 0.5)), nn.Sequential(ScalarCoupling(-0.6, 1.2)),
               nn.Sequential(Dot(0.8, -0.7))]
    engine, _ = engine_for(make_method("petra", accumulation_steps=m), modules, stream,
                           SGDConfig(lr=lr, momentum=0.0, weight_decay=0.0), half_sse)
    for t in range(len(xs)):
        engine.run_iteration(t)
    got = [modules[0][0].a.item(), modules[0][0].b.item(), modules[1][0].a.item(), modules[1][0].b.item(),
           *modules[2][0].w.flatten().tolist()]
    expected = _hand_petra_three_stages(xs, ys, lr, m)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)  # float64, a few hundred operations
    # Rebuilding the input at the current weights is what makes it PETRA: keeping it (DSP) differs.
    kept = _hand_petra_three_stages(xs, ys, lr, m, rebuild=False)
    assert abs(kept[0] - expected[0]) > 1e-6 and abs(kept[2] - expected[2]) > 1e-6


def test_a_reversible_stage_keeps_no_activation():
    """tiny_revnet cut so that stage 1 is L1.0..L1.1, both reversible: under
    PETRA it keeps nothing for a batch in flight, where FDG's replay (DSP)
    keeps each batch's input; stage 0 (the stem, not reversible) keeps its
    input, the images."""
    data = synthetic_dataset(10, train=64, test=32)
    held, kept = {}, {}
    for method, options in (("petra", {}), ("fdg", {"staleness": "replay"})):
        cfg = RunConfig(method=method, method_options=options, model="tiny_revnet", splits=3,
                        split_at=("L1.0", "L2.0"), dataset="synthetic", batch_size=32, epochs=8, threads=1)
        run = build_run(cfg, dataset=data)
        for t in range(run.hold_span + 3):
            run.memory.watch(t)
            run.engine.run_iteration(t)
        held[method] = run.memory.record()["stage1_memory"]["held_peak"]
        kept[method] = [run.workers[k].store.held_state() for k in (0, 1)]
    one_input = 32 * 8 * 32 * 32 * 4  # a batch's 8 x 32 x 32 float32 activation, stage 1's input
    # Between iterations stage 1 has 2 batches in flight (forwarded, not yet back-propagated).
    assert len(kept["petra"][1]) == len(kept["fdg"][1]) == 2
    assert all(entry["inputs"] == {} for entry in kept["petra"][1])
    assert all(entry["input"].nbytes == one_input for entry in kept["fdg"][1])
    images = 32 * 3 * 32 * 32 * 4
    assert all(list(entry["inputs"]) == [0] and entry["inputs"][0].nbytes == images for entry in kept["petra"][0])
    # Measured (memory.StageProbe, sampled after each forward): both count the messages in flight (the input
    # being consumed, the output and the previous output); replay also keeps the previous batch's input.
    assert held["fdg"] - held["petra"] == one_input


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet20"], "petra: resnet20 has no reversible block; PETRA trains a reversible network"),
    (["--model", "tiny_revnet", "--splits", "9"], "tiny_revnet"),
    (["--model", "tiny_revnet", "--microbatches", "2"], "--microbatches is an option of"),
    (["--model", "tiny_revnet", "--predict", "spectrain"], "--predict is an option of"),
    (["--model", "tiny_revnet", "--accumulation-steps", "0"], "--accumulation-steps must be at least 1"),
])
def test_bad_petra_input_is_one_line(cli, args, message):
    status, _, err = cli("run", "--method", "petra", *args)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def _petra_bf16(k: int, batch: int, epochs: int, engine: str = "sequential") -> RunConfig:
    """PETRA in the converge preset's precision and layout, averaging 2 backward passes per step: rebuilt
    activations in float32 couplings behind bf16 blocks, channels-last messages of two parts."""
    return RunConfig(method="petra", method_options={"accumulation_steps": 2}, model="tiny_revnet", splits=k,
                     dataset="synthetic", batch_size=batch, epochs=epochs, lr=0.05, threads=1, amp="bf16",
                     channels_last=True, engine=engine)


@pytest.mark.slow  # petra's fp32 resume is in test_checkpoint's generic cases; this adds bf16 and accumulation
def test_petra_in_bf16_channels_last_resumes_bit_identically(tmp_path):
    """A checkpoint mid-accumulation, with batches in flight (their kept inputs and dtypes) and messages of
    two parts in flight."""
    from .test_checkpoint import BATCH, EPOCHS, _assert_resumed_equals_clean, _train_clean_and_interrupted
    from fdgbench.runs import RunDirectory

    _train_clean_and_interrupted(None, [_petra_bf16(3, BATCH, EPOCHS)], tmp_path)
    _assert_resumed_equals_clean(RunDirectory(tmp_path / "clean0"), RunDirectory(tmp_path / "cut0"), 3, "petra")


def test_petra_in_bf16_channels_last_matches_on_the_distributed_engine(tmp_path):
    """Messages of two parts (gradient, rebuilt input) in the channels-last wire layout, both directions."""
    from .test_distributed import BATCH, STEPS, _train_distributed, _train_sequential
    from fdgbench.engines.launch import spawn_ranks
    from fdgbench.runs import RunDirectory

    configs = [_petra_bf16(3, BATCH, STEPS)]
    spawn_ranks(3, torch.device("cpu"), _train_distributed, (configs, str(tmp_path)))
    _train_sequential(configs, tmp_path)
    seq, dis = RunDirectory(tmp_path / "s0"), RunDirectory(tmp_path / "d0")
    assert seq.metrics() and [{k: v for k, v in m.items() if k not in ("epoch_seconds", "images_per_s")}
                              for m in seq.metrics()] == \
        [{k: v for k, v in m.items() if k not in ("epoch_seconds", "images_per_s")} for m in dis.metrics()]
    for s in range(3):
        a, b = seq.load_stage(s), dis.load_stage(s)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), s
