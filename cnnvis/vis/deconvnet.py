"""Deconvnet (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks", sec. 2.1).

The input gradient with the deconvnet's rectification at every rectifier: the backward signal is
``R_l = relu(R_{l+1})``, the upstream gradient's positive part, *not* gated by the sign of the
forward input (guided backprop gates by both). ReLU6, clamps, LeakyReLU and PReLU get the same
sign-rectified signal. Max pooling routes through the forward's argmax ("switches"), as the
plain gradient does. Mechanism: :mod:`cnnvis.vis.rectifier_rules`.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.hooks import Targets
from cnnvis.vis.maps import Reduce, reduce_channels
from cnnvis.vis.rectifier_rules import rectified_gradients


def deconvnet(model: nn.Module, images: Tensor, targets: Targets = "pred", *, reduce: Reduce = "absmax") -> Tensor:
    """Deconvnet heatmaps ``[N, H, W]``; ``reduce=None`` returns the signed ``[N, C, H, W]``
    reconstruction (= Captum ``Deconvolution`` on models whose rectifiers are all ``nn.ReLU`` modules).

    Raises :class:`~cnnvis.errors.UnsupportedModelError` if the model calls no rectifier; warns
    (:class:`~cnnvis.errors.VisWarning`) naming the activations (GELU, SiLU ...) that keep the plain gradient.
    """
    return reduce_channels(rectified_gradients(model, images, targets, "deconvnet"), reduce)
