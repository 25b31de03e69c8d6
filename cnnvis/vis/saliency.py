"""Vanilla gradient saliency (Simonyan et al. 2014, "Deep Inside Convolutional Networks", sec. 3.1)."""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.gradients import input_gradients
from cnnvis.vis.hooks import Targets
from cnnvis.vis.maps import Reduce, reduce_channels


def saliency(model: nn.Module, images: Tensor, targets: Targets = "pred", *, reduce: Reduce = "absmax") -> Tensor:
    """``M_ij = max_c |dS_c/dI_cij|`` as ``[N, H, W]`` (= Captum ``Saliency(abs=True)`` then max over channels).

    ``reduce=None`` returns the signed gradient ``[N, C, H, W]``.
    """
    return reduce_channels(input_gradients(model, images, targets), reduce)
