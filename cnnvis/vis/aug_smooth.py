"""Test-time augmentation smoothing for every CAM method (``aug_smooth=True``).

The map of each image is computed on six copies -- unflipped and horizontally flipped, each with
its pixel values multiplied by 0.9, 1 and 1.1 -- every map is min-max scaled to [0, 1], the
flipped ones are flipped back, and the six are averaged. This is pytorch-grad-cam's
``aug_smooth`` (its default ``ttach`` transforms ``HorizontalFlip`` x ``Multiply([0.9, 1, 1.1])``);
the idea of averaging explanations over augmented inputs is Jacob Gildenblat's, in the spirit of
SmoothGrad (Smilkov et al. 2017). It centres maps better on objects and softens CAM's blockiness.

All copies go through the method as one batch of ``6 N`` images, with the targets resolved once
on the original images (``"pred"`` means the class predicted for the unaugmented image; a flip
must not change *which* class is explained). The result is in [0, 1] by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cnnvis.vis.hooks import (
    Targets,
    check_images,
    model_state,
    predict,
    resolve_targets,
)
from cnnvis.vis.maps import minmax_scale

FLIPS = (False, True)
FACTORS = (0.9, 1.0, 1.1)

#: run(images [M, C, H, W], targets) -> maps [M, h, w]
CamRun = Callable[[Tensor, Targets], Tensor]


def augmentation_smoothed(run: CamRun, model: nn.Module, images: Tensor, targets: Targets) -> Tensor:
    """Mean of the min-max scaled maps of the six augmented copies, aligned back to ``images``."""
    check_images(model, images)
    with model_state(model, grad=False):
        t = resolve_targets(targets, predict(model, images))
    copies = [(images.flip(-1) if flip else images) * factor for flip in FLIPS for factor in FACTORS]
    maps = minmax_scale(run(torch.cat(copies), t.repeat(len(copies))))
    maps = maps.reshape(len(FLIPS), len(FACTORS), -1, *maps.shape[-2:])
    maps = torch.stack([m.flip(-1) if flip else m for m, flip in zip(maps, FLIPS)])
    return maps.mean(dim=(0, 1))


def cam_maps(run: CamRun, model: nn.Module, images: Tensor, targets: Targets, aug_smooth: bool) -> Tensor:
    """``run(images, targets)``, or its augmentation-smoothed version: how every CAM method ends."""
    return augmentation_smoothed(run, model, images, targets) if aug_smooth else run(images, targets)
