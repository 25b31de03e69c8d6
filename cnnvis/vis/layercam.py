"""LayerCAM (Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps for
Localization", IEEE TIP).

Each position weighs its activation by its own positive gradient:

    map_c = sum_k  ReLU(dY^c/dA^k)  (.)  A^k

Per-position weights keep fine detail that Grad-CAM's channel averages wash out, so LayerCAM
also gives usable maps from shallow, high-resolution layers (pass ``layer``).
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.cam_base import gradient_map
from cnnvis.vis.hooks import Targets


def layercam_map(acts: Tensor, grads: Tensor) -> Tensor:
    return (grads.clamp(min=0) * acts).sum(dim=1)


def layercam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    aug_smooth: bool = False,
) -> Tensor:
    """LayerCAM heatmaps ``[N, H, W]`` (raw); options as for :func:`~cnnvis.vis.gradcam.gradcam`."""
    return cam_maps(lambda x, t: gradient_map(model, x, t, layer, layercam_map, relu=relu, upsample_to_input=upsample),
                    model, images, targets, aug_smooth)
