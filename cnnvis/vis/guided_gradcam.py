"""Guided Grad-CAM (Selvaraju et al. 2017, sec. 3.1): guided backprop times upsampled Grad-CAM."""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.cam_base import layer_activations_and_gradients, weighted_map
from cnnvis.vis.gradcam import gradcam_weights
from cnnvis.vis.guided_backprop import guided_backprop_gradients
from cnnvis.vis.hooks import Targets
from cnnvis.vis.maps import Reduce, reduce_channels


def guided_gradcam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    reduce: Reduce = "absmax",
) -> Tensor:
    """``guided_backprop(x) * upsample(ReLU(Grad-CAM))`` per pixel and channel, reduced to ``[N, H, W]``.

    Grad-CAM is upsampled bilinearly (Captum's ``GuidedGradCam`` defaults to nearest).
    ``reduce=None`` returns the ``[N, C, H, W]`` product.
    """
    acts, grads, t = layer_activations_and_gradients(model, images, targets, layer)
    heat = weighted_map(acts, gradcam_weights(acts, grads), relu=True, size=tuple(images.shape[-2:]))
    guided = guided_backprop_gradients(model, images, t)
    return reduce_channels(guided * heat[:, None], reduce)
