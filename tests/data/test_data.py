"""Datasets and loaders: MNIST from placed files (no network), image folders of every kind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cnnvis.config import build_config, data_root
from cnnvis.data import IMAGENET_MEAN, IMAGENET_STD, build_data
from cnnvis.data.images import check_image, load_rgb, to_rgb
from cnnvis.data.mnist import MNIST_FILES, load_mnist_tensors, split_indices
from cnnvis.errors import DataError


def mnist_config(root: Path, **data) -> object:
    return build_config({"data": {"dataset": "mnist", "root": str(root), **data}})


def folder_config(path: Path, **data) -> object:
    """An image folder read through the DataLoader path (``in_memory: false``) unless ``data`` says otherwise."""
    return build_config(
        {
            "data": {
                "dataset": "imagefolder",
                "path": str(path),
                "num_workers": 0,
                "in_memory": False,
                "batch_size": 4,
                "eval_batch_size": 8,
                "transforms": {"image_size": 16},
                **data,
            }
        }
    )


def epoch(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


@pytest.fixture
def refuse_mnist_download(monkeypatch):
    def refuse(self):
        raise AssertionError("MNIST download attempted although the files are placed")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", refuse)


# ------------------------------------------------------------------ MNIST


def test_mnist_from_placed_gz_files_without_network(fresh_mnist_root, no_network, refuse_mnist_download):
    raw = fresh_mnist_root / "MNIST" / "raw"
    bundle = build_data(mnist_config(fresh_mnist_root), "cpu")  # download: true is the default
    assert bundle.sizes == {"train": 55_000, "val": 5_000, "test": 10_000}
    assert list(bundle.spec.class_names) == [str(i) for i in range(10)]
    assert (bundle.spec.in_channels, bundle.spec.image_size) == (1, 28)
    for name in MNIST_FILES:
        assert (raw / name).is_file(), f"{name} was not decompressed"
        assert (raw / f"{name}.gz").is_file(), f"{name}.gz was removed"
    assert not list(raw.glob("*.part")), "temporary decompression files left behind"


def test_mnist_from_uncompressed_files_only(mnist_root, tmp_path, no_network, refuse_mnist_download):
    load_mnist_tensors(mnist_root, download=False)  # make sure the session copy is decompressed
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
    tensors = load_mnist_tensors(tmp_path / "root", download=True)
    images, labels = tensors["train"]
    assert images.shape == (60_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60_000,) and set(labels.unique().tolist()) == set(range(10))
    assert tensors["test"][0].shape == (10_000, 28, 28)


def test_mnist_val_size_is_configurable(mnist_root, no_network):
    bundle = build_data(mnist_config(mnist_root, val_size=1000), "cpu")
    assert bundle.sizes == {"train": 59_000, "val": 1_000, "test": 10_000}
    assert len(bundle.val) == 1  # eval batches of 1000


def test_mnist_val_size_too_large(mnist_root):
    with pytest.raises(DataError, match="val_size"):
        build_data(mnist_config(mnist_root, val_size=60_000), "cpu")


def test_mnist_subset(mnist_root):
    bundle = build_data(mnist_config(mnist_root, subset=300, val_size=100, batch_size=64), "cpu")
    assert bundle.sizes["train"] == 300
    assert len(bundle.train) == 5  # 4 full batches and one of 44
    assert sum(len(y) for _, y in bundle.train) == 300
    assert bundle.sizes["test"] == 10_000  # the official test set is never cut


def test_split_indices_are_disjoint_complete_and_seeded():
    train, val = split_indices(1000, 100, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert sorted(torch.cat([train, val]).tolist()) == list(range(1000))
    again_train, again_val = split_indices(1000, 100, seed=3)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, split_indices(1000, 100, seed=4)[1])


def test_mnist_split_is_seeded(mnist_root):
    first = build_data(mnist_config(mnist_root, val_size=500), "cpu")
    second = build_data(mnist_config(mnist_root, val_size=500), "cpu")
    assert torch.equal(first.val.images, second.val.images)
    assert torch.equal(first.val.labels, second.val.labels)
    other = build_data(build_config({"seed": 1, "data": {"root": str(mnist_root), "val_size": 500}}), "cpu")
    assert not torch.equal(first.val.labels, other.val.labels)


def test_mnist_val_digits_are_not_training_digits(mnist_root):
    bundle = build_data(mnist_config(mnist_root, val_size=500, subset=2000), "cpu")
    flat = lambda t: {bytes(row) for row in t.flatten(1).numpy()}  # noqa: E731
    assert not flat(bundle.val.images) & flat(bundle.train.images)


def test_mnist_shuffled_batches_are_seeded(mnist_root):
    config = mnist_config(mnist_root, subset=256, val_size=100, batch_size=64)
    first, second = build_data(config, "cpu"), build_data(config, "cpu")
    epoch1 = epoch(first.train)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(epoch1, epoch(second.train)))
    epoch2 = epoch(first.train)
    assert not torch.equal(torch.cat([y for _, y in epoch1]), torch.cat([y for _, y in epoch2])), "same order every epoch"
    # the same digits, in another order
    assert sorted(torch.cat([y for _, y in epoch1]).tolist()) == sorted(torch.cat([y for _, y in epoch2]).tolist())


def test_mnist_batches_are_normalized(mnist_root):
    bundle = build_data(mnist_config(mnist_root, val_size=5000), "cpu")
    x = torch.cat([x for x, _ in bundle.val])
    assert x.dtype == torch.float32 and x.shape == (5000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1) < 0.05
    # the background is exactly the normalised black
    assert x.min().item() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-5)


def test_mnist_batches_live_on_the_device(mnist_root):
    # The meta device holds no data: a batch that touched the CPU on the way would fail here.
    config = mnist_config(mnist_root, subset=128, val_size=100, batch_size=64, transforms={"rotation": 10, "translate": 0.1})
    bundle = build_data(config, "meta")
    for split in (bundle.train, bundle.val, bundle.test):
        x, y = next(iter(split))
        assert x.device.type == "meta" and y.device.type == "meta"
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)


def test_mnist_augmentation_changes_images_but_not_shape(mnist_root):
    plain = build_data(mnist_config(mnist_root, subset=128, val_size=100, batch_size=64), "cpu")
    augmented = build_data(
        mnist_config(mnist_root, subset=128, val_size=100, batch_size=64, transforms={"rotation": 15, "translate": 0.1}), "cpu"
    )
    (x_plain, y_plain), (x_aug, y_aug) = next(iter(plain.train)), next(iter(augmented.train))
    assert torch.equal(y_plain, y_aug)  # the same digits in the same order
    assert x_aug.shape == x_plain.shape == (64, 1, 28, 28)
    changed = (x_aug - x_plain).flatten(1).abs().amax(1) > 0.5
    assert changed.float().mean() > 0.9, "augmentation left most images unchanged"
    # still digits: a rotation/shift keeps the values in the normalised range and most ink
    assert x_aug.min() >= x_plain.min() - 1e-4 and x_aug.max() <= x_plain.max() + 1e-4
    ink = lambda x: (x > 0).float().sum((1, 2, 3))  # noqa: E731
    assert torch.allclose(ink(x_aug), ink(x_plain), rtol=0.5)
    # evaluation batches are never augmented
    assert torch.equal(next(iter(plain.val))[0], next(iter(augmented.val))[0])


def test_mnist_missing_with_download_off_names_files_and_folder(tmp_path, no_network):
    with pytest.raises(DataError) as info:
        build_data(mnist_config(tmp_path, download=False), "cpu")
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "download is off" in message
    for name in MNIST_FILES:
        assert name in message


def test_mnist_missing_and_no_network_is_a_data_error(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setattr("cnnvis.data.mnist._any_reachable", lambda urls, timeout: True)  # a mirror answers, then fails
    with pytest.raises(DataError, match="download failed") as info:
        build_data(mnist_config(tmp_path), "cpu")
    assert "train-images-idx3-ubyte" in str(info.value)


def test_mnist_corrupt_gz_names_the_file(fresh_mnist_root, no_network):
    packed = fresh_mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:100])  # truncated copy
    with pytest.raises(DataError) as info:
        build_data(mnist_config(fresh_mnist_root, download=False), "cpu")
    assert str(packed) in str(info.value)
    raw = packed.parent
    assert not (raw / "t10k-labels-idx1-ubyte").exists(), "a half-decompressed file was left as if complete"
    assert not list(raw.glob("*.part"))


# ------------------------------------------------------------------ image folders


def labels_of(samples) -> set[int]:
    return {label for _, label in samples}


def test_imagefolder_stratified_split(tiny_imagefolder):
    from cnnvis.data.folders import imagefolder_samples

    folder = tiny_imagefolder(classes=3, per_class=10)
    splits, classes, skipped = imagefolder_samples(folder_config(folder))
    assert classes == ["class_0", "class_1", "class_2"] and skipped == []
    for name in ("train", "val", "test"):
        assert labels_of(splits[name]) == {0, 1, 2}, f"a class is missing from {name}"
    paths = [p for name in ("train", "val", "test") for p, _ in splits[name]]
    assert len(paths) == len(set(paths)) == 30
    for label in range(3):  # 15% of 10 -> 2 each for val and test, per class
        assert sum(1 for _, y in splits["val"] if y == label) == 2
        assert sum(1 for _, y in splits["test"] if y == label) == 2
    again, _, _ = imagefolder_samples(folder_config(folder))
    assert again == splits
    other, _, _ = imagefolder_samples(build_config({**folder_config(folder).model_dump(), "seed": 5}))
    assert other["val"] != splits["val"]


def test_imagefolder_bundle_batches(tiny_imagefolder):
    folder = tiny_imagefolder(classes=2, per_class=6, size=20)
    bundle = build_data(folder_config(folder), "cpu")
    assert list(bundle.spec.class_names) == ["class_0", "class_1"]
    assert (bundle.spec.in_channels, bundle.spec.image_size) == (3, 16)
    assert (bundle.spec.mean, bundle.spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert sum(bundle.sizes.values()) == 12
    x, y = next(iter(bundle.val))
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # ImageNet normalisation: pure black maps to -mean/std
    assert x.min().item() >= min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)) - 1e-4


def test_imagefolder_subset_keeps_several_classes(tiny_imagefolder):
    folder = tiny_imagefolder(classes=4, per_class=20)  # 14 training images per class
    bundle = build_data(folder_config(folder, subset=8), "cpu")
    assert bundle.sizes["train"] == 8
    labels = torch.cat([y for _, y in bundle.train])
    assert len(labels.unique()) >= 2, "data.subset took the first class only"


def _save_mode_images(folder: Path) -> list[str]:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    folder.mkdir(parents=True)
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(grey).convert("1").save(folder / "bilevel.png")
    Image.fromarray(np.dstack([grey, grey])).save(folder / "grey_alpha.png")
    Image.fromarray(np.dstack([rgb, grey])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette_transparent.png", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb).save(folder / "rgb.webp")
    return sorted(p.name for p in folder.iterdir())


def test_every_image_mode_loads_as_rgb(tmp_path):
    names = _save_mode_images(tmp_path / "modes")
    modes = set()
    for name in names:
        path = tmp_path / "modes" / name
        with Image.open(path) as image:
            modes.add(image.mode)
        assert check_image(path) is None, name
        loaded = load_rgb(path)
        assert loaded.mode == "RGB" and loaded.size == (20, 24), name
    assert {"L", "1", "LA", "RGBA", "P", "CMYK", "RGB"} <= modes
    assert modes & {"I;16", "I"}, "the 16-bit PNG did not open as a 16-bit mode"


def test_imagefolder_with_every_mode_gives_three_channel_tensors(tmp_path):
    names = _save_mode_images(tmp_path / "folder" / "mixed")
    _save_mode_images(tmp_path / "folder" / "other")
    bundle = build_data(folder_config(tmp_path / "folder"), "cpu")
    assert bundle.skipped == []
    assert sum(bundle.sizes.values()) == 2 * len(names)
    for loader in (bundle.train, bundle.val, bundle.test):
        for x, _ in loader:
            assert x.shape[1:] == (3, 16, 16) and torch.isfinite(x).all()


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 0, 127, 255]


def test_transparent_pixels_become_white():
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red; the rest fully transparent black
    rgb = np.asarray(to_rgb(Image.fromarray(pixels)))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[1, 1].tolist() == [255, 255, 255]


def test_bad_files_are_skipped_and_reported(tiny_imagefolder):
    folder = tiny_imagefolder(classes=2, per_class=6, fmt="jpg")
    good = folder / "class_0" / "img_000.jpg"
    truncated = folder / "class_0" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = folder / "class_1" / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "class_1" / "notes.jpg"
    text.write_text("this is not a picture\n")
    bundle = build_data(folder_config(folder), "cpu")
    reasons = dict(bundle.skipped)
    assert set(reasons) == {str(truncated), str(empty), str(text)}
    assert reasons[str(empty)] == "empty file"
    assert reasons[str(text)] == "not an image"
    assert "truncated" in reasons[str(truncated)].lower()
    assert sum(bundle.sizes.values()) == 12
    # every epoch runs through without meeting them
    for loader in (bundle.train, bundle.val, bundle.test):
        assert sum(len(y) for _, y in loader) == len(loader.dataset)
    used = {p for ds in (bundle.train.dataset, bundle.val.dataset, bundle.test.dataset) for p, _ in ds.samples}
    assert not used & set(reasons)


def test_empty_class_folder_is_named(tiny_imagefolder):
    folder = tiny_imagefolder(classes=2, per_class=4)
    (folder / "orchid").mkdir()
    with pytest.raises(DataError, match="orchid"):
        build_data(folder_config(folder), "cpu")


def test_class_folder_with_only_bad_files_is_named(tiny_imagefolder):
    folder = tiny_imagefolder(classes=2, per_class=4)
    (folder / "orchid").mkdir()
    (folder / "orchid" / "broken.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable images.*orchid"):
        build_data(folder_config(folder), "cpu")


def test_no_class_folders(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "loose.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        build_data(folder_config(folder), "cpu")


def test_missing_folder_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        build_data(folder_config(tmp_path / "nowhere"), "cpu")
    with pytest.raises(DataError, match="data.path is not set"):
        build_data(build_config({"data": {"dataset": "imagefolder"}}), "cpu")


def test_cnnvis_data_overrides_data_root(tiny_imagefolder, tmp_path, monkeypatch):
    folder = tiny_imagefolder(classes=2, per_class=4, name="pics")
    raw = {"data": {"dataset": "imagefolder", "root": str(tmp_path / "elsewhere"), "path": "pics", "num_workers": 0}}
    with pytest.raises(DataError, match="image folder not found"):
        build_data(build_config(raw), "cpu")
    monkeypatch.setenv("CNNVIS_DATA", str(folder.parent))
    config = build_config(raw)  # the environment counts when a config is built (a run's stored one too)
    assert data_root(config.data) == folder.parent and config.data.root_source == "environment"
    bundle = build_data(config, "cpu")
    assert list(bundle.spec.class_names) == ["class_0", "class_1"] and bundle.root == folder.parent
    monkeypatch.delenv("CNNVIS_DATA")
    assert data_root(build_config(raw).data) == tmp_path / "elsewhere"


def test_data_root_precedence_override_then_environment_then_file_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("CNNVIS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    where = lambda name: str(tmp_path / name)  # noqa: E731 - every root comes out absolute
    from_file = {"data": {"root": "from-file"}}
    assert (build_config({}).data.root, build_config({}).data.root_source) == (where("data"), "default")
    assert (build_config(from_file).data.root, build_config(from_file).data.root_source) == (where("from-file"), "config")
    monkeypatch.setenv("CNNVIS_DATA", "from-env")
    assert (build_config(from_file).data.root, build_config(from_file).data.root_source) == (where("from-env"), "environment")
    assert (build_config({}).data.root, build_config({}).data.root_source) == (where("from-env"), "environment")
    overridden = build_config(from_file, ["data.root=from-set"])
    assert (overridden.data.root, overridden.data.root_source) == (where("from-set"), "override")  # --set beats CNNVIS_DATA


def test_cnnvis_data_overrides_root_for_mnist(mnist_root, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("CNNVIS_DATA", str(mnist_root))
    bundle = build_data(mnist_config(tmp_path / "not-here", download=False, val_size=100, subset=100), "cpu")
    assert bundle.sizes["test"] == 10_000


def test_shared_flowers5_is_an_imagefolder(shared_data):
    """The real flowers5 folder: five classes found (listing only, no decoding of 4,317 photos)."""
    folder = shared_data / "flowers5"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert classes == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    sample = next((folder / "rose").iterdir())
    assert check_image(sample) is None
    assert load_rgb(sample).mode == "RGB"


def test_mnist_gz_in_a_read_only_folder_is_decompressed_into_the_cache(fresh_mnist_root, tmp_path, monkeypatch, no_network):
    raw = fresh_mnist_root / "MNIST" / "raw"
    real_access = os.access
    monkeypatch.setattr("cnnvis.data.mnist.os.access", lambda path, mode: False if Path(path) == raw else real_access(path, mode))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tensors = load_mnist_tensors(fresh_mnist_root, download=False)
    assert tensors["train"][0].shape == (60000, 28, 28) and tensors["test"][1].shape == (10000,)
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{n}.gz" for n in MNIST_FILES), "wrote into the read-only folder"
    assert (tmp_path / "cache" / "cnnvis" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
