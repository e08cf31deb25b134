"""The parts of the GPU paths a CPU can reach: make gpu-check's no-GPU line,
the replicas' ordered mean, the numerics switches and their record."""
import json

import pytest
import torch

from fdgbench.numerics import configure_numerics, numerics_settings
from fdgbench.placement import ordered_mean
from fdgbench.config import RunConfig
from fdgbench.runs import cpu_name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs for real")
def test_gpu_check_without_a_gpu_says_so_in_one_line(cli):
    status, out, err = cli("gpu-check")
    assert status == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith("gpu-check: no CUDA GPU on this machine")


def test_ordered_mean_adds_left_to_right_then_divides():
    # float32: (1e8 + 1) rounds back to 1e8, so the order decides the result.
    a, b, c = (torch.tensor([v], dtype=torch.float32) for v in (1e8, 1.0, -1e8))
    assert ordered_mean([a, b, c]).item() == 0.0  # ((1e8 + 1) - 1e8) / 3
    assert ordered_mean([a, c, b]).item() == pytest.approx(1 / 3)  # ((1e8 - 1e8) + 1) / 3
    assert ordered_mean([a]).data_ptr() != a.data_ptr()  # a new tensor, the input untouched


def test_deterministic_switches_cudnn_and_is_recorded_but_not_hashed_when_off():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        configure_numerics(True)
        s = numerics_settings()
        assert s["cudnn_deterministic"] and not s["cudnn_benchmark"] and not s["tf32_cudnn"]
        configure_numerics(False)
        s = numerics_settings()
        assert s["cudnn_benchmark"] and not s["cudnn_deterministic"]
        assert s["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
    # Off (the default) leaves earlier runs' configs, and so their directory names, unchanged.
    assert "deterministic" not in RunConfig().to_dict()
    assert RunConfig(deterministic=True).to_dict()["deterministic"] is True


def test_env_json_records_the_numerics_and_the_cpu(cli, tmp_path):
    status, _, err = cli("run", "--method", "bp", "--model", "tiny_resnet", "--dataset", "synthetic", "--epochs", "1",
                         "--max-steps", "2", "--batch-size", "32", "--out", tmp_path, "--no-progress")
    assert status == 0, err
    (run,) = tmp_path.iterdir()
    env = json.loads((run / "env.json").read_text())
    assert env["numerics"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["numerics"]["cudnn_benchmark"] is True
    # The CPU's model name: two CPUs with the same kernel set still round differently.
    assert env["cpu"] and env["cpu"] == cpu_name()


def test_sync_compute_waits_for_the_compute_stream_never_the_whole_device(monkeypatch):
    # A device-wide synchronize would also wait for NCCL's pending sends, which
    # complete only when the peer posts its receive in its next iteration.
    from types import SimpleNamespace

    from fdgbench.train import Run

    waited = []

    def device_wide(*_):
        raise AssertionError("torch.cuda.synchronize waits for NCCL's streams too")

    monkeypatch.setattr(torch.cuda, "synchronize", device_wide)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda d: SimpleNamespace(synchronize=lambda: waited.append(d)))
    gpus = [torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")]
    Run.sync_compute(SimpleNamespace(devices=gpus))
    assert waited == [torch.device("cuda", 0), torch.device("cuda", 1)]  # each GPU once, the CPU not at all
