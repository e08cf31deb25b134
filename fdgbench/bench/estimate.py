"""A sweep's training time on this machine, estimated before it starts."""
from __future__ import annotations



from ..config import RunConfig
from .speedup import timed_sequential

PROBE_ITERATIONS = 3  # timed BP iterations per model, after one untimed




def estimate_sweep_seconds(configs: list[RunConfig], data_dir: str = "data") -> float:
    """Seconds the runs will take here: each model's BP iteration time
    (PROBE_ITERATIONS timed iterations after one warm-up, synthetic data at
    the run's batch, device, precision and memory format) times each run's
    iterations. Evaluation is not counted."""
    from ..data import load_dataset

    per_iteration: dict[tuple, float] = {}
    total = 0.0
    for cfg in configs:
        key = (cfg.model, cfg.batch_size, cfg.device, cfg.dataset, cfg.amp, cfg.channels_last, cfg.threads)
        if key not in per_iteration:
            probe = RunConfig(method="bp", model=cfg.model, splits=1, dataset="synthetic", batch_size=cfg.batch_size,
                              device=cfg.device, threads=cfg.threads, amp=cfg.amp, channels_last=cfg.channels_last)
            per_iteration[key] = timed_sequential(probe, cfg.batch_size * 2, 1, PROBE_ITERATIONS) / PROBE_ITERATIONS
        train_images = cfg.train_subset or (50000 if cfg.dataset.startswith("cifar") else
                                            len(load_dataset(cfg.dataset, data_dir).train_labels))
        steps = cfg.epochs * (train_images // cfg.batch_size)
        total += per_iteration[key] * min(steps, cfg.max_steps or steps)
    return total
