"""Image folders decoded once and batched on the device: the same evaluation images as the file
path, per-image batched augmentation, a seeded and resumable order, and the automatic choice."""

from __future__ import annotations

import pytest
import torch

from cnnvis.config import build_config
from cnnvis.data import build_data, folders
from cnnvis.data.tensors import BatchAugment, DeviceBatches


def config(path, **data):
    return build_config({"seed": 3, "data": {
        "dataset": "imagefolder", "path": str(path), "num_workers": 0, "batch_size": 4, "eval_batch_size": 5,
        "transforms": {"image_size": 16, "resize": 20, "random_crop": True, "flip": True, "color_jitter": 0.2}, **data}})


def test_in_memory_evaluation_images_equal_the_file_path(tiny_imagefolder):
    folder = tiny_imagefolder(classes=3, per_class=6, size=24)
    on_device = build_data(config(folder, in_memory=True))
    from_files = build_data(config(folder, in_memory=False))
    assert isinstance(on_device.train, DeviceBatches) and "decoded once" in on_device.pipeline
    assert on_device.sizes == from_files.sizes and on_device.spec == from_files.spec
    for split in ("val", "test"):
        ours = torch.cat([x for x, _ in on_device.split(split)])
        theirs = torch.cat([x for x, _ in from_files.split(split)])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # the same resize, crop and normalisation
        fixed, reference = on_device.fixed_batch(split, 3), from_files.fixed_batch(split, 3)
        torch.testing.assert_close(fixed.images, reference.images, atol=1e-5, rtol=0)
        assert fixed.sources == reference.sources


def test_training_batches_are_augmented_per_image_seeded_and_resumable(tiny_imagefolder):
    folder = tiny_imagefolder(classes=2, per_class=8, size=24)
    train = build_data(config(folder, in_memory=True)).train
    assert len(train) == 3  # 12 training images (2 of each class are held out), 4 a batch
    state = train.state_dict()
    first = [(x.clone(), y.clone()) for x, y in train]
    assert all(x.shape[1:] == (3, 16, 16) for x, _ in first)
    train.load_state_dict(state)  # a resumed run draws the same order and augmentation again
    again = list(train)
    assert all(torch.equal(a, b) and torch.equal(p, q) for (a, p), (b, q) in zip(first, again))
    second = list(train)  # the next epoch: another order and other crops
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(again, second))


def test_batch_augment_flips_crops_and_jitters_each_image_its_own_way():
    images = torch.rand(64, 3, 20, 20)
    plain = build_config({"data": {"transforms": {"image_size": 20}}}).data.transforms
    assert not BatchAugment(plain, 20, torch.Generator()).active
    flip_only = plain.model_copy(update={"flip": True})
    out = BatchAugment(flip_only, 20, torch.Generator().manual_seed(0))(images)
    flipped = torch.isclose(out, images.flip(-1), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(out, images, atol=1e-5).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48  # each image flipped or not, about half
    cropped = BatchAugment(plain.model_copy(update={"random_crop": True, "crop_scale": 0.3}), 12,
                           torch.Generator().manual_seed(0))(images)
    assert cropped.shape == (64, 3, 12, 12)
    jittered = BatchAugment(plain.model_copy(update={"color_jitter": 0.4}), 20, torch.Generator().manual_seed(0))(images)
    ratios = (jittered.mean(dim=(1, 2, 3)) / images.mean(dim=(1, 2, 3)))
    assert ratios.std() > 0.02 and float(jittered.min()) >= 0 and float(jittered.max()) <= 1


def test_auto_keeps_small_folders_in_memory_and_large_ones_on_disk(tiny_imagefolder, monkeypatch):
    folder = tiny_imagefolder(classes=2, per_class=4, size=24)
    assert isinstance(build_data(config(folder)).train, DeviceBatches)  # auto: 8 small images fit
    monkeypatch.setattr(folders, "IN_MEMORY_LIMIT", 100)
    bundle = build_data(config(folder))
    assert not isinstance(bundle.train, DeviceBatches) and "per batch" in bundle.pipeline


def test_in_memory_refuses_nothing_but_bad_files_stay_out(tiny_imagefolder):
    folder = tiny_imagefolder(classes=2, per_class=4, size=24)
    (folder / "class_0" / "broken.png").write_bytes(b"not a png")
    bundle = build_data(config(folder, in_memory=True))
    assert sum(bundle.sizes.values()) == 8 and [p for p, _ in bundle.skipped] == [str(folder / "class_0" / "broken.png")]


@pytest.mark.parametrize("rotation,translate", [(10.0, 0.1), (0.0, 0.0)])
def test_digit_batches_draw_the_same_randoms_as_before(rotation, translate):
    """MNIST's augmentation draws one ``rand(n, 3)`` per batch (rotation, shift): a run's numbers stay."""
    t = build_config({"data": {"transforms": {"rotation": rotation, "translate": translate}}}).data.transforms
    gen = torch.Generator().manual_seed(0)
    BatchAugment(t, 28, gen)(torch.rand(5, 1, 28, 28))
    reference = torch.Generator().manual_seed(0)
    if rotation or translate:
        torch.rand(5, 3, generator=reference)
    assert torch.equal(gen.get_state(), reference.get_state())
