from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fdgbench.cli import main
from fdgbench.data import synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
# The suite's expectations (bitwise repeats, one rank per stage on one machine) are the CPU's: a test's run
# without --device trains there even on a GPU machine (--device auto would pick the GPU). Subprocesses inherit it.
os.environ.setdefault("FDGBENCH_DEVICE", "cpu")
OFFLINE_CIFAR10 = Path(os.environ.get("FDGBENCH_CIFAR10_JPEG", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Bitwise comparisons assume the same kernels in both computations.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_data():
    return synthetic_dataset(10, train=256, test=64)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def needs_offline_cifar10():
    return pytest.mark.skipif(not OFFLINE_CIFAR10.is_file(),
                              reason=f"offline CIFAR-10 copy not found at {OFFLINE_CIFAR10} "
                                     f"(set FDGBENCH_CIFAR10_JPEG)")
