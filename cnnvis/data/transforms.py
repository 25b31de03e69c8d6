"""Preprocessing presets: normalisation statistics, the evaluation transform and the training one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T

from cnnvis.config import Config, TransformConfig

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
#: photos: ImageNet statistics suit any natural images (and are what pretrained weights expect)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_statistics(config: Config) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """``(mean, std, where from)`` photos are normalised with: the statistics of the named library
    weights the model starts from (``model.arch: timm:NAME`` / ``torchvision:NAME`` with
    ``model.pretrained`` a weights name), else the ImageNet ones. Read from the library's tables,
    never downloaded, so a run rebuilt later (offline, without its pretrained weights) agrees."""
    model = config.model
    if model.pretrained and ":" in model.arch:
        from cnnvis.zoo import weights_preprocessing

        preprocessing = weights_preprocessing(model.arch, model.pretrained)
        if preprocessing is not None:
            return tuple(preprocessing.mean), tuple(preprocessing.std), f"the statistics of the {preprocessing.source}"
    return IMAGENET_MEAN, IMAGENET_STD, "the ImageNet statistics"


def eval_transform(t: TransformConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The preprocessing every evaluated image gets (also the user's own files in ``visualize``)."""
    resize = t.resize or t.image_size
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(resize, antialias=True),
            T.CenterCrop(t.image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean), list(std)),
        ]
    )


def train_transform(t: TransformConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Per-image augmentation of decoded photos, then the same normalisation as evaluation."""
    steps: list = [T.ToImage()]
    if t.random_crop:
        steps.append(T.RandomResizedCrop(t.image_size, scale=(t.crop_scale, 1.0), antialias=True))
    else:
        steps += [T.Resize(t.resize or t.image_size, antialias=True), T.CenterCrop(t.image_size)]
    if t.flip:
        steps.append(T.RandomHorizontalFlip())
    if t.rotation or t.translate:
        steps.append(T.RandomAffine(degrees=t.rotation, translate=(t.translate, t.translate) if t.translate else None))
    if t.color_jitter:
        j = t.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)
