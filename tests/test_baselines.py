"""DDG, FR, DGL, DNI/cDNI and ADL: schedule facts from real runs and each
method's defining property."""
import copy

import pytest
import torch
from torch import nn

from fdgbench.data import synthetic_dataset
from fdgbench.method import all_methods, make_method
from fdgbench.optim import SGDConfig
from fdgbench.schedule import Op
from fdgbench.config import RunConfig
from fdgbench.train import build_run

from .helpers import ToyStream, engine_for, half_sse
from .test_methods import case_id

DATA = synthetic_dataset(10, train=256, test=64)


def _trainer(method, k, observer=None, lr=0.05, **options):
    cfg = RunConfig(method=method, method_options=options, model="tiny_resnet", splits=k, dataset="synthetic",
                    batch_size=32, epochs=3, lr=lr)
    return build_run(cfg, dataset=DATA, observer=observer)


def _events(method, k, steps, **options):
    events = []
    trainer = _trainer(method, k, lambda t, s, a: events.append((t, s, a.op, a.batch)), **options)
    for t in range(steps):
        trainer.engine.run_iteration(t)
    return events


def _expected(method, options, k, K, t):
    """(op, batch) pairs stage k must run at iteration t, per the method's papers."""
    last = k == K - 1
    if method in ("ddg", "fr"):
        b = t - (K - 1 - k)
        return {(Op.FORWARD, t)} | ({(Op.BACKWARD, b), (Op.UPDATE, None)} if b >= 0 else set())
    if method == "adl":
        f, b, m = t - k, t - 2 * (K - 1) + k, options["accumulate"]
        out = {(Op.FORWARD, f)} if f >= 0 else set()
        if b >= 0:
            out |= {(Op.BACKWARD, b)} | ({(Op.UPDATE, None)} if (b + 1) % m == 0 else set())
        return out
    f = t if options["variant"] == "sync" else t - k
    if f < 0:
        return set()
    out = {(Op.FORWARD, f), (Op.BACKWARD if last else Op.LOCAL, f), (Op.UPDATE, None)}
    if method in ("dni", "cdni") and not last:
        target = t if options["variant"] == "sync" else t - k - 2
        out |= {(Op.BACKWARD, target)} if target >= 0 else set()
    return out


CASES = [pytest.param(method, options, id=case_id(method, options)) for method, options in [
    ("ddg", {}), ("fr", {}), ("adl", {"accumulate": 3}), ("dgl", {"variant": "sync"}),
    ("dgl", {"variant": "pipelined"}), ("cdni", {"variant": "sync"}), ("cdni", {"variant": "pipelined"})]]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("K", [2, 3, 4])
def test_recorded_actions_follow_the_schedule(method, options, K):
    steps = 3 * K + 4
    events = _events(method, K, steps, **options)
    for t in range(steps):
        for k in range(K):
            got = {(op, b) for tt, s, op, b in events if tt == t and s == k and op in
                   (Op.FORWARD, Op.BACKWARD, Op.LOCAL, Op.UPDATE)}
            assert got == _expected(method, options, k, K, t), (t, k)


def test_dgl_sends_no_gradient_across_a_boundary():
    events = _events("dgl", 3, 6, variant="sync")
    assert not [e for e in events if e[2] in (Op.SEND_GRAD, Op.RECV_GRAD)]
    # Stage 0's training is the same whatever the later stages are.
    runs = []
    for perturb in (False, True):
        trainer = _trainer("dgl", 2, variant="sync")
        if perturb:
            with torch.no_grad():
                for p in trainer.stages[1].parameters():
                    p.mul_(3.0).add_(0.1)
        for t in range(8):
            trainer.engine.run_iteration(t)
        runs.append(trainer.stages[0].state_dict())
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_dgl_pipelined_gives_the_sync_numbers():
    """Without gradients between stages, stage k's n-th batch sees the same
    state either way; pipelined, it is processed k iterations later."""
    n, K = 6, 3
    sync = _trainer("dgl", K, variant="sync")
    for t in range(n):
        sync.engine.run_iteration(t)
    piped = _trainer("dgl", K, variant="pipelined")
    snapshots = {}
    for t in range(n + K - 1):
        piped.engine.run_iteration(t)
        for k in range(K):
            if t == n - 1 + k:
                snapshots[k] = copy.deepcopy(piped.stages[k].state_dict())
    for k in range(K):
        expected = sync.stages[k].state_dict()
        assert all(torch.equal(expected[name], snapshots[k][name]) for name in expected), k


def test_fr_replays_the_forward_before_the_backward():
    """FR's first forward builds no graph and the backward recomputes it, so
    stage 0's BN layers count one forward per iteration plus one per backward."""
    n, K = 7, 3
    counts = {}
    for method in ("ddg", "fr"):
        trainer = _trainer(method, K)
        for t in range(n):
            trainer.engine.run_iteration(t)
        bn = next(m for m in trainer.stages[0].modules() if isinstance(m, nn.BatchNorm2d))
        counts[method] = int(bn.num_batches_tracked)
    backwards = n - (K - 1)
    assert counts == {"ddg": n, "fr": n + backwards}


def test_fr_first_stage_lr_scale():
    trainer = _trainer("fr", 2, first_stage_lr_scale=2.0)
    for w in trainer.workers:
        w.set_lr(0.05)
    assert [w.optimizer.sgd.param_groups[0]["lr"] for w in trainer.workers] == [0.1, 0.05]


def test_adl_sums_or_averages_the_accumulated_gradients():
    """Linear toy, plain SGD: ADL(M=2) steps once per two backwards with the
    sum of their gradients; --accumulate-mean steps half as far."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, generator=g) for _ in range(8)]
    stream = ToyStream(lambda t: xs[t], lambda t: torch.zeros(2, 3))
    deltas = {}
    for mean in (False, True):
        torch.manual_seed(0)
        modules = [nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)]
        start = modules[0].weight.detach().clone()
        engine, _ = engine_for(make_method("adl", accumulate=2, accumulate_mean=mean), modules, stream,
                               SGDConfig(lr=0.1, momentum=0.0, weight_decay=0.0), half_sse)
        for t in range(3):  # stage 0 back-propagates batch 0 at t=2: no step yet
            engine.run_iteration(t)
        assert torch.equal(modules[0].weight, start)
        engine.run_iteration(3)  # batch 1: the second backward, the first step
        deltas[mean] = modules[0].weight.detach() - start
    assert deltas[False].abs().sum() > 0
    # Deltas are differences of float32 weights of size ~0.5: ~6e-8 rounding each.
    torch.testing.assert_close(deltas[False], 2 * deltas[True], rtol=0, atol=1e-6)
    assert deltas[False].abs().min() > 1e-4  # far above that tolerance


def test_cdni_synthetic_gradient_loss_decreases():
    """150 steps on the tiny net (lr 0.01: at 0.05 DNI's tiny net can
    collapse): M_0's regression error on the true gradients falls (measured
    under ATEN_CPU_CAPABILITY default, avx2 and avx512: 0.0737 over the first
    50 steps, 0.0254 over the last 50, a ratio of 0.34-0.35; 0.014 by step 300)."""
    trainer = _trainer("cdni", 2, variant="sync", lr=0.01)
    meter = trainer.workers[0].meters["sg_loss"]
    for t in range(50):
        trainer.engine.run_iteration(t)
    early = meter.take()
    for t in range(50, 150):
        trainer.engine.run_iteration(t)
        if t == 99:
            meter.take()
    late = meter.take()
    print(f"sg_loss: first 50 steps {early:.4f}, last 50 steps {late:.4f}")
    assert late < 0.5 * early, (early, late)


def test_synthetic_gradients_start_at_zero():
    trainer = _trainer("cdni", 2)
    worker = trainer.workers[0]
    h = torch.randn(4, *trainer.workers[0].ctx.output_shape)
    assert torch.equal(worker.sg(h, torch.arange(4)), torch.zeros_like(h))


@pytest.mark.parametrize("args,message", [
    (["--method", "fdg", "--accumulate", "2"], "--accumulate is an option of adl, not fdg"),
    (["--method", "bp", "--variant", "pipelined"], "--variant is an option of dgl, dni, cdni, not bp"),
    (["--method", "ddg", "--staleness", "replay"], "--staleness must be one of legacy, stash"),
    (["--method", "adl", "--accumulate", "0"], "--accumulate must be at least 1"),
    (["--method", "cdni", "--sg-kernel", "4"], "--sg-kernel must be 3 or 5"),
    (["--method", "fr", "--first-stage-lr-scale", "-1"], "--first-stage-lr-scale must be positive"),
])
def test_method_options_are_checked(cli, args, message):
    status, _, err = cli("run", *args)
    assert status == 2 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("method", [m.name for m in all_methods()])
def test_schedule_show_prints_every_method(cli, method):
    status, out, _ = cli("schedule", "show", "--method", method, "--splits", "3", "--iterations", "4")
    assert status == 0 and out.count("\n") >= 7
