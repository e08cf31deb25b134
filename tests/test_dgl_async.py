"""Asynchronous DGL with a replay buffer (methods/dgl_async.py): the buffer's
sampling against a hand-worked sequence, training against a reference loop
written here from the paper's description (not from the method's code),
no slow stage = pipelined DGL exactly, resume with a slow stage on both
engines, and bad options. The schedule's validity, K = 1 and K = 8, the
memory guard and the generic parity and resume tests cover it as every
method (pytest -k dgl-async)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fdgbench.config import RunConfig
from fdgbench.data import synthetic_dataset
from fdgbench.engines.launch import spawn_ranks
from fdgbench.method import make_method
from fdgbench.runs import RunDirectory
from fdgbench.train import build_run

from .test_bad_input import _run_refused
from .test_checkpoint import _assert_resumed_equals_clean, _train_clean_and_interrupted

STEPS = 12
DATA = synthetic_dataset(10, train=96, test=32)


def _activity(pattern):
    """A method's ``steps`` replaced by a hand-written pattern: {stage: iterations it steps at} (others: always)."""
    return lambda k, t: t in pattern[k] if k in pattern else True


def test_the_buffer_serves_the_least_used_entry_newest_first_as_worked_by_hand():
    # Stage 0 steps at iterations 0, 1, 2 and 5 only (training batches 0, 1, 2, 3, sent as 1024 t); stage 1 steps
    # always, from a buffer of M = 2. By hand (entry: sent id, batch, uses):
    # t=1: [0/b0] -> 0.   t=2: [0 (1), 1024/b1] -> 1024.   t=3: 2048/b2 arrives, 0 overwritten -> 2048.
    # t=4: nothing new, [1024 (1), 2048 (1)]: both used once, the newest -> 2048.
    # t=5: [1024 (1), 2048 (2)] -> 1024, the least used.   t=6: 5120/b3 arrives, overwrites 1024 -> 5120.
    method = make_method("dgl-async", buffer=2)
    method.steps = _activity({0: {0, 1, 2, 5}})
    assert [method._forward(0, t) for t in range(7)] == [(None, 0), (None, 1), (None, 2), None, None, (None, 3),
                                                         None]
    assert [method._forward(1, t) for t in range(7)] == [None, (0, 0), (1024, 1), (2048, 2), (2048, 2), (1024, 1),
                                                         (5120, 3)]
    # M = 1 keeps only the newest: at t = 5 it reuses 2048 (batch 2) instead of going back to batch 1.
    method = make_method("dgl-async", buffer=1)
    method.steps = _activity({0: {0, 1, 2, 5}})
    assert [method._forward(1, t) for t in range(7)][5] == (2048, 2)


def test_a_long_run_keeps_a_window_of_the_replay_and_gives_what_a_full_replay_gives(monkeypatch):
    from methods import dgl_async

    full = make_method("dgl-async", buffer=5, slowdown=3.0, slow_stage=1)
    expected = [[full._forward(k, t) for t in range(600)] for k in range(3)]
    monkeypatch.setattr(dgl_async, "KEPT_ITERATIONS", 40)
    windowed = make_method("dgl-async", buffer=5, slowdown=3.0, slow_stage=1)
    got = [[windowed._forward(k, t) for k in range(3)] for t in range(600)]  # as a run asks: iteration by iteration
    assert [[got[t][k] for t in range(600)] for k in range(3)] == expected
    assert all(len(r.forwards) < 2 * 40 for r in windowed._replays)  # the record stays bounded
    assert windowed._forward(2, 10) == expected[2][10]  # a dropped iteration is replayed again


def test_the_slow_stage_steps_at_the_rate_it_is_given_the_same_draws_every_time():
    method = make_method("dgl-async", slowdown=4.0, slow_stage=1)
    pattern = [method.steps(1, t) for t in range(4000)]
    # Binomial(4000, 1/4): standard deviation 27; 5 of them either side.
    assert abs(sum(pattern) - 1000) < 5 * 27
    assert all(method.steps(0, t) and method.steps(2, t) for t in range(100))
    assert pattern == [make_method("dgl-async", slowdown=4.0, slow_stage=1).steps(1, t) for t in range(4000)]


def _trainer(options, k=3, **fields):
    cfg = RunConfig(method="dgl-async", method_options=options, model="tiny_resnet", splits=k, dataset="synthetic",
                    batch_size=16, epochs=10, lr=0.05, threads=1, **fields)
    return build_run(cfg, dataset=DATA)


def _reference(trainer, pattern, size, steps):
    """Asynchronous DGL written out from the paper's description: each stage
    a module (+ auxiliary classifier) with its own SGD; stage k > 0 keeps the
    last ``size`` activations its predecessor produced (output before that
    stage's step, with the batch's labels) and, when it steps, trains on the
    least-used one, the newest among equals; stage 0 takes the next batch."""
    stream = trainer.stream._stream  # the training batches themselves, by index
    num = len(trainer.workers)
    nets = [copy.deepcopy([w.module] + ([w.aux] if k < num - 1 else [])) for k, w in enumerate(trainer.workers)]
    opts = [torch.optim.SGD([p for net in n for p in net.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
            for n in nets]
    buffers = [[] for _ in range(num)]
    sent_before, taken = {}, 0
    for t in range(steps):
        sent = {}
        for k in range(num):
            if k > 0 and k - 1 in sent_before:
                buffers[k] = (buffers[k] + [[*sent_before[k - 1], 0]])[-size:]
            if t not in pattern.get(k, range(steps)):
                continue
            if k == 0:
                x, b = stream.batch(taken)[0], taken
                taken += 1
            elif buffers[k]:
                fewest = min(e[2] for e in buffers[k])
                entry = [e for e in buffers[k] if e[2] == fewest][-1]
                entry[2] += 1
                x, b = entry[0], entry[1]
            else:
                continue
            opts[k].zero_grad()
            out = nets[k][0](x)
            logits = out if k == num - 1 else nets[k][1](out)
            F.cross_entropy(logits, stream.labels(b)).backward()
            opts[k].step()
            if k < num - 1:
                sent[k] = (out.detach(), b)
        sent_before = sent
    return nets


@pytest.mark.parametrize("size", [1, 3])
def test_training_equals_the_reference_loop_with_a_slow_middle_stage(size):
    pattern = {1: {0, 1, 4, 5, 6, 9}}
    trainer = _trainer({"buffer": size, "slowdown": 3.0, "slow_stage": 1})
    trainer.method.steps = _activity(pattern)
    trainer.method._replays.clear()  # building the run replayed the buffers with the real draws
    nets = _reference(trainer, pattern, size, STEPS)
    for t in range(STEPS):
        trainer.engine.run_iteration(t)
    for k, (worker, ref) in enumerate(zip(trainer.workers, nets)):
        mine = [worker.module] + ([worker.aux] if k < len(nets) - 1 else [])
        for a, b in zip(mine, ref):
            for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
                # One computation in one order on both sides (same kernels, same SGD): equal bit for bit.
                assert torch.equal(x, y), (size, k, name)


def test_buffer_size_changes_the_numbers_under_a_slow_stage():
    weights = []
    for size in (1, 3):
        trainer = _trainer({"buffer": size, "slowdown": 3.0, "slow_stage": 0})
        for t in range(STEPS):
            trainer.engine.run_iteration(t)
        weights.append(trainer.stages[2].state_dict())
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in weights[0] if "weight" in n)


def test_without_a_slow_stage_it_is_pipelined_dgl_exactly():
    runs = []
    for method, options in (("dgl-async", {"buffer": 4}), ("dgl", {"variant": "pipelined"})):
        cfg = RunConfig(method=method, method_options=options, model="tiny_resnet", splits=3, dataset="synthetic",
                        batch_size=16, epochs=10, lr=0.05, threads=1)
        trainer = build_run(cfg, dataset=DATA)
        for t in range(STEPS):
            trainer.engine.run_iteration(t)
        runs.append([s.state_dict() for s in trainer.stages] + [w.aux.state_dict() for w in trainer.workers[:-1]])
    for a, b in zip(*runs):
        assert all(torch.equal(a[n], b[n]) for n in a)


def _slow_configs(engine):
    base = dict(model="tiny_resnet", splits=3, dataset="synthetic", batch_size=48, epochs=4, lr=0.05, threads=1,
                engine=engine, deterministic=True)
    return [RunConfig(method="dgl-async", method_options={"buffer": 3, "slowdown": 2.5, "slow_stage": 1}, **base)]


@pytest.mark.parametrize("engine", ["sequential", pytest.param("distributed", marks=pytest.mark.slow)])
def test_a_run_with_a_slow_stage_resumes_bit_identically(engine, tmp_path):
    configs = _slow_configs(engine)
    if engine == "distributed":
        spawn_ranks(3, torch.device("cpu"), _train_clean_and_interrupted, (configs, str(tmp_path)))
    else:
        _train_clean_and_interrupted(None, configs, tmp_path)
    _assert_resumed_equals_clean(RunDirectory(tmp_path / "clean0"), RunDirectory(tmp_path / "cut0"), 3,
                                 f"dgl-async slow {engine}")


@pytest.mark.parametrize("args,message", [
    (["--buffer", "0"], "--buffer must be at least 1, got 0"),
    (["--slowdown", "0.5"], "--slowdown must be at least 1 (1: no slow stage), got 0.5"),
    (["--slow-stage", "2"], "dgl-async: --slow-stage 2 is not a stage of K=2 (0..1)"),
    (["--slow-stage", "-1"], "--slow-stage must be at least 0, got -1"),
    (["--replicas", "2"], "dgl-async runs one replica per stage"),
])
def test_bad_options_are_one_line(cli, tmp_path, args, message):
    _run_refused(cli, tmp_path, ["--method", "dgl-async", *args], message)


def test_slowdown_on_another_method_is_one_line(cli, tmp_path):
    _run_refused(cli, tmp_path, ["--method", "dgl", "--slowdown", "2"], "--slowdown is an option of dgl-async, not dgl")
