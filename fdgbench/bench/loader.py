"""`bench data`: the device-resident batch loader against torchvision's per-image transforms."""
from __future__ import annotations

import time

import click
import torch

from ..data import BatchStream, Normalizer, load_dataset




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
    if x.shape != x_ref.shape:  # the two loaders must time the same work
        raise RuntimeError(f"the loaders' batches differ in shape: {tuple(x.shape)} vs {tuple(x_ref.shape)}")
    n = stream.steps_per_epoch * batch_size
    click.echo(f"one epoch of {dataset} ({ds.description}): {stream.steps_per_epoch} batches of {batch_size}, "
               f"random crop (pad 4) + flip + normalise, CPU, {threads} thread(s)")
    click.echo(f"  device-resident batch loader        {ours:8.2f} s  {n / ours:10.0f} img/s")
    click.echo(f"  torchvision per-image, 0 workers    {reference:8.2f} s  {n / reference:10.0f} img/s")
    click.echo(f"  speedup {reference / ours:.1f}x (target >= 20x)")
