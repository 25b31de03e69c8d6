"""Eigen-CAM (Muhammad & Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN).

Class-agnostic and gradient-free: the map is the projection of the layer's activations on their
first principal component. With ``A`` reshaped to ``X: [h*w, K]`` (one row per position) and
centred over positions, ``X = U S V^T`` and

    map = X V_1          (the first right singular vector; pytorch-grad-cam's ``get_2d_projection``)

A singular vector's sign is arbitrary (``-V_1`` is as good), and which one a LAPACK build returns
is not defined, so we fix it: ``V_1`` is oriented to have a non-negative sum over channels, so
positions where the channels fire together score high. pytorch-grad-cam keeps whatever sign
NumPy returns; its maps equal ours or, after its ReLU, show the complementary region.
``targets`` are accepted for a uniform signature and ignored. NaN activations count as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.cam_base import finish_map, layer_activations
from cnnvis.vis.hooks import Targets


def first_component_projection(acts: Tensor) -> Tensor:
    """``[N, K, h, w]`` activations -> ``[N, h, w]`` projections on their first principal component."""
    n, k, h, w = acts.shape
    x = torch.nan_to_num(acts, nan=0.0).reshape(n, k, h * w).transpose(1, 2)
    x = x - x.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # batched over images
    v = vh[:, 0, :]
    v = torch.where(v.sum(dim=1, keepdim=True) < 0, -v, v)
    return (x @ v[:, :, None]).reshape(n, h, w)


def eigencam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    aug_smooth: bool = False,
) -> Tensor:
    """Eigen-CAM heatmaps ``[N, H, W]`` (raw); options as for :func:`~cnnvis.vis.gradcam.gradcam`."""
    def run(x: Tensor, t: Targets) -> Tensor:
        _, acts, _, _ = layer_activations(model, x, t, layer)
        return finish_map(first_component_projection(acts), relu, tuple(x.shape[-2:]) if upsample else None)

    return cam_maps(run, model, images, targets, aug_smooth)
