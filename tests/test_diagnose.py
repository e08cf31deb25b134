"""--diagnose: the recorded cosine, norm ratio and age against a hand
computation; K = 1 gives cosine 1 for every method; a diagnosed run trains
exactly as an undiagnosed one."""
import math

import pytest
import torch
from torch import nn

from fdgbench.diagnose import GradientProbe
from fdgbench.engines.sequential import SequentialEngine
from fdgbench.method import make_method
from fdgbench.optim import SGDConfig
from fdgbench.stage import StageContext
from fdgbench.train import fit

from .helpers import Scale, ToyStream, half_sse
from .test_methods import _run, _trainer, _variants

XS = [1.0, -0.5, 2.0, 0.7, -1.2, 0.3, 1.5, -0.8]
YS = [0.5, 1.0, -1.0, 0.2, 0.9, -0.4, 0.1, 0.6]
LR = 0.1


def _hand_records(steps):
    """FDG K=2, legacy, plain SGD on stage 0 = (w1*, w2*), stage 1 = (w3*),
    loss 0.5 (w3 w2 w1 x - y)^2, by hand: at each update, the applied
    gradient, the true gradient of the same batch at the current weights
    (stage 0 updates before stage 1 within an iteration) and the age."""
    w1, w2, w3 = 0.9, 1.1, 0.8
    held, sent_act, sent_grad, forward_at = {}, {}, {}, {}
    updates = [0, 0]
    out = []

    def true_grads(b):
        x = XS[b]
        r = w3 * w2 * w1 * x - YS[b]
        return (r * w3 * w2 * x, r * w3 * w1 * x), (r * w2 * w1 * x,)

    for t in range(steps):
        new_act, new_grad = {}, {}
        b = t - 2
        if b >= 0:  # stage 0: backward of batch t-2 (stored u, current weights), update, forward t
            x, u = held.pop(b)
            applied = (sent_grad[b] * w2 * x, sent_grad[b] * u)
            out.append((t, 0, applied, true_grads(b)[0], updates[0] - forward_at[(0, b)]))
            w1, w2 = w1 - LR * applied[0], w2 - LR * applied[1]
            updates[0] += 1
        forward_at[(0, t)] = updates[0]
        u = w1 * XS[t]
        held[t] = (XS[t], u)
        new_act[t] = w2 * u
        b = t - 1
        if b >= 0:  # stage 1: forward batch t-1, loss, backward, update
            forward_at[(1, b)] = updates[1]
            h = sent_act[b]
            r = w3 * h - YS[b]
            new_grad[b] = r * w3
            applied = (r * h,)
            out.append((t, 1, applied, true_grads(b)[1], updates[1] - forward_at[(1, b)]))
            w3 = w3 - LR * applied[0]
            updates[1] += 1
        sent_act.update(new_act)
        sent_grad.update(new_grad)
    return out


def test_recorded_cosine_ratio_and_age_match_the_hand_computation():
    stream = ToyStream(lambda t: torch.tensor([[XS[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[YS[t]]], dtype=torch.float64))
    modules = [nn.Sequential(Scale(0.9), Scale(1.1)), nn.Sequential(Scale(0.8))]
    method = make_method("fdg", staleness="legacy")
    optim = SGDConfig(lr=LR, momentum=0.0, weight_decay=0.0)
    workers = [method.make_worker(StageContext(i, 2, m, torch.device("cpu"), optim, half_sse))
               for i, m in enumerate(modules)]
    probe = GradientProbe(1, workers, stream)
    engine = SequentialEngine(method, workers, stream, probe=probe)
    for t in range(len(XS)):
        engine.run_iteration(t)
    got = {(r["iteration"], r["stage"]): r for r in probe.take()}
    expected = _hand_records(len(XS))
    assert sorted(got) == sorted((t, k) for t, k, *_ in expected)
    ages = set()
    for t, k, applied, true, age in expected:
        dot = sum(a * b for a, b in zip(applied, true))
        na, nt = math.hypot(*applied), math.hypot(*true)
        r = got[(t, k)]
        # float64 throughout, a few dozen operations: agreement to 1e-12 relative
        assert r["cosine"] == pytest.approx(dot / (na * nt), rel=1e-12), (t, k)
        assert r["norm_ratio"] == pytest.approx(na / nt, rel=1e-12), (t, k)
        assert r["age"] == age, (t, k)
        ages.add((k, age))
    assert ages == {(0, 0), (0, 1), (1, 0)}  # stage 0's first update is of a batch forwarded before any
    assert any(r["cosine"] < 0.999 for r in got.values() if r["stage"] == 0)  # delay makes it differ


@pytest.mark.parametrize("method,options", list(_variants(single_stage=True)))
def test_with_one_stage_every_method_applies_the_true_gradient(method, options):
    trainer = _trainer(method, 1, method_options=options, diagnose=1, batch_size=30)
    _run(trainer, 3)
    records = trainer.probe.take()
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for r in records:
        # The applied and true gradients come from the same computation on the
        # same weights and batch, so they are equal; the cosine is a float64
        # dot over the norms' product (~2e4 terms, rounding well under 1e-9).
        assert r["norm_ratio"] == 1.0 and r["cosine"] == pytest.approx(1.0, abs=1e-9) and r["age"] == 0


@pytest.mark.parametrize("method,options", [("fdg", {"staleness": "legacy"}), ("dgl", {}), ("fr", {})])
def test_a_diagnosed_run_trains_exactly_as_an_undiagnosed_one(method, options):
    plain = _run(_trainer(method, 3, method_options=options), 10)
    diagnosed_trainer = _trainer(method, 3, method_options=options, diagnose=2)
    diagnosed = _run(diagnosed_trainer, 10)
    assert diagnosed_trainer.probe.records  # it measured something
    for name, value in plain.items():  # weights and BN running statistics
        assert torch.equal(value, diagnosed[name]), name


def test_diagnostics_reach_the_epoch_records(tmp_path):
    from fdgbench.runs import RunDirectory

    trainer = _trainer("fdg", 2, diagnose=4, epochs=2)
    fit(trainer, RunDirectory(tmp_path / "run"))
    metrics = RunDirectory(tmp_path / "run").metrics()
    steps = trainer.steps_per_epoch
    first_update = {0: 2, 1: 1}  # FDG, K = 2: stage 1 updates from iteration 1, stage 0 from 2
    for epoch, record in enumerate(metrics):
        for k, first in first_update.items():
            its = [r["iteration"] for r in record["diagnostics"] if r["stage"] == k]
            # Each stage's first update at or after every multiple of 4.
            expected = sorted({max(m, first) for m in range(0, 2 * steps, 4)})
            assert its == [t for t in expected if epoch * steps <= t < (epoch + 1) * steps], (epoch, k)


@pytest.mark.parametrize("method,options", [("dni", {}), ("cdni", {}), ("adl", {"accumulate": 2})])
def test_each_record_holds_the_batches_that_fed_the_update(method, options):
    """DNI fits its gradient model with a BACKWARD after the update that
    applied the synthetic gradient (nothing reaches the stage's .grad then);
    ADL updates every M-th iteration, so a phase that never meets t % N == 0
    must still be measured."""
    trainer = _trainer(method, 3, method_options=options, diagnose=2)
    _run(trainer, 16)
    records = trainer.probe.take()
    per_stage = {k: [r for r in records if r["stage"] == k] for k in range(3)}
    assert all(per_stage[k] for k in range(3)), {k: len(v) for k, v in per_stage.items()}
    m = options.get("accumulate", 1)
    for r in records:
        assert len(r["batches"]) == m, r  # one synthetic gradient (DNI) or M accumulated batches (ADL)


def test_diagnostics_sweep_plot_and_summary(cli, tmp_path):
    """A two-column spec on the tiny net: the sweep records diagnostics, the
    plot writes PNG and SVG, and the summary's medians are the records'."""
    import json
    import statistics

    spec = tmp_path / "diag.toml"
    spec.write_text("""title = "Diag test"
dataset = "synthetic"
[[columns]]
id = "FDG"
method = "fdg"
[[columns]]
id = "DGL"
method = "dgl"
[[rows]]
id = "Tiny K=2"
model = "tiny_resnet"
splits = 2
paper = {}
[presets.smoke]
epochs = 2
max_steps = 12
train_subset = 256
test_subset = 64
batch_size = 32
diagnose = 2
""")
    status, out, err = cli("sweep", str(spec), "--preset", "smoke", "--out", tmp_path / "runs")
    assert status == 0, err
    status, out, err = cli("plot", "diagnostics", str(spec), "--preset", "smoke", "--out", tmp_path / "runs",
                           "--plot-out", tmp_path / "cos")
    assert status == 0, err
    assert (tmp_path / "cos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cos.svg").read_text().lstrip().startswith("<?xml")
    summary = (tmp_path / "cos.md").read_text()
    fdg_run = next(p for p in (tmp_path / "runs" / "diag-smoke").iterdir() if p.name.startswith("fdg"))
    records = [d for line in (fdg_run / "metrics.jsonl").read_text().splitlines()
               for d in json.loads(line)["diagnostics"]]
    stage0 = [d for d in records if d["stage"] == 0]
    cell = (f"{statistics.median(d['cosine'] for d in stage0):.3f} / "
            f"{statistics.median(d['norm_ratio'] for d in stage0):.2f} / 1")
    assert f"| FDG | {cell} | " in summary
    assert "| DGL | " in summary and "| DGL | - |" not in summary
