"""Datasets kept whole as uint8 tensors on the training device, augmented in
batch (random crop with 4-pixel zero padding, horizontal flip) with no per-image
PIL work, airbench style.

Dataset specs: ``cifar10`` / ``cifar100`` (torchvision: files in --data-dir or
downloaded), ``folder:PATH`` (a ``train/<class>/`` + ``test/<class>/`` image
tree, or a .tar.gz of one; decoded once and cached as a tensor file), and
``synthetic`` / ``synthetic:CLASSES`` (class-dependent patterns plus noise,
for tests and smoke runs). ``cifar10`` falls back to the offline JPEG copy
(FDGBENCH_CIFAR10_JPEG, or ../shared/data beside a checkout) when torchvision
cannot download; the dataset's description says which one was used.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .runs import write_atomically

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PAD = 4  # random-crop padding, as in He et al. and the FDG paper
PROJECT_ROOT = Path(__file__).resolve().parent.parent
OFFLINE_CIFAR10 = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DATASET_SPECS = {
    "cifar10": "CIFAR-10 via torchvision (--data-dir or download; falls back to the offline JPEG copy)",
    "cifar100": "CIFAR-100 via torchvision (--data-dir or download)",
    "folder:PATH": "train/<class>/ + test/<class>/ image tree, or a .tar.gz of one",
    "synthetic[:CLASSES]": "class-dependent random patterns + noise, 32x32 (tests, smoke runs)",
}


@dataclass(frozen=True)
class ImageDataset:
    """uint8 images (N, C, H, W) and int64 labels; ``description`` names the
    data's true source, for tables and run records."""

    name: str
    description: str
    classes: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images in [0, 1]."""
        x = self.train_images
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for chunk in x.split(4096):
            c = chunk.to(torch.float64).div_(255)
            total += c.sum(dim=(0, 2, 3))
            total_sq += c.square().sum(dim=(0, 2, 3))
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / n
        std = (total_sq / n - mean.square()).sqrt()
        return mean.float(), std.float()

    def subset(self, train: int | None, test: int | None) -> "ImageDataset":
        """The first ``train``/``test`` images of a fixed (seed 0) shuffle, so
        every method and seed sees the same subset."""
        out = self
        for split, n in (("train", train), ("test", test)):
            if n is None:
                continue
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if not 0 < n <= len(labels):
                raise UserError(f"--{split}-subset must be in 1..{len(labels)} for {self.name}, got {n}")
            if n == len(labels):
                continue
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n]
            out = replace(out, **{f"{split}_images": images[keep], f"{split}_labels": labels[keep]})
        if out is not self:
            out = replace(out, description=f"{self.description}, subset {len(out.train_labels)} train / "
                                           f"{len(out.test_labels)} test")
        return out


def load_dataset(spec: str, data_dir: str | os.PathLike = "data", download: bool = True) -> ImageDataset:
    if spec in ("cifar10", "cifar100"):
        return _load_torchvision_cifar(spec, Path(data_dir), download)
    if spec.startswith("folder:"):
        folder = spec[len("folder:"):]
        if not folder.strip():  # Path("") is the current directory
            raise UserError("folder:PATH needs a path, e.g. folder:~/data/my-images or folder:images.tar.gz")
        return load_image_folder(Path(folder).expanduser(), Path(data_dir))
    if spec == "synthetic" or spec.startswith("synthetic:"):
        classes = spec.partition(":")[2] or "10"
        if not classes.isdigit() or int(classes) < 2:
            raise UserError(f"synthetic:CLASSES needs an integer of at least 2, got '{classes}'")
        return synthetic_dataset(int(classes))
    raise UserError(f"unknown dataset '{spec}'; known: {', '.join(DATASET_SPECS)}")


def num_classes(spec: str, data_dir: str | os.PathLike = "data") -> int:
    """How many classes ``spec``'s dataset has, without loading a CIFAR (an
    image folder's count comes from its decoded copy, cached after its first
    load)."""
    known = {"cifar10": 10, "cifar100": 100, "synthetic": 10}
    if spec in known:
        return known[spec]
    if spec.startswith("synthetic:") and spec.partition(":")[2].isdigit():
        return int(spec.partition(":")[2])
    return load_dataset(spec, data_dir, download=False).num_classes


def _load_torchvision_cifar(name: str, data_dir: Path, download: bool) -> ImageDataset:
    import socket

    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a blocked network should fail in seconds, not hang
    try:
        train = cls(str(data_dir), train=True, download=download)
        test = cls(str(data_dir), train=False, download=download)
    except Exception as exc:  # noqa: BLE001 - any download/read failure ends the same way
        offline = Path(os.environ.get("FDGBENCH_CIFAR10_JPEG", OFFLINE_CIFAR10))
        if name == "cifar10" and offline.is_file():
            print(f"note: torchvision CIFAR-10 unavailable ({_first_line(exc)}); using the offline JPEG copy {offline}",
                  file=sys.stderr)
            ds = load_image_folder(offline, data_dir)
            return replace(ds, name="cifar10", description="CIFAR-10, JPEG copy (quality 75)")
        hint = "" if name == "cifar100" else " or set FDGBENCH_CIFAR10_JPEG / pass --dataset folder:PATH"
        raise UserError(f"{name} is not in {data_dir} and could not be downloaded ({_first_line(exc)}); "
                        f"put torchvision's files there{hint}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.int64))

    (xtr, ytr), (xte, yte) = tensors(train), tensors(test)
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    return ImageDataset(name, f"{label} (torchvision)", tuple(train.classes), xtr, ytr, xte, yte)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_image_folder(path: Path, cache_dir: Path) -> ImageDataset:
    """Decode a ``train/``+``test/`` image tree (or .tar.gz of one) once and
    cache the uint8 tensors under ``cache_dir``, keyed by the source's content
    as the file system describes it (``_source_key``)."""
    if not path.exists():
        raise UserError(f"dataset path {path} does not exist")
    key = _source_key(path)
    cache = cache_dir / "decoded" / f"{path.name.split('.')[0]}-{key}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return ImageDataset(blob["name"], blob["description"], tuple(blob["classes"]), *blob["tensors"])
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt
            cache.unlink(missing_ok=True)
    files = _tar_members(path) if path.is_file() else _tree_members(path)
    ds = _decode_folder(path, files)
    blob = {"name": ds.name, "description": ds.description, "classes": list(ds.classes),
            "tensors": [ds.train_images, ds.train_labels, ds.test_images, ds.test_labels]}
    try:  # runs started side by side may both decode; each writes its own temporary file
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, lambda tmp: torch.save(blob, tmp))
    except (OSError, UserError) as exc:
        print(f"note: could not cache decoded images in {cache.parent} ({exc}); they will be decoded again",
              file=sys.stderr)
    return ds


def _source_key(path: Path) -> str:
    """The path, and the size and mtime of the archive or the name, size and
    mtime of every image file in the tree: adding, removing or replacing an
    image gives a new key (the top directory's own mtime misses changes inside
    class folders). An archive's key is the one earlier versions used, so
    their caches stay valid."""
    if path.is_file():
        stat = path.stat()
        text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    else:
        text = str(path.resolve()) + "".join(f"|{f.relative_to(path)}|{s.st_size}|{s.st_mtime_ns}"
                                             for f, s in ((f, f.stat()) for f in _tree_images(path)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tar_members(path: Path) -> dict[str, bytes]:
    files = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    files[member.name] = tar.extractfile(member).read()
    except tarfile.ReadError:
        raise UserError(f"cannot read {path}: not a tar archive, or a corrupt one") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} as an image-folder archive: {_first_line(exc)}") from None
    return files


def _tree_images(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _tree_members(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in _tree_images(path)}


def _decode_folder(path: Path, files: dict[str, bytes]) -> ImageDataset:
    import numpy as np
    from PIL import Image

    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in sorted(files):
        parts = Path(name).parts
        # Accept an archive with one top-level folder around train/ and test/.
        while parts and parts[0] not in splits:
            parts = parts[1:]
        if len(parts) == 3:
            splits[parts[0]].setdefault(parts[1], []).append(name)
    if not splits["train"] or not splits["test"]:
        raise UserError(f"{path} is not an image folder: expected train/<class>/*.jpg and test/<class>/*.jpg")
    classes = sorted(splits["train"])
    if len(classes) < 2:  # one class trains to 0% error and means nothing (synthetic:1 is refused too)
        raise UserError(f"{path}: train/ has {len(classes)} class folder ({classes[0]}); a classifier needs at least 2")
    # Only image files are listed, so an empty class folder counts as absent: say which split lacks which.
    for split, other in (("test", "train"), ("train", "test")):
        absent = sorted(set(splits[other]) - set(splits[split]))
        if absent:
            raise UserError(f"{path}: {split}/ has no images of class(es) {', '.join(absent)} that {other}/ has; "
                            f"both splits need every class")
    tensors = []
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(classes):
            for name in splits[split][cls]:
                try:
                    with Image.open(io.BytesIO(files[name])) as img:
                        pixels = np.asarray(img.convert("RGB"))
                except (OSError, ValueError) as exc:
                    raise UserError(f"{path}: cannot decode {name}: {_first_line(exc)}") from None
                images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
                labels.append(label)
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) != 1:
            raise UserError(f"{path}: images have different sizes {sorted(shapes)[:3]}; resize them first")
        tensors += [torch.stack(images), torch.tensor(labels, dtype=torch.int64)]
    train_size, test_size = tuple(tensors[0].shape[1:]), tuple(tensors[2].shape[1:])
    if train_size != test_size:  # a model trained on one size would be scored on another
        raise UserError(f"{path}: train/ images are {train_size} and test/ images {test_size} (channels, height, "
                        f"width); resize them to one size first")
    return ImageDataset(f"folder:{path.name}", f"image folder {path.name}", tuple(classes), *tensors)


def synthetic_dataset(num_classes: int = 10, train: int = 2560, test: int = 512, size: int = 32,
                      seed: int = 1234) -> ImageDataset:
    """Each class is a smooth random colour pattern; images are that pattern
    plus uniform noise, so small nets learn it in a few hundred steps. The data
    is the same for every run (its own fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=(size, size),
                              mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.rand(n, 3, size, size, generator=g)
        images = (0.6 * templates[labels] + 0.4 * noise).mul(255).round().to(torch.uint8)
        return images, labels

    xtr, ytr = draw(train)
    xte, yte = draw(test)
    classes = tuple(f"class{i}" for i in range(num_classes))
    return ImageDataset(f"synthetic:{num_classes}", f"synthetic {num_classes}-class patterns (not real images)",
                        classes, xtr, ytr, xte, yte)


def _seed_for(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Normalizer:
    """uint8 -> float, scaled by the dataset's per-channel mean and std."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, device: torch.device, channels_last: bool = False):
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(device)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x, self.scale)  # uint8 promotes to float32
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def crop_flip_draw(generator: torch.Generator, b: int, pad: int = 4) -> torch.Tensor:
    """The random part of crop_flip for b images: (3, b) int64 rows of
    vertical offset, horizontal offset and mirror (0/1), drawn on the CPU."""
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.stack([dy, dx, flip.long()])


def crop_flip_at(padded: torch.Tensor, draw: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Per image, the crop of the already zero-padded images back to the
    unpadded size at the drawn offsets, mirrored where drawn: torchvision's
    RandomCrop(size, padding=pad) + RandomHorizontalFlip on uint8, as one
    gather over flattened pixels (the index is per image, shared by channels).
    The index is built on ``draw``'s device: with ``draw`` on the images'
    device, no host-device transfer or synchronisation happens here."""
    b, c, hp, wp = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    dy, dx, flip = (row.view(b, 1, 1) for row in draw)
    rows = dy + torch.arange(h, device=draw.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=draw.device).view(1, 1, w)
    cols = torch.where(flip.bool(), 2 * dx + w - 1 - cols, cols)  # mirrored within the crop window
    index = (rows * wp + cols).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


def crop_flip(padded: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """A random crop (padding ``pad``) and horizontal flip per image."""
    return crop_flip_at(padded, crop_flip_draw(generator, len(padded), pad).to(padded.device), pad)


class BatchStream:
    """The continuous stream of training batches b_0, b_1, ...: epoch e is a
    fresh permutation of the training set cut into floor(N/B) full batches (the
    remainder, different each epoch, is left out so every batch has the same
    shape). Batch t depends only on (seed, t), so any stage or rank can draw it,
    in any order, and a resumed run draws the same batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 normalizer: Normalizer, augment: bool = True):
        if len(labels) < batch_size:
            raise UserError(f"the training set has {len(labels)} images, fewer than one batch of {batch_size}; "
                            f"lower --batch-size or use more data")
        # Padded once up front (uint8, 1.56x the memory), not per batch.
        self.images = F.pad(images, (PAD,) * 4) if augment else images
        self.labels_all = labels
        self.batch_size, self.seed = batch_size, seed
        self.normalizer, self.augment = normalizer, augment
        self.steps_per_epoch = len(labels) // batch_size
        self._perms: dict[int, torch.Tensor] = {}
        self._draws: dict[int, torch.Tensor] = {}

    def _epoch_draws(self, epoch: int) -> torch.Tensor:
        """The crop/flip draws of every batch of ``epoch``, on the images'
        device: drawn per batch from batch t's own generator (so batch t still
        depends only on (seed, t)) but copied to the device once per epoch, not
        once per batch (a host-device synchronisation every iteration on GPUs)."""
        draws = self._draws.get(epoch)
        if draws is None:
            first = epoch * self.steps_per_epoch
            draws = torch.stack([
                crop_flip_draw(torch.Generator().manual_seed(_seed_for(self.seed, "augment", t)), self.batch_size, PAD)
                for t in range(first, first + self.steps_per_epoch)]).to(self.images.device)
            # Pipelines straddle at most one epoch boundary: keep two.
            self._draws = {e: d for e, d in self._draws.items() if e >= epoch - 1}
            self._draws[epoch] = draws
        return draws

    def _indices(self, t: int) -> torch.Tensor:
        epoch, i = divmod(t, self.steps_per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(_seed_for(self.seed, "epoch", epoch))
            perm = torch.randperm(len(self.labels_all), generator=g).to(self.labels_all.device)
            # Pipelines straddle at most one epoch boundary: keep two.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm[i * self.batch_size:(i + 1) * self.batch_size]

    def labels(self, t: int) -> torch.Tensor:
        return self.labels_all.index_select(0, self._indices(t))

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._indices(t)
        images = self.images.index_select(0, idx)  # far faster than images[idx] on CPU
        if self.augment:
            epoch, i = divmod(t, self.steps_per_epoch)
            images = crop_flip_at(images, self._epoch_draws(epoch)[i], PAD)
        return self.normalizer(images), self.labels_all.index_select(0, idx)


EVAL_BATCH = 1000  # test images per evaluation batch


def eval_batches(images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, batch_size: int = EVAL_BATCH):
    for start in range(0, len(labels), batch_size):
        yield normalizer(images[start:start + batch_size]), labels[start:start + batch_size]


class RenamedBatches:
    """A batch stream addressed by a method's own batch ids
    (Method.data_batch maps each to the training batch it stands for)."""

    def __init__(self, stream: Any, data_batch: Callable[[int], int]):
        self._stream, self._data_batch = stream, data_batch
        self.batch_size, self.steps_per_epoch = stream.batch_size, stream.steps_per_epoch

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stream.batch(self._data_batch(b))

    def labels(self, b: int) -> torch.Tensor:
        return self._stream.labels(self._data_batch(b))
