import tarfile

import pytest
import torch
import numpy as np
from PIL import Image

from fdgbench import data as data_mod
from fdgbench.data import (BatchStream, Normalizer, crop_flip, load_dataset, load_image_folder,
                           synthetic_dataset)
from fdgbench.errors import UserError

from .conftest import OFFLINE_CIFAR10, needs_offline_cifar10


def _stream(ds, batch=32, seed=0, augment=True):
    mean, std = ds.channel_stats()
    return BatchStream(ds.train_images, ds.train_labels, batch, seed, Normalizer(mean, std, torch.device("cpu")),
                       augment=augment)


def test_crop_flip_is_a_padded_crop_or_its_mirror():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    out = crop_flip(padded, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    seen_flip = set()
    for i in range(len(images)):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"image {i} is not a crop of its padded original"
        seen_flip.update(m[2] for m in matches)
    assert seen_flip == {False, True}  # both flips occur in 16 draws


def test_stream_batches_depend_only_on_seed_and_index(tiny_data):
    a, b = _stream(tiny_data), _stream(tiny_data)
    xs = [a.batch(t) for t in range(10)]
    for t in reversed(range(10)):  # random access, any order, a second stream
        x, y = b.batch(t)
        assert torch.equal(x, xs[t][0]) and torch.equal(y, xs[t][1])
        assert torch.equal(b.labels(t), y)
    c = _stream(tiny_data, seed=1)
    assert not torch.equal(c.batch(0)[0], xs[0][0])


def test_epoch_draws_give_each_batch_its_own_generators_crops(tiny_data):
    # The stream draws a whole epoch's crops and flips at once (one copy to the
    # device per epoch); batch t must still be crop_flip with batch t's own
    # generator, bit for bit, in any epoch and in any order.
    s, plain = _stream(tiny_data), _stream(tiny_data, augment=False)
    for t in (9, 0, 3, 8, 17):
        raw = data_mod.F.pad(tiny_data.train_images.index_select(0, s._indices(t)), (data_mod.PAD,) * 4)
        expected = crop_flip(raw, torch.Generator().manual_seed(data_mod._seed_for(0, "augment", t)), data_mod.PAD)
        assert torch.equal(s.batch(t)[0], plain.normalizer(expected)), t


def test_each_epoch_is_a_permutation_without_repeats(tiny_data):
    s = _stream(tiny_data, batch=32, augment=False)
    assert s.steps_per_epoch == 256 // 32
    for epoch in range(2):
        seen = torch.cat([s._indices(epoch * s.steps_per_epoch + i) for i in range(s.steps_per_epoch)])
        assert len(set(seen.tolist())) == 256
    assert not torch.equal(s._indices(0), s._indices(s.steps_per_epoch))  # reshuffled


def test_normalised_unaugmented_data_has_zero_mean_unit_std(tiny_data):
    s = _stream(tiny_data, batch=256, augment=False)
    x, _ = s.batch(0)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_too_few_images_for_a_batch(tiny_data):
    with pytest.raises(UserError, match="fewer than one batch"):
        _stream(tiny_data, batch=1000)


def test_subset_is_fixed_and_labelled(tiny_data):
    a, b = tiny_data.subset(100, 10), tiny_data.subset(100, 10)
    assert len(a.train_labels) == 100 and len(a.test_labels) == 10
    assert torch.equal(a.train_images, b.train_images)
    assert "subset 100 train / 10 test" in a.description
    with pytest.raises(UserError, match="--train-subset must be in 1..256"):
        tiny_data.subset(1000, None)


def test_synthetic_is_reproducible_and_sized():
    a, b = synthetic_dataset(100), synthetic_dataset(100)
    assert torch.equal(a.train_images, b.train_images) and a.num_classes == 100
    assert "not real images" in load_dataset("synthetic:3").description
    with pytest.raises(UserError, match="synthetic:CLASSES"):
        load_dataset("synthetic:x")


def _write_png(path, img):
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, format="PNG")


def _make_tree(root, classes=("b_cat", "a_dog"), per_class=3, size=8):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
                _write_png(root / split / c / f"{i}.png", img)
    return root


def test_image_folder_tree_and_tarball_decode_the_same(tmp_path):
    tree = _make_tree(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="imgs")
    a = load_image_folder(tree, tmp_path / "cache")
    b = load_image_folder(archive, tmp_path / "cache")
    assert a.classes == ("a_dog", "b_cat")  # sorted, as torchvision's ImageFolder
    assert a.train_images.shape == (6, 3, 8, 8) and a.test_images.shape == (6, 3, 8, 8)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.train_labels, b.train_labels)
    assert a.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    # The exact pixels survive (PNG is lossless).
    first = np.asarray(Image.open(tree / "train" / "a_dog" / "0.png"))
    assert torch.equal(a.train_images[0], torch.from_numpy(first.copy()).permute(2, 0, 1))


def test_decoded_folder_is_cached(tmp_path, monkeypatch):
    tree = _make_tree(tmp_path / "imgs")
    first = load_image_folder(tree, tmp_path / "cache")
    assert list((tmp_path / "cache" / "decoded").glob("*.pt"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_mod, "_decode_folder", no_decoding)
    again = load_image_folder(tree, tmp_path / "cache")
    assert torch.equal(first.train_images, again.train_images)


@pytest.mark.parametrize("breakage,message", [
    ("corrupt_image", "cannot decode"),
    ("no_test_split", "not an image folder"),
    ("mixed_sizes", "different sizes"),
])
def test_bad_image_folders_are_user_errors(tmp_path, breakage, message):
    tree = _make_tree(tmp_path / "imgs")
    if breakage == "corrupt_image":
        (tree / "train" / "a_dog" / "1.png").write_bytes(b"not a png")
    elif breakage == "no_test_split":
        import shutil
        shutil.rmtree(tree / "test")
    else:
        img = torch.zeros(3, 4, 4, dtype=torch.uint8)
        _write_png(tree / "train" / "a_dog" / "9.png", img)
    with pytest.raises(UserError, match=message):
        load_image_folder(tree, tmp_path / "cache")


def test_missing_and_corrupt_archives_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}", tmp_path)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a tar archive"):
        load_dataset(f"folder:{bad}", tmp_path)
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


def _no_download(monkeypatch):
    import torchvision

    def refuse(*args, **kwargs):
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", refuse)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", refuse)


def test_cifar_without_network_or_offline_copy_is_one_clear_error(tmp_path, monkeypatch):
    _no_download(monkeypatch)
    monkeypatch.setenv("FDGBENCH_CIFAR10_JPEG", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(UserError, match="cifar10 is not in .* and could not be downloaded"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(UserError, match="cifar100 is not in"):
        load_dataset("cifar100", tmp_path)


def test_cifar10_falls_back_to_an_offline_image_folder(tmp_path, monkeypatch):
    _no_download(monkeypatch)
    tree = _make_tree(tmp_path / "cifar", classes=tuple(f"c{i}" for i in range(10)))
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=".")
    monkeypatch.setenv("FDGBENCH_CIFAR10_JPEG", str(archive))
    ds = load_dataset("cifar10", tmp_path / "data")
    assert ds.name == "cifar10" and "JPEG copy" in ds.description and ds.num_classes == 10


@needs_offline_cifar10()
def test_real_offline_cifar10_copy(tmp_path_factory):
    ds = load_image_folder(OFFLINE_CIFAR10, tmp_path_factory.mktemp("cifar"))
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    mean, std = ds.channel_stats()
    # CIFAR-10's known statistics (0.4914, 0.4822, 0.4465); JPEG shifts them slightly.
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.005)
