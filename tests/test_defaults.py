"""Defaults that train: the warm-up and device `run` and `compare` resolve
when not given, the Makefile's DEVICE= and JOBS=, and a sweep's time
estimate before any run has finished."""
import subprocess

import pytest
import torch

import fdgbench.cli.train as train_cli
from fdgbench.cli.options import sweep_cells
from fdgbench.cli.sweeps import cpu_preset_hint, duration_text
from fdgbench.config import RunConfig, parse_device, resolve_device, resolve_warmup
from fdgbench.plan import check_config
from fdgbench.errors import UserError
from fdgbench.runs import RunDirectory

from .conftest import ROOT

TINY = ["--model", "tiny_resnet", "--dataset", "synthetic", "--batch-size", "32", "--train-subset", "64",
        "--test-subset", "32", "--threads", "1", "--no-progress"]


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as a CPU-only one, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("epochs,max_steps,given,expected", [
    (300, None, (None, "auto"), (5, "linear")),  # the full presets' protocol
    (20, None, (None, "auto"), (2, "linear")),
    (10, None, (None, "auto"), (1, "linear")),
    (9, None, (None, "auto"), (0, "constant")),  # under 10 epochs (the 4-epoch demo): none
    (300, 20, (None, "auto"), (0, "constant")),  # a smoke run cut by --max-steps: none
    (300, None, (0, "auto"), (0, "constant")),  # --warmup-epochs 0: today's behaviour, today's record
    (300, None, (3, "auto"), (3, "linear")),
    (300, None, (3, "constant"), (3, "constant")),
    (300, None, (None, "constant"), (5, "constant")),
])
def test_the_default_warm_up_is_linear_over_min_5_and_a_tenth_of_the_epochs(epochs, max_steps, given, expected):
    assert resolve_warmup(epochs, max_steps, *given) == expected
    cfg = RunConfig(epochs=epochs, max_steps=max_steps, warmup_epochs=given[0], warmup=given[1])
    assert (cfg.warmup_epochs, cfg.warmup) == expected


def test_auto_device_is_cuda_where_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and RunConfig(device="auto").device == "cpu"
    assert parse_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing runs on it: resolution only
    assert resolve_device("auto") == "cuda" and RunConfig(device="auto").device == "cuda"
    assert RunConfig(stage_devices=("auto", "cpu")).stage_devices == ("cuda", "cpu")
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"


def _configs_of(cli, monkeypatch, *args):
    """The configs `compare ARGS` would train (checked, then stopped before training)."""
    seen = []

    def check(cfg):
        seen.append(cfg)

    def stop(*_):
        raise UserError("stopped before training")

    monkeypatch.setattr(train_cli, "check_config", check)
    monkeypatch.setattr(train_cli, "train_run", stop)
    status, _, err = cli("compare", *args)
    assert status == 2 and "stopped before training" in err, err
    return seen


def test_compare_warms_every_method_up_alike_and_the_demo_not_at_all(cli, monkeypatch, no_cuda):
    demo = _configs_of(cli, monkeypatch)
    assert [c.method for c in demo] == ["bp", "fdg"]
    for cfg in demo:  # the demo's configs, and so its run directories and numbers, are what they were
        assert (cfg.epochs, cfg.warmup_epochs, cfg.warmup, cfg.device) == (4, 0, "constant", "cpu")
        assert not {"warmup_epochs", "warmup"} & set(cfg.to_dict())
    longer = _configs_of(cli, monkeypatch, "--epochs", "20")
    assert [(c.method, c.warmup_epochs, c.warmup) for c in longer] == [("bp", 2, "linear"), ("fdg", 2, "linear")]
    off = _configs_of(cli, monkeypatch, "--epochs", "20", "--warmup-epochs", "0")  # recorded as runs always were
    assert all((c.warmup_epochs, c.warmup) == (0, "constant") and "warmup" not in c.to_dict() for c in off)


def test_fdgbench_device_replaces_auto_as_the_default(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto would pick the GPU
    monkeypatch.setenv("FDGBENCH_DEVICE", "cpu")  # what `make test` sets
    assert {c.device for c in _configs_of(cli, monkeypatch)} == {"cpu"}
    spec = tmp_path / "estimate.toml"
    spec.write_text(SPEC)
    _, cells, _ = sweep_cells(str(spec), "converge", None, str(tmp_path))  # plots read the runs through this
    assert {c.config.device for c in cells} == {"cpu"}


def test_auto_picks_the_gpu_even_one_too_few_and_the_refusal_names_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing runs on it: checks only
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = RunConfig(method="fdg", model="tiny_resnet", splits=2, engine="distributed", device="auto")
    with pytest.raises(UserError, match=r"2 ranks on this node, 1 GPU\(s\);.*; or --device cpu$"):
        check_config(cfg)


def test_a_run_records_its_resolved_warm_up_and_device_and_auto_names_the_cpu_run(cli, tmp_path, no_cuda):
    # 10 epochs of 2 iterations: a 1-epoch linear warm-up by default.
    status, _, err = cli("run", "--method", "bp", *TINY, "--epochs", "10", "--device", "auto", "--out", tmp_path)
    assert status == 0, err
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = RunDirectory(path)
    config = run.read_json("config.json")
    assert (config["device"], config["warmup_epochs"], config["warmup"]) == ("cpu", 1, "linear")
    lrs = [m["lr"] for m in run.metrics()]
    assert lrs[0] < lrs[1] == pytest.approx(0.1)  # still ramping in epoch 0, at --lr from epoch 1
    status, out, err = cli("run", "--method", "bp", *TINY, "--epochs", "10", "--device", "cpu", "--out", tmp_path)
    assert status == 0 and "(already done" in out and str(path) in out, err  # the same run directory


def test_a_warm_up_length_that_is_neither_a_number_nor_auto_is_refused(cli):
    status, _, err = cli("run", "--warmup-epochs", "soon")
    assert status == 2 and "'soon' is not a valid integer or auto" in err


def _make_dry(*args):
    made = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return {line.split()[1]: line for line in made.stdout.splitlines() if line.startswith(".venv/bin/fdgbench ")}


def test_the_makefile_passes_device_and_jobs_to_the_sweep_and_the_table():
    lines = _make_dry("reproduce-table2", "DEVICE=cuda", "JOBS=3")
    assert lines["sweep"].split()[2:] == ["table2", "--preset", "full", "--out", "paper_tables/results/runs",
                                          "--device", "cuda", "--launcher", "subprocess", "--jobs", "3"]
    assert lines["table"].endswith("--device cuda")
    default = _make_dry("reproduce-table2", "PRESET=converge")
    assert default["sweep"].split()[-2:] == ["--device", "auto"] and "--launcher" not in default["sweep"]
    assert "--jobs" not in _make_dry("reproduce-table6", "JOBS=2")["sweep"]  # its cells are speeds


def test_the_deep_k_target_sweeps_tabulates_and_plots_error_against_k():
    lines = _make_dry("reproduce-deep-k", "PRESET=converge", "JOBS=2")
    assert lines["sweep"].split()[2:6] == ["deep_k", "--preset", "converge", "--out"]
    assert lines["sweep"].endswith("--launcher subprocess --jobs 2")
    assert lines["table"].split()[2] == "deep_k" and lines["plot"].split()[2:4] == ["k", "deep_k"]


SPEC = """
title = "Estimate test"
dataset = "synthetic"
[[columns]]
id = "BP"
method = "bp"
[[columns]]
id = "FDG"
method = "fdg"
[[rows]]
id = "Tiny"
model = "tiny_resnet"
splits = 2
[presets.full]
epochs = 300
seeds = 2
train_subset = 64
test_subset = 32
batch_size = 32
threads = 1
[presets.converge]
epochs = 20
seeds = 1
train_subset = 64
test_subset = 32
batch_size = 32
threads = 1
"""


def test_sweep_status_estimates_hours_before_any_run_and_points_a_cpu_to_the_converge_preset(cli, tmp_path, no_cuda):
    spec = tmp_path / "estimate.toml"
    spec.write_text(SPEC)
    status, out, err = cli("sweep", "status", spec, "--preset", "full", "--out", tmp_path / "runs")
    assert status == 0, err
    lines = out.splitlines()
    assert "0 done, 0 running, 0 incomplete, 4 missing (of 4)" in lines[0]
    assert lines[1].startswith("estimated training time left: ") and lines[1].endswith(
        " h for 4 runs (tiny_resnet, with no epoch recorded yet: 3 timed BP iterations here times each "
        "run's iterations, DGL, FR and DNI costing more)")
    assert lines[2].startswith("the full preset takes about ") and lines[2].endswith(
        " h here: --preset converge") and "the converge preset (Tiny, 20 epochs) takes about" in lines[2]
    assert not (tmp_path / "runs").exists()  # the probe writes no run


def test_the_cpu_hint_gives_days_past_48_hours_and_names_the_preset_that_fits():
    assert duration_text(47 * 3600) == "47.0 h" and duration_text(49 * 3600) == "2.0 days"
    assert cpu_preset_hint(41 * 24 * 3600, ("converge", "ResNet-20, 20 epochs", 9.5 * 3600, 6), []) == (
        "the full preset takes about 41.0 days on this machine's CPU; the converge preset (ResNet-20, 20 epochs) "
        "takes about 9.5 h here: --preset converge")
    assert cpu_preset_hint(3600 * 100, ("converge", "ResNet-20, 20 epochs", 0.0, 0), []).endswith(
        "the converge preset (ResNet-20, 20 epochs) has every run recorded: --preset converge")
    assert cpu_preset_hint(3600 * 100, None, ["quick", "smoke"]) == (
        "the full preset takes about 4.2 days on this machine's CPU; a smaller preset: --preset quick|smoke")
