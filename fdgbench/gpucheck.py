"""``make gpu-check``: the GPU paths, exercised on whatever GPU this machine has.

The CPU test suite cannot reach CUDA: kernels, cuDNN, streams, NCCL. This
check runs the parts one GPU can reach and prints one compact table:

1. BP and FDG (K=2, sequential engine, both stages on the GPU) on ResNet-56
   and WRN-28-10, synthetic data, a few dozen iterations each: ms/iteration
   timed by the compute stream, peak allocator memory, in fp32 and in bf16
   autocast with channels-last (FDG legacy in both; under bf16 its graph's
   weight copies are refilled before each backward, staleness.py).
2. ResNet-56 K=2 for BP and FDG legacy / stash / replay: ms/iteration, the
   allocator's peak, and each stage's memory as every run records it
   (weights, gradients, optimizer state and the most it holds for its
   backwards: memory.MemoryMonitor; both stages share the one GPU, so the
   allocator cannot tell them apart).
3. Host-device synchronisations in one steady-state FDG iteration
   (``torch.cuda.set_sync_debug_mode``): the training loop should make none.
4. One fault and resume: a run killed in its second epoch and rerun resumes
   from the checkpoint and ends with the same weights as an uninterrupted
   run (``--deterministic``, bit for bit).
5. Where the node has two GPUs or more: a short two-rank FDG run on NCCL
   against the sequential engine (``--deterministic``).

On a machine without a GPU it says so in one line and exits 0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .data import synthetic_dataset
from .runs import RunDirectory
from .config import RunConfig
from .train import Run, build_run

SPEED_MODELS = ("resnet56", "wrn28_10")


def _rows_speed(iterations: int, batch_size: int) -> list[dict[str, Any]]:
    rows = []
    for model in SPEED_MODELS:
        for precision in ("fp32", "bf16+cl"):
            for method, options in (("bp", {}), ("fdg", {"staleness": "legacy"})):
                cfg = RunConfig(method=method, method_options=options, model=model, splits=2, dataset="synthetic",
                                batch_size=batch_size, device="cuda", amp="bf16" if precision != "fp32" else "off",
                                channels_last=precision != "fp32")
                ms, peak = _time(cfg, iterations)
                rows.append({"check": "speed", "model": model, "method": f"{method} {options.get('staleness', '')}",
                             "precision": precision, "ms/iter": ms, "peak MiB": peak})
    return rows


def _trainer(cfg: RunConfig) -> Run:
    data = synthetic_dataset(10, train=cfg.batch_size * 8, test=cfg.batch_size)
    return build_run(cfg, dataset=data)


def _time(cfg: RunConfig, iterations: int) -> tuple[float, float]:
    """ms per iteration after the pipeline filled, and the allocator's peak (MiB)."""
    trainer = _trainer(cfg)
    warm = 2 * cfg.splits + 2
    for t in range(warm):
        trainer.engine.run_iteration(t)
    trainer.sync_compute()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for t in range(warm, warm + iterations):
        trainer.engine.run_iteration(t)
    trainer.sync_compute()
    ms = 1000 * (time.perf_counter() - t0) / iterations
    peak = torch.cuda.max_memory_allocated() / 2**20
    del trainer
    torch.cuda.empty_cache()
    return ms, peak


def _rows_memory(iterations: int, batch_size: int) -> list[dict[str, Any]]:
    """Per-stage memory as every run records it (memory.MemoryMonitor: state
    + the most the stage holds for its backwards, device-independent), over
    the monitor's window; then ms/iteration and the allocator's peak with the
    hooks off."""
    rows = []
    for method, options in (("bp", {}), ("fdg", {"staleness": "legacy"}), ("fdg", {"staleness": "stash"}),
                            ("fdg", {"staleness": "replay"})):
        cfg = RunConfig(method=method, method_options=options, model="resnet56", splits=2, dataset="synthetic",
                        batch_size=batch_size, device="cuda")
        trainer = _trainer(cfg)
        window = trainer.memory.window
        for t in range(window + 1):  # the last watch disarms the hooks
            trainer.memory.watch(t)
            trainer.engine.run_iteration(t)
        stage = trainer.memory.record()
        trainer.sync_compute()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for t in range(window + 1, window + 1 + iterations):
            trainer.engine.run_iteration(t)
        trainer.sync_compute()
        rows.append({"check": "memory", "model": "resnet56", "method": f"{method} {options.get('staleness', '')}",
                     "precision": "fp32", "ms/iter": 1000 * (time.perf_counter() - t0) / iterations,
                     "peak MiB": torch.cuda.max_memory_allocated() / 2**20,
                     "stage0 MiB": stage["stage0_memory_bytes"] / 2**20,
                     "stage1 MiB": stage["stage1_memory_bytes"] / 2**20})
        del trainer
        torch.cuda.empty_cache()
    return rows


def _count_syncs(batch_size: int) -> dict[str, Any]:
    cfg = RunConfig(method="fdg", model="resnet56", splits=2, dataset="synthetic", batch_size=batch_size,
                    device="cuda")
    trainer = _trainer(cfg)
    for t in range(6):
        trainer.engine.run_iteration(t)
    trainer.sync_compute()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.engine.run_iteration(6)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's one-time notice that the debug mode is a prototype mentions synchronization too: not a sync
    syncs = [str(w.message).splitlines()[0] for w in caught
             if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    return {"check": "host syncs in one FDG iteration", "count": len(syncs), "first": syncs[:3]}


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fdgbench", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _fault_and_resume(root: Path, device: str = "cuda") -> dict[str, Any]:
    args = ["run", "--method", "fdg", "--model", "resnet20", "-K", "2", "--dataset", "synthetic",
            "--train-subset", "1024", "--test-subset", "256", "--epochs", "3", "--device", device,
            "--deterministic", "--no-progress"]
    whole = _cli([*args, "--out", str(root / "whole")])
    killed = _cli([*args, "--out", str(root / "cut")], env={"FDGBENCH_FAULT": "0:12:kill"})
    resumed = _cli([*args, "--out", str(root / "cut")])
    failed = next((p for p in (whole, resumed) if p.returncode), None)
    if failed is not None:
        return {"check": "fault and resume", "ok": False, "detail": failed.stderr[-400:]}
    (a,), (b,) = (list((root / x).iterdir()) for x in ("whole", "cut"))
    equal = all(torch.equal(RunDirectory(a).load_stage(k)[n], v) for k in (0, 1)
                for n, v in RunDirectory(b).load_stage(k).items())
    return {"check": "fault and resume", "ok": equal and killed.returncode != 0 and "resuming" in resumed.stderr,
            "killed_exit": killed.returncode, "bit_identical_weights": equal}


def _distributed(root: Path) -> dict[str, Any]:
    if torch.cuda.device_count() < 2:
        return {"check": "distributed (NCCL)", "ok": None,
                "detail": f"skipped: {torch.cuda.device_count()} GPU on this node, two ranks need two"}
    args = ["run", "--method", "fdg", "--model", "resnet20", "-K", "2", "--dataset", "synthetic",
            "--train-subset", "1024", "--test-subset", "256", "--epochs", "2", "--device", "cuda",
            "--deterministic", "--no-progress"]
    seq = _cli([*args, "--out", str(root / "seq")])
    dis = _cli([*args, "--engine", "distributed", "--out", str(root / "dis")])
    failed = next((p for p in (seq, dis) if p.returncode), None)
    if failed is not None:
        return {"check": "distributed (NCCL)", "ok": False, "detail": failed.stderr[-400:]}
    (a,), (b,) = (list((root / x).iterdir()) for x in ("seq", "dis"))
    la = [m["train_loss"] for m in RunDirectory(a).metrics()]
    lb = [m["train_loss"] for m in RunDirectory(b).metrics()]
    return {"check": "distributed (NCCL)", "ok": la == lb, "seq_losses": la, "dist_losses": lb}


def gpu_check(iterations: int = 30, batch_size: int = 128) -> int:
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}); nothing to check")
        return 0
    start = time.perf_counter()
    print(f"gpu-check on {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; batch {batch_size}, "
          f"{iterations} timed iterations after the pipeline filled; synthetic data", flush=True)
    print(f"{'check':<7} {'model':<9} {'method':<11} {'precision':<8} {'ms/iter':>8} {'peak MiB':>9} "
          f"{'stage0 MiB':>10} {'stage1 MiB':>10}", flush=True)
    for row in _rows_speed(iterations, batch_size) + _rows_memory(iterations, batch_size):
        print(f"{row['check']:<7} {row['model']:<9} {row['method']:<11} {row['precision']:<8} "
              f"{row['ms/iter']:8.1f} {row.get('peak MiB', float('nan')):9.0f} "
              f"{row.get('stage0 MiB', float('nan')):10.0f} {row.get('stage1 MiB', float('nan')):10.0f}", flush=True)
    failures = 0
    syncs = _count_syncs(batch_size)
    print(f"host syncs in one steady-state FDG iteration: {syncs['count']} {syncs['first']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fdgbench-gpucheck-") as tmp:
        for result in (_fault_and_resume(Path(tmp)), _distributed(Path(tmp))):
            print(f"{result['check']}: {'skipped' if result['ok'] is None else 'ok' if result['ok'] else 'FAILED'} "
                  f"{ {k: v for k, v in result.items() if k not in ('check', 'ok')} }", flush=True)
            failures += result["ok"] is False
    print(f"gpu-check finished in {time.perf_counter() - start:.0f} s, {failures} failure(s)")
    return 1 if failures else 0
