"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks ...")."""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.cam_base import gradient_cam
from cnnvis.vis.hooks import Targets


def gradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """alpha_k^c = 1/Z sum_ij dY^c/dA^k_ij: global-average-pooled gradients (eq. 1)."""
    return grads.mean(dim=(2, 3))


def gradcam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    aug_smooth: bool = False,
) -> Tensor:
    """Grad-CAM heatmaps ``[N, H, W]`` (raw, unnormalised; use ``normalize_maps`` to display).

    ``layer`` defaults to :func:`~cnnvis.vis.hooks.default_layer`. ``relu=False`` keeps negative
    evidence (Captum's ``LayerGradCam`` default); ``upsample=False`` returns the layer-resolution map.
``aug_smooth=True`` averages the min-max scaled maps of flipped and brightness-scaled copies
(:mod:`~cnnvis.vis.aug_smooth`; the result is then in [0, 1]).
    """
    return cam_maps(lambda x, t: gradient_cam(model, x, t, layer, gradcam_weights, relu=relu, upsample_to_input=upsample),
                    model, images, targets, aug_smooth)
