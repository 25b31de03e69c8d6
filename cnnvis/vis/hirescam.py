"""HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations of
convolutional neural networks").

Grad-CAM averages the gradient over positions before multiplying; HiResCAM multiplies first:

    map_c = sum_k  dY^c/dA^k  (.)  A^k          (element-wise product)

For a model whose head is global average pooling + linear this equals the class activation map
(scaled by 1/(hw)), so the map shows exactly where the score comes from. No ReLU on the gradients.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.cam_base import gradient_map
from cnnvis.vis.hooks import Targets


def hirescam_map(acts: Tensor, grads: Tensor) -> Tensor:
    return (grads * acts).sum(dim=1)


def hirescam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    aug_smooth: bool = False,
) -> Tensor:
    """HiResCAM heatmaps ``[N, H, W]`` (raw); options as for :func:`~cnnvis.vis.gradcam.gradcam`."""
    return cam_maps(lambda x, t: gradient_map(model, x, t, layer, hirescam_map, relu=relu, upsample_to_input=upsample),
                    model, images, targets, aug_smooth)
