"""What a training step adds besides the gradient: MixUp / CutMix batches and an exponential
moving average (EMA) of the weights, both from torch and torchvision rather than hand-written.

* MixUp (Zhang et al. 2018) blends two images and their labels; CutMix (Yun et al. 2019) pastes a
  box of one image into another and mixes the labels by area. With both on, each batch gets one of
  them at random (``torchvision.transforms.v2.RandomChoice``). Targets become probabilities, which
  ``cross_entropy`` takes as they are (label smoothing still applies).
* The EMA of the weights (``torch.optim.swa_utils.AveragedModel``, BatchNorm statistics included)
  is what gets evaluated, checkpointed and explained when ``train.ema`` is set: on small data sets
  it is steadier and usually more accurate than the last step's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cnnvis.config import TrainConfig


class BatchMixer:
    """``(images, labels) -> (mixed images, target probabilities)`` with MixUp and/or CutMix."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int) -> None:
        from torchvision.transforms import v2

        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(images, labels)


def batch_mixer(train: TrainConfig, num_classes: int) -> BatchMixer | None:
    """The mixer ``train.mixup`` / ``train.cutmix`` ask for, or None."""
    if train.mixup <= 0 and train.cutmix <= 0:
        return None
    return BatchMixer(train.mixup, train.cutmix, num_classes)


def hard_labels(targets: Tensor) -> Tensor:
    """Class indices from indices or from (mixed) target probabilities: the dominant class."""
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An EMA copy of ``model`` (parameters and buffers) updated with ``decay`` per step, or None for 0."""
    if decay <= 0:
        return None
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    # the copy keeps the trainer's memory format note, so evaluation feeds it the same layout
    averaged.module._cnnvis_memory_format = getattr(model, "_cnnvis_memory_format", torch.contiguous_format)
    return averaged


def averaged_state(averaged: AveragedModel) -> dict[str, Any]:
    """What a checkpoint keeps of the average besides its weights: how many steps it holds."""
    return {"n_averaged": int(averaged.n_averaged)}


def restore_average(averaged: AveragedModel, weights: dict[str, Tensor], state: dict[str, Any]) -> None:
    averaged.module.load_state_dict(weights)
    averaged.n_averaged.fill_(int(state.get("n_averaged", 0)))
