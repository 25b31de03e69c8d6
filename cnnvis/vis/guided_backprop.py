"""Guided backpropagation (Springenberg et al. 2014, "Striving for Simplicity", sec. 3.4, fig. 1).

At every rectifier the backward signal is ``R_l = f'(x) * relu(R_{l+1})``: for ReLU the usual
mask ``(x > 0)`` times a mask that drops negative gradients; ReLU6, clamps (Hardtanh with
``min_val >= 0``), LeakyReLU and PReLU get the same rule with their own derivative. The rule and
how it reaches every rectifier call without touching the model: :mod:`cnnvis.vis.rectifier_rules`.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.hooks import Targets
from cnnvis.vis.maps import Reduce, reduce_channels
from cnnvis.vis.rectifier_rules import rectified_gradients


def guided_backprop_gradients(model: nn.Module, images: Tensor, targets: Targets = "pred") -> Tensor:
    """Signed guided-backprop gradients ``[N, C, H, W]``.

    Raises :class:`~cnnvis.errors.UnsupportedModelError` if the model calls no rectifier; warns
    (:class:`~cnnvis.errors.VisWarning`) naming the activations (GELU, SiLU ...) that keep the plain gradient.
    """
    return rectified_gradients(model, images, targets, "guided")


def guided_backprop(model: nn.Module, images: Tensor, targets: Targets = "pred", *, reduce: Reduce = "absmax") -> Tensor:
    """Guided-backprop heatmaps ``[N, H, W]`` (``reduce=None``: the signed ``[N, C, H, W]`` gradients;
    = Captum ``GuidedBackprop`` on models whose rectifiers are all ``nn.ReLU`` modules)."""
    return reduce_channels(guided_backprop_gradients(model, images, targets), reduce)
