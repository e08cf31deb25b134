"""Benchmarks: every figure is a ratio of things measured side by side in the
same invocation (this machine is shared and noisy; absolute seconds are not
trusted), and every timing says what it includes."""
from __future__ import annotations

import statistics
import time

import click
import torch

from .data import BatchStream, Normalizer, load_dataset, synthetic_dataset
from .train import RunConfig, Trainer, parse_device


def bench_data(dataset: str, data_dir: str, batch_size: int, threads: int) -> None:
    """One training epoch of batches (crop + flip + normalise) from the
    device-resident loader vs torchvision's per-image PIL transforms in a
    DataLoader with no worker processes, as the reference scripts do."""
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    torch.set_num_threads(threads)
    ds = load_dataset(dataset, data_dir)
    mean, std = ds.channel_stats()
    stream = BatchStream(ds.train_images, ds.train_labels, batch_size, seed=0,
                         normalizer=Normalizer(mean, std, torch.device("cpu")))

    t0 = time.perf_counter()
    for t in range(stream.steps_per_epoch):
        x, y = stream.batch(t)
    ours = time.perf_counter() - t0

    class PerImage(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.images = ds.train_images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision's CIFAR
            self.labels = ds.train_labels.tolist()
            self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                        T.Normalize(mean.tolist(), std.tolist())])

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int):
            return self.transform(Image.fromarray(np.ascontiguousarray(self.images[i]))), self.labels[i]

    loader = torch.utils.data.DataLoader(PerImage(), batch_size=batch_size, shuffle=True, num_workers=0,
                                         drop_last=True)
    t0 = time.perf_counter()
    for x_ref, y_ref in loader:
        pass
    reference = time.perf_counter() - t0
    assert x.shape == x_ref.shape, (x.shape, x_ref.shape)
    n = stream.steps_per_epoch * batch_size
    click.echo(f"one epoch of {dataset} ({ds.description}): {stream.steps_per_epoch} batches of {batch_size}, "
               f"random crop (pad 4) + flip + normalise, CPU, {threads} thread(s)")
    click.echo(f"  device-resident batch loader        {ours:8.2f} s  {n / ours:10.0f} img/s")
    click.echo(f"  torchvision per-image, 0 workers    {reference:8.2f} s  {n / reference:10.0f} img/s")
    click.echo(f"  speedup {reference / ours:.1f}x (target >= 20x)")


def bench_step(model: str, splits: list[int], batch_size: int, iterations: int, rounds: int, device: str,
               threads: int | None, staleness: str) -> None:
    """Mean sequential-engine iteration time (data batch, forward, backward,
    update of every stage) of FDG at each K vs BP unsplit, in interleaved
    rounds after a warm-up that fills FDG's pipeline; medians over rounds."""
    parse_device(device)
    data = synthetic_dataset(10, train=batch_size * 4, test=batch_size)
    configs = [("bp", 1, {})] + [("fdg", k, {"staleness": staleness}) for k in splits]
    trainers = []
    for method, k, options in configs:
        cfg = RunConfig(method=method, method_options=options, model=model, splits=k, dataset="synthetic",
                        batch_size=batch_size, device=device, threads=threads)
        trainers.append(Trainer(cfg, dataset=data))
    next_t = [0] * len(trainers)

    def timed(i: int, n: int) -> float:
        tr = trainers[i]
        tr._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            tr.engine.run_iteration(next_t[i])
            next_t[i] += 1
        tr._sync()
        return (time.perf_counter() - t0) / n

    for i, (_, k, _) in enumerate(configs):
        timed(i, 2 * k + 2)  # warm-up: fill the pipeline, allocator and kernel caches
    per_round = [[timed(i, iterations) for i in range(len(configs))] for _ in range(rounds)]
    medians = [statistics.median(r[i] for r in per_round) for i in range(len(configs))]
    click.echo(f"{model}, batch {batch_size}, {device}, {torch.get_num_threads()} thread(s), staleness {staleness}: "
               f"median over {rounds} interleaved rounds of {iterations} iterations")
    for (method, k, _), tr, m in zip(configs, trainers, medians):
        ratio = m / medians[0]
        part = f" [{tr.partition.strategy}: {tr.partition_text}]" if k > 1 else ""
        click.echo(f"  {method:<4} K={k}  {1000 * m:8.1f} ms/iter  {ratio:5.3f}x BP{part}")
    click.echo("  target: FDG <= 1.15x BP (same FLOPs per iteration; the difference is bookkeeping)")
