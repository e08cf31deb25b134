"""Benchmarks: every figure is a ratio of things measured side by side in the
same invocation (this machine is shared and noisy; absolute seconds are not
trusted), and every timing says what it includes. One module per benchmark."""
from .estimate import estimate_sweep_seconds
from .loader import bench_data
from .memory import bench_memory
from .simulate import bench_simulate, predicted_speedups
from .speedup import bench_speedup
from .step import bench_precision, bench_step

__all__ = ["bench_data", "bench_memory", "bench_precision", "bench_simulate", "bench_speedup", "bench_step",
           "estimate_sweep_seconds", "predicted_speedups"]
