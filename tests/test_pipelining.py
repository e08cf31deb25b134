"""GPipe and 1F1B through torch.distributed.pipelining (engines/pipelining.py)
on gloo: the library's weights after N steps equal the sequential
reference's within the rounding that its order of operations allows, at
K = 2 and 3 and M = 1, 2, 4; the configs it cannot run yet are one line."""
from pathlib import Path

import pytest
import torch

from fdgbench.config import RunConfig
from fdgbench.data import synthetic_dataset
from fdgbench.engines.launch import spawn_ranks
from fdgbench.runs import RunDirectory
from fdgbench.train import build_run, fit

from .test_bad_input import _run_refused
from .test_distributed import _train_sequential

BATCH, STEPS = 48, 6  # one batch per epoch: metrics.jsonl holds every iteration's training loss


def _data():
    return synthetic_dataset(10, train=BATCH, test=64)


def _configs(k):
    return [RunConfig(method=method, method_options={"microbatches": m}, model="tiny_resnet", splits=k,
                      dataset="synthetic", batch_size=BATCH, epochs=STEPS, lr=0.05, threads=1)
            for method, m in (("gpipe", 1), ("gpipe", 2), ("gpipe", 4), ("1f1b", 4), ("gpipe", 3))]


def _train_library(rank, configs, root):
    for i, cfg in enumerate(configs):
        cfg = RunConfig(**{**cfg.__dict__, "engine": "pipelining"})
        fit(build_run(cfg, dataset=_data(), rank=rank), RunDirectory(Path(root) / f"p{i}"))


# K = 2 by default (two ranks start faster); K = 3 adds a middle rank (slow: 35 s here).
@pytest.mark.parametrize("k", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_the_librarys_schedules_give_the_sequential_references_weights(k, tmp_path):
    configs = _configs(k)
    spawn_ranks(k, torch.device("cpu"), _train_library, (configs, str(tmp_path)))
    _train_sequential(configs, tmp_path)  # the same data (synthetic, one batch of 48 per epoch)
    finals = []
    for i, cfg in enumerate(configs):
        seq, lib = RunDirectory(tmp_path / f"s{i}"), RunDirectory(tmp_path / f"p{i}")
        label = f"{cfg.method} M={cfg.method_options['microbatches']} K={k}"
        assert lib.read_json("config.json")["engine"] == "pipelining" and lib.is_done, label
        # The library runs the modules itself: no per-stage memory is recorded rather than a state-only one.
        assert not any("memory" in key for key in lib.read_json("summary.json")), label
        # The library divides the M micro-batches' accumulated gradient by M after the backward; the reference
        # divides each micro-batch's loss by M before it, the micro-batches in the same order. For M a power of
        # two the scaling is exact either way: the same bits (measured: identical at M = 1, 2, 4, both
        # schedules). For M = 3 each scaling rounds: a unit of 2**-24 per gradient entry and step, which six SGD
        # steps carry through BatchNorm into every tensor of the stage. Measured against the largest entry of the
        # stage's state (its BatchNorm running variances, 2-8 here), the worst difference was 0.5-2.7 eps of it
        # (eps = 2**-23; an AMD EPYC, K = 2 and 3, ATEN_CPU_CAPABILITY default, avx2 and avx512; an Intel Xeon's
        # earlier 9e-7 of each tensor's largest entry is at most 7.5 eps of the stage's). Against each tensor's
        # own largest entry it is not bounded: a BatchNorm bias near zero differed by 2e-5 of itself on the AMD
        # EPYC. 32 eps of the stage's largest entry (3e-5 here) bounds both machines' four times over or more,
        # while another M moves the weights by 1e-3 and more (checked below).
        exact = cfg.method_options["microbatches"] & (cfg.method_options["microbatches"] - 1) == 0
        for s in range(k):
            a, b = seq.load_stage(s), lib.load_stage(s)
            assert a.keys() == b.keys()
            floats = [name for name in a if a[name].is_floating_point()]
            tolerance = 32 * torch.finfo(torch.float32).eps * max(a[name].abs().max() for name in floats)
            for name in a:
                if exact or name not in floats:
                    assert torch.equal(a[name], b[name]), (label, s, name)
                else:
                    assert (a[name] - b[name]).abs().max() <= tolerance, (label, s, name)
        for x, y in zip(seq.metrics(), lib.metrics()):
            # The library reports each micro-batch's mean loss (averaged here), the reference sums per-sample
            # losses: the same number in another float32 rounding (1e-8 relative measured).
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6), label
            assert y["test_loss"] == pytest.approx(x["test_loss"], rel=1e-5 if not exact else 0), label
        finals.append(lib.load_stage(0))
    # Not vacuous: M = 1 and M = 4 (BatchNorm over 48 against 12 samples) end far apart.
    diff = max((finals[0][n].float() - finals[2][n].float()).abs().max().item() for n in finals[0])
    assert diff > 1e-3


@pytest.mark.parametrize("args,message", [
    (["--method", "fdg"], "--engine pipelining runs gpipe, 1f1b (torch.distributed.pipelining's schedules), not fdg"),
    (["--method", "gpipe", "--replicas", "2"], "--engine pipelining does not take --replicas yet"),
    (["--method", "gpipe", "-K", "1"], "--engine pipelining runs a pipeline of K >= 2 stages"),
    (["--method", "1f1b", "-K", "3", "--microbatches", "2"],
     "1f1b on --engine pipelining needs at least one micro-batch per stage: --microbatches 2 < 3 stages"),
    (["--method", "gpipe", "--trace"], "--trace times the actions an engine runs itself"),
])
def test_what_the_library_engine_cannot_run_yet_is_one_line(cli, tmp_path, args, message):
    _run_refused(cli, tmp_path, ["--engine", "pipelining", *args], message)


@pytest.mark.slow
def test_a_library_run_resumes_bit_identically(tmp_path):
    """Interrupted mid-epoch and resumed from its checkpoint: the pipeline
    drains in every step(), so the checkpoint is the stages' state alone."""
    from .test_checkpoint import BATCH as CKPT_BATCH, EPOCHS, _assert_resumed_equals_clean, _train_clean_and_interrupted

    cfg = RunConfig(method="1f1b", method_options={"microbatches": 4}, model="tiny_resnet", splits=2,
                    dataset="synthetic", batch_size=CKPT_BATCH, epochs=EPOCHS, lr=0.05, threads=1,
                    engine="pipelining")
    spawn_ranks(2, torch.device("cpu"), _train_clean_and_interrupted, ([cfg], str(tmp_path)))
    _assert_resumed_equals_clean(RunDirectory(tmp_path / "clean0"), RunDirectory(tmp_path / "cut0"), 2,
                                 "1f1b pipelining")


def test_the_library_under_bf16_and_channels_last_gives_the_sequential_references_weights(tmp_path):
    """--amp bf16 --channels-last through the library (engines/pipelining.RunSettingsStage: autocast around
    the stage, channels-last inside it, NCHW on the wire, gradients included) at K = 2, M = 4: bit for bit
    the sequential reference's weights and losses, as in float32 (M a power of two: scaling the loss before
    the backward or the gradient after it is exact, in bf16 too: a power of two moves only the exponent)."""
    # Cut before L1.0, a block with an identity shortcut: the input gradient of stage 1 comes out of its convs
    # channels-last, which the library would lay out its receive buffer by (and gloo refuse) unless the stage
    # hands it back NCHW (a cut before a downsampling block hides it: its shortcut's gradient is NCHW).
    configs = [RunConfig(**{**_configs(2)[2].__dict__, "amp": "bf16", "channels_last": True, "split_at": ("L1.0",)})]
    assert configs[0].method_options == {"microbatches": 4}
    spawn_ranks(2, torch.device("cpu"), _train_library, (configs, str(tmp_path)))
    _train_sequential(configs, tmp_path)
    seq, lib = RunDirectory(tmp_path / "s0"), RunDirectory(tmp_path / "p0")
    for s in range(2):
        a, b = seq.load_stage(s), lib.load_stage(s)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), s
    assert [m["train_loss"] for m in seq.metrics()] == pytest.approx([m["train_loss"] for m in lib.metrics()],
                                                                     rel=1e-6)
