"""BP and FDG semantics: K=1 equivalence, schedule facts from real runs,
gradient shrinking, the three staleness modes against hand computation."""
import copy

import pytest
import torch
from torch import nn

from fdgbench.data import synthetic_dataset
from fdgbench.method import all_methods, make_method
from fdgbench.optim import SGDConfig
from fdgbench.runs import RunDirectory
from fdgbench.schedule import Op
from fdgbench.config import RunConfig
from fdgbench.train import build_run, fit

from .helpers import Scale, ToyStream, engine_for, half_sse, model_for

DATA = synthetic_dataset(10, train=256, test=64)


def _trainer(method, k, observer=None, **kw):
    opts = kw.pop("method_options", {})
    cfg = RunConfig(method=method, method_options=opts, model=kw.pop("model", model_for(method)), splits=k,
                    dataset="synthetic", batch_size=kw.pop("batch_size", 32), epochs=kw.pop("epochs", 3), **kw)
    return build_run(cfg, dataset=DATA, observer=observer)


def _run(trainer, steps):
    for t in range(steps):
        trainer.engine.run_iteration(t)
    return {n: v.clone() for s in trainer.stages for n, v in s.state_dict().items()}


def _option(method, name):
    return next((o for o in method.options if o.name == name), None)


def case_id(method: str, options: dict) -> str:
    """A per-method test case's id: the method, then its options
    (``fdg-staleness=stash``), so ``pytest -k fdg`` selects fdg's cases."""
    return "-".join([method, *(f"{k}={v}" for k, v in options.items())])


def _variants(single_stage: bool = False):
    """Every method with each staleness mode and forward variant it offers,
    as (method, options) cases named by case_id.
    With ``single_stage``, ADL at M = 1 and GPipe / 1F1B at one micro-batch (with M > 1 neither is BP at K = 1:
    ADL accumulates M backwards, a pipeline's BatchNorm sees micro-batches)."""
    for m in all_methods():
        base = {name: 1 for name in ("accumulate", "microbatches") if single_stage and _option(m, name)}
        choices = [("staleness", c) for c in (_option(m, "staleness").choices if _option(m, "staleness") else ())]
        choices += [("variant", c) for c in (_option(m, "variant").choices if _option(m, "variant") else ())]
        for options in [{**base, name: value} for name, value in choices] or [base]:
            yield pytest.param(m.name, options, id=case_id(m.name, options))


@pytest.mark.parametrize("method,options", list(_variants(single_stage=True)))
def test_every_method_with_one_stage_equals_bp_exactly(method, options):
    model = model_for(method)
    reference = _run(_trainer("bp", 1, model=model), 6)
    got = _run(_trainer(method, 1, method_options=options, model=model), 6)
    assert reference.keys() == got.keys()
    for name in reference:  # parameters and BN buffers, bit for bit
        assert torch.equal(reference[name], got[name]), name


def test_split_bp_equals_unsplit_bp_exactly():
    reference = _run(_trainer("bp", 1), 6)
    for k in (2, 3, 5):
        got = _run(_trainer("bp", k), 6)
        for name in reference:
            assert torch.equal(reference[name], got[name]), (k, name)


def test_fdg_differs_from_bp_when_split():
    bp, fdg = _run(_trainer("bp", 2), 6), _run(_trainer("fdg", 2), 6)
    assert any(not torch.equal(bp[n], fdg[n]) for n in bp)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_recorded_fdg_forwards_and_backwards_follow_the_delays(k):
    events = []
    trainer = _trainer("fdg", k, observer=lambda t, s, a: events.append((t, s, a.op, a.batch)))
    steps = 4 * k + 3
    _run(trainer, steps)
    for stage in range(k):
        forwards = [(t, b) for t, s, op, b in events if s == stage and op is Op.FORWARD]
        backwards = [(t, b) for t, s, op, b in events if s == stage and op is Op.BACKWARD]
        updates = [t for t, s, op, b in events if s == stage and op is Op.UPDATE]
        assert forwards == [(t, t - stage) for t in range(stage, steps)]
        delay = 2 * (k - 1 - stage)
        assert backwards == [(t, t - 2 * (k - 1) + stage) for t in range(2 * (k - 1) - stage, steps)]
        assert all(t - b == stage + delay for t, b in backwards)  # forward at t-delay, backward at t
        assert updates == [t for t, _ in backwards]  # a step after every backward, none before the first


def test_bp_records_forward_and_backward_of_batch_t_at_iteration_t():
    events = []
    _run(_trainer("bp", 3, observer=lambda t, s, a: events.append((t, s, a.op, a.batch))), 4)
    for s in range(3):  # each stage's whole action list: nothing more, nothing in another order
        mine = [(t, op, b) for t, stage, op, b in events if stage == s and op in (Op.FORWARD, Op.BACKWARD)]
        assert mine == [(t, op, t) for t in range(4) for op in (Op.FORWARD, Op.BACKWARD)]
        assert [t for t, stage, op, _ in events if stage == s and op is Op.UPDATE] == [0, 1, 2, 3]


def test_no_step_before_the_first_gradient():
    trainer = _trainer("fdg", 3)
    stage0 = trainer.stages[0]
    before = copy.deepcopy(stage0.state_dict())
    for t in range(4):  # stage 0's first gradient arrives at iteration 2(K-1) = 4
        trainer.engine.run_iteration(t)
    after = stage0.state_dict()
    params = {n for n, _ in stage0.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in params)
    assert not trainer.workers[0].optimizer.sgd.state  # no momentum buffers yet
    trainer.engine.run_iteration(4)
    assert any(not torch.equal(before[n], stage0.state_dict()[n]) for n in params)


def test_pipeline_is_not_drained_between_epochs(tmp_path):
    events = []
    trainer = _trainer("fdg", 3, observer=lambda t, s, a: events.append((t, s, a.op, a.batch)), epochs=2)
    spe = trainer.steps_per_epoch
    fit(trainer, RunDirectory(tmp_path / "run"))
    stage0 = [b for t, s, op, b in events if s == 0 and op is Op.BACKWARD]
    # Batches forwarded in epoch 1's last iterations are back-propagated in epoch 2.
    assert stage0 == list(range(2 * spe - 4))
    assert (spe, 0, Op.BACKWARD, spe - 4) in events


def _linear_chain(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Sequential(*[_linear(g) for _ in range(2)]) for _ in range(k)]


def _linear(g):
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 4, generator=g) * 0.5)
    return layer


def _grads_at_updates(workers):
    """Record each stage's parameter gradients at every UPDATE."""
    seen = [[] for _ in workers]
    for i, w in enumerate(workers):
        original = w.update

        def update(i=i, original=original, w=w):
            seen[i].append([p.grad.clone() for p in w.module.parameters()])
            original()
        w.update = update
    return seen


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gradient_shrinking_compounds_as_beta_to_the_k(k):
    """With lr = 0 the weights never change, so FDG's delayed gradient for a
    batch equals BP's for that batch; FDG at beta then carries exactly
    beta^(K-1-k) times it at stage k (beta = 0.5 scales exactly in floats)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, generator=g) for _ in range(12)]
    ys = [torch.randn(3, 4, generator=g) for _ in range(12)]
    stream = ToyStream(lambda t: xs[t], lambda t: ys[t])
    frozen = SGDConfig(lr=0.0, momentum=0.0, weight_decay=0.0)
    grads = {}
    for name, beta in (("bp", None), ("fdg", 1.0), ("fdg", 0.5)):
        method = make_method(name, **({} if beta is None else {"beta": beta, "staleness": "legacy"}))
        engine, workers = engine_for(method, _linear_chain(k), stream, frozen, half_sse)
        seen = _grads_at_updates(workers)
        for t in range(12):
            engine.run_iteration(t)
        grads[(name, beta)] = seen
    first = 2 * (k - 1)
    for stage in range(k):
        shrink = 0.5 ** (k - 1 - stage)
        delay_updates = len(grads[("fdg", 0.5)][stage])
        assert delay_updates == 12 - (first - stage)
        for i in range(delay_updates):  # FDG's i-th update at this stage is batch i
            for bp, f1, fb in zip(grads[("bp", None)][stage][i], grads[("fdg", 1.0)][stage][i],
                                  grads[("fdg", 0.5)][stage][i]):
                # Same float32 operations as BP; tolerance only for reduction-order
                # differences between code paths: each element of a 4x4 weight's
                # gradient at batch 3 sums at most 12 products, and summing n terms
                # in another order moves the result by at most n * 2**-24 of their
                # magnitude (12 * 6e-8 = 7e-7 < 1e-6).
                torch.testing.assert_close(f1, bp, rtol=1e-6, atol=0)
                assert torch.equal(fb, f1 * shrink)


def _hand_fdg_two_stages(mode, steps, lr, xs, ys, w1, w2, w3, momentum=0.0, predict=False):
    """FDG, K = 2, on stage 0 = (w1*, w2*), stage 1 = (w3*), loss
    0.5 (y - target)^2, written out by hand: SGD (``momentum``: torch's, no
    dampening). Stage 0's forward follows its own update, so its delay is 1
    update; with ``predict`` (weight prediction) that forward runs at
    w - lr * 1 * buf, its momentum buffer (none before its first step)."""
    sent_act, sent_grad = {}, {}
    held = {}  # what stage 0 keeps for batch b: (x, u at forward, w1 at forward, w2 at forward)
    bufs = {}

    def step(name, w, g):
        bufs[name] = g if name not in bufs else momentum * bufs[name] + g
        return w - lr * bufs[name]

    def ahead(name, w):
        return w - lr * bufs[name] if predict and name in bufs else w

    for t in range(steps):
        new_act, new_grad = {}, {}
        # Stage 0: backward of batch t-2 (gradient sent at t-1), step, forward batch t.
        b = t - 2
        if b >= 0:
            g = sent_grad[b]
            x, u_fwd, w1_fwd, w2_fwd = held.pop(b)
            if mode == "legacy":  # stored activation u, current weights
                d_w2, d_w1 = g * u_fwd, g * w2 * x
            elif mode == "stash":  # everything as at the forward
                d_w2, d_w1 = g * u_fwd, g * w2_fwd * x
            else:  # replay: recompute u with the current w1
                d_w2, d_w1 = g * (w1 * x), g * w2 * x
            w1, w2 = step("w1", w1, d_w1), step("w2", w2, d_w2)
        f1, f2 = ahead("w1", w1), ahead("w2", w2)
        u = f1 * xs[t]
        held[t] = (xs[t], u, f1, f2)
        new_act[t] = f2 * u
        # Stage 1: forward batch t-1 (activation sent at t-1), loss, backward, step.
        b = t - 1
        if b >= 0:
            h = sent_act[b]
            r = w3 * h - ys[b]
            new_grad[b] = r * w3
            w3 = step("w3", w3, r * h)
        sent_act.update(new_act)
        sent_grad.update(new_grad)
    return w1, w2, w3


@pytest.mark.parametrize("mode", ["legacy", "stash", "replay"])
def test_staleness_modes_match_hand_computation(mode):
    xs = [1.0, -0.5, 2.0, 0.7, -1.2, 0.3, 1.5, -0.8]
    ys = [0.5, 1.0, -1.0, 0.2, 0.9, -0.4, 0.1, 0.6]
    lr, steps = 0.1, len(xs)
    stream = ToyStream(lambda t: torch.tensor([[xs[t]]], dtype=torch.float64),
                       lambda t: torch.tensor([[ys[t]]], dtype=torch.float64))
    modules = [nn.Sequential(Scale(0.9), Scale(1.1)), nn.Sequential(Scale(0.8))]
    engine, _ = engine_for(make_method("fdg", staleness=mode), modules, stream,
                           SGDConfig(lr=lr, momentum=0.0, weight_decay=0.0), half_sse)
    for t in range(steps):
        engine.run_iteration(t)
    got = [modules[0][0].w.item(), modules[0][1].w.item(), modules[1][0].w.item()]
    expected = _hand_fdg_two_stages(mode, steps, lr, xs, ys, 0.9, 1.1, 0.8)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)  # float64, a few dozen operations
    others = [_hand_fdg_two_stages(m, steps, lr, xs, ys, 0.9, 1.1, 0.8) for m in ("legacy", "stash", "replay")
              if m != mode]
    assert all(abs(o[0] - expected[0]) > 1e-6 for o in others)  # the modes really differ


def _input_grad_by_hand(x, g, conv_w, conv_b, lin_w, mask):
    """x's gradient through conv -> ReLU (mask) -> flatten -> linear, from
    the output gradient g, with the given conv and linear weights."""
    grad_flat = g.float() @ lin_w.float()
    grad_h = (grad_flat.view(mask.shape) * mask).float()
    return torch.nn.grad.conv2d_input(x.shape, conv_w.float(), grad_h, padding=1)


def test_legacy_under_bf16_autocast_reads_the_current_weights():
    """legacy = stored activations (here the ReLU mask) with the weights as
    they are at the backward; under bf16 autocast too (the graph's bf16
    weight copies are refilled before the backward)."""
    from fdgbench.staleness import make_store

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    store = make_store("legacy", module, delayed=True,
                       autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16), amp_dtype=torch.bfloat16)
    x = torch.randn(4, 2, 4, 4, requires_grad=True)
    out = store.forward(0, x)
    assert out.dtype == torch.bfloat16
    conv, lin = module[0], module[3]
    old = [conv.weight.detach().clone(), lin.weight.detach().clone()]
    with torch.no_grad():
        mask = (torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1) > 0).float()
        for p in module.parameters():  # an update between the forward and the delayed backward
            p.data.add_(torch.randn_like(p))
    g = torch.randn(out.shape).to(torch.bfloat16)
    got = store.backward(0, g)
    current = _input_grad_by_hand(x, g, conv.weight.detach(), conv.bias, lin.weight.detach(), mask)
    forward_time = _input_grad_by_hand(x, g, old[0], conv.bias, old[1], mask)
    # The hand computation is float32; the graph's is bf16 (8-bit mantissa,
    # relative rounding 2**-8 = 0.4% per operation, a few chained roundings
    # and sums of 27-48 terms): within 5% of the norm. The update moved the
    # weights by about their own size, so forward-time weights are far off.
    assert (got - current).norm() < 0.05 * current.norm()
    assert (got - forward_time).norm() > 0.5 * forward_time.norm()
    # The weights' gradients still reach the float32 parameters.
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32


def test_legacy_under_autocast_refuses_layers_whose_casts_it_cannot_refill():
    from fdgbench.errors import UserError
    from fdgbench.staleness import make_store

    module = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 3, 3))
    with pytest.raises(UserError, match="2 is a ConvTranspose2d: use --staleness stash or replay"):
        make_store("legacy", module, delayed=True, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                   amp_dtype=torch.bfloat16)
    make_store("stash", module, delayed=True, amp_dtype=torch.bfloat16)  # stash copies every weight: fine


def test_staleness_modes_differ_under_bf16_autocast():
    """Under bf16 + channels-last, FDG's three modes train (finite weights)
    and stay three different computations."""
    weights = {}
    for mode in ("legacy", "stash", "replay"):
        trainer = _trainer("fdg", 2, method_options={"staleness": mode}, amp="bf16", channels_last=True)
        weights[mode] = _run(trainer, 8)
        assert all(torch.isfinite(v).all() for v in weights[mode].values()), mode
    for a, b in (("legacy", "stash"), ("legacy", "replay"), ("stash", "replay")):
        assert any(not torch.equal(weights[a][n], weights[b][n]) for n in weights[a] if "weight" in n), (a, b)


@pytest.mark.parametrize("method,options", list(_variants()))
@pytest.mark.parametrize("k", [2, 3])
def test_every_method_trains_a_tiny_net(tmp_path, method, options, k):
    # Synthetic gradients start at zero: DNI's first stages learn only once
    # their gradient models have fit, so it gets more epochs; and at lr 0.05
    # its K=3 tiny net collapses (dead ReLUs, zero gradients), so a lower lr.
    # Batch 30: dp splits it into K equal shards, for K = 2 and 3.
    dni = method in ("dni", "cdni")
    trainer = _trainer(method, k, method_options=options, epochs=8 if dni else 3, lr=0.01 if dni else 0.05,
                       batch_size=30)
    before = [copy.deepcopy(s.state_dict()) for s in trainer.stages]
    summary = fit(trainer, RunDirectory(tmp_path / "run"))
    assert summary["status"] == "finished"
    metrics = RunDirectory(tmp_path / "run").metrics()
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # it learns the synthetic classes
    assert summary["final_test_error"] < 80  # chance is 90%
    for k_, (stage, old) in enumerate(zip(trainer.stages, before)):  # every stage was trained
        assert any(not torch.equal(v, old[n]) for n, v in stage.state_dict().items() if "weight" in n), k_
