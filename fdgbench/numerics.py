"""Kernel choices that decide whether a run's numbers repeat bit for bit.

On a CPU the same seed gives the same numbers whatever is set here (every
kernel torch runs on the CPU for these models is deterministic for a given
ATEN_CPU_CAPABILITY). On a GPU it does not by default: cuDNN picks
convolution algorithms by benchmarking (``cudnn.benchmark``), some of which
use atomics, and Ampere-and-later GPUs run float32 matmuls and convs in TF32.

- default: ``cudnn.benchmark`` on (fastest; the numbers may change between
  runs and between the sequential and distributed engines in the last bits),
  TF32 at torch's defaults (off for matmuls, on for cuDNN convolutions).
- ``--deterministic``: cuDNN deterministic algorithms, no benchmarking, no
  TF32, torch's deterministic implementations where it has them; the mode for
  engine-parity and resume checks on GPUs. On the distributed engine it also
  sums data-parallel replicas' gradients in rank order (replicas.py).

``env.json`` records the settings in force (its ``numerics`` entry).
"""
from __future__ import annotations

import os
import random
from typing import Any

import torch


def configure_numerics(deterministic: bool) -> None:
    """Set every switch both ways: several runs share a process (compare,
    sweep, benchmarks, tests), and one run's choice must not leak into the next."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, and --deterministic's
    torch.backends.cudnn.allow_tf32 = not deterministic  # torch's default is True
    if deterministic and torch.cuda.is_available():
        # cuBLAS needs a fixed workspace to be deterministic; read when cuBLAS starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic and torch.cuda.is_available(), warn_only=True)


def numerics_settings() -> dict[str, Any]:
    """What decides the kernels here, for env.json."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
