"""XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization and
Explanation of CNNs", BMVC).

Channel weights chosen to satisfy the sensitivity and conservation axioms:

    w_k^c = sum_ij ( A^k_ij / (sum_ab A^k_ab + eps) ) * dY^c/dA^k_ij,      eps = 1e-7

(pytorch-grad-cam's ``XGradCAM``, same ``eps``). Unlike Grad-CAM's plain average, each
gradient counts in proportion to its activation.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.cam_base import gradient_cam
from cnnvis.vis.hooks import Targets

EPS = 1e-7


def xgradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    return (grads * acts / (acts.sum(dim=(2, 3), keepdim=True) + EPS)).sum(dim=(2, 3))


def xgradcam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    aug_smooth: bool = False,
) -> Tensor:
    """XGrad-CAM heatmaps ``[N, H, W]`` (raw); options as for :func:`~cnnvis.vis.gradcam.gradcam`."""
    return cam_maps(lambda x, t: gradient_cam(model, x, t, layer, xgradcam_weights, relu=relu, upsample_to_input=upsample),
                    model, images, targets, aug_smooth)
