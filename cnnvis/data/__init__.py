"""Data sets as batches for training and fixed images for every later command.

* ``bundle.py``      -- :class:`ImageSpec` (class names, normalisation, channels, size) and :class:`DataBundle`
* ``mnist.py``       -- MNIST decoded once, batched and augmented on the device
* ``folders.py``     -- image folders and Flowers-102 (in memory or through a ``DataLoader``), the stratified split
* ``tensors.py``     -- uint8 images on the device: batches, batched per-image augmentation
* ``transforms.py``  -- normalisation statistics, evaluation and training transforms
* ``images.py``      -- decoding any image file to RGB; finding unreadable files up front
"""

from __future__ import annotations

import torch

from cnnvis.config import Config
from cnnvis.data.bundle import (
    BatchSource,
    DataBundle,
    FixedImages,
    ImageSpec,
    check_split,
)
from cnnvis.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    eval_transform,
    photo_statistics,
    train_transform,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_MEAN", "MNIST_STD", "BatchSource", "DataBundle", "FixedImages",
    "ImageSpec", "build_data", "check_data", "check_split", "dataset_spec", "eval_transform", "photo_statistics",
    "train_transform",
]


def build_data(config: Config, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> DataBundle:
    """Build the train/val/test batch sources described by ``config.data``; with ``world_size``
    processes, the batches of process ``rank``: its share of each global training batch
    (``data.batch_size``) and of each evaluation split."""
    device = torch.device(device)
    if config.data.dataset == "mnist":
        from cnnvis.data.mnist import build_mnist

        return build_mnist(config, device, rank, world_size)
    from cnnvis.data.folders import build_flowers102, build_imagefolder

    builder = build_imagefolder if config.data.dataset == "imagefolder" else build_flowers102
    return builder(config, device, rank, world_size)


def check_data(config: Config) -> DataBundle:
    """The data of ``config`` with every image decoded once to find unreadable files (they are
    skipped and listed in ``skipped``), read through the file pipeline: nothing is decoded twice."""
    data = config.data.model_copy(update={"in_memory": False})
    return build_data(config.model_copy(update={"data": data}), "cpu")


def dataset_spec(config: Config) -> ImageSpec:
    """The :class:`ImageSpec` of ``config.data`` without decoding any image (for summaries)."""
    data = config.data
    if data.dataset == "mnist":
        from cnnvis.data.mnist import MNIST_SPEC

        return MNIST_SPEC
    from cnnvis.data.folders import FLOWERS102_CLASSES, folder_classes, photo_spec

    names = FLOWERS102_CLASSES if data.dataset == "flowers102" else folder_classes(config)[1]
    mean, std, _ = photo_statistics(config)
    return photo_spec(names, data.transforms, mean, std)
