"""Grad-CAM++ (Chattopadhay et al. 2018, "Grad-CAM++: Improved Visual Explanations ...").

Weights follow pytorch-grad-cam's ``GradCAMPlusPlus`` exactly: with an exponential output the
higher derivatives are powers of the first one (eq. 19), so

    a_ij^kc = g^2 / (2 g^2 + sum_ab A^k_ab * g^3),  g = dY^c/dA^k_ij        (eq. 19)
    w_k^c  = sum_ij a_ij^kc * ReLU(g)                                       (eq. 7 / 9)

with ``a = 0`` where ``g == 0`` and ``eps = 1e-6`` in the denominator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.cam_base import gradient_cam
from cnnvis.vis.hooks import Targets

EPS = 1e-6


def gradcampp_weights(acts: Tensor, grads: Tensor) -> Tensor:
    g2 = grads.pow(2)
    g3 = g2 * grads
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_acts * g3 + EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (grads.clamp(min=0) * alpha).sum(dim=(2, 3))


def gradcampp(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    aug_smooth: bool = False,
) -> Tensor:
    """Grad-CAM++ heatmaps ``[N, H, W]`` (raw); options as for :func:`~cnnvis.vis.gradcam.gradcam`."""
    return cam_maps(lambda x, t: gradient_cam(model, x, t, layer, gradcampp_weights, relu=relu, upsample_to_input=upsample),
                    model, images, targets, aug_smooth)
