"""The CAM family shares one computation; the methods differ only in their channel weights.

    map_c = ReLU( sum_k  w_k^c  A^k )            (Selvaraju et al. 2017, eq. 2)

``A`` is the ``[N, K, h, w]`` output of a conv layer (or a transformer's tokens on their patch grid,
see :mod:`cnnvis.vis.layouts`) and ``w`` the ``[N, K]`` channel weights,
computed from ``A`` and ``dY^c/dA`` by a small weight function (pytorch-grad-cam's design:
each method only overrides ``get_cam_weights``). The map is then upsampled bilinearly to the
input resolution.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from cnnvis.errors import UnsupportedModelError
from cnnvis.vis.hooks import (
    Targets,
    as_input,
    capture,
    check_images,
    default_layer,
    resolve_targets,
    target_scores,
)
from cnnvis.vis.maps import upsample

#: weights(activations [N,K,h,w], gradients [N,K,h,w]) -> channel weights [N,K]
WeightFn = Callable[[Tensor, Tensor], Tensor]


def weighted_map(acts: Tensor, weights: Tensor, relu: bool, size: tuple[int, int] | None) -> Tensor:
    """``sum_k w_k A^k``, optional ReLU, optional bilinear upsampling to ``size``."""
    cam = (weights[:, :, None, None] * acts).sum(dim=1)
    if relu:
        cam = cam.clamp(min=0)
    return upsample(cam, size) if size is not None else cam


def layer_activations_and_gradients(
    model: nn.Module, images: Tensor, targets: Targets, layer: str | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, dY^c/dA, targets)`` for the layer: one forward, one ``autograd.grad`` down to the layer only."""
    check_images(model, images)
    name = default_layer(model, images) if layer is None else layer
    with capture(model, name, grads=True) as cap:
        logits = model(as_input(images, requires_grad=True))
        t = resolve_targets(targets, logits)
        layout = cap.layouts.get(name)
        if layout is not None and (not layout.is_map or len(layout.map_shape()) != 4):
            # before the backward pass: a layer that is no map is refused without the cost of one
            why = f": {layout.reason}" if layout.reason else ""
            raise UnsupportedModelError(f"layer {name!r} outputs shape {list(layout.shape)}, not a spatial map "
                                        f"[N, C, h, w] or a token grid{why}; pick a convolutional or block layer")
        # summing over the batch is exact: in eval mode each image's score depends on that image only
        grads = cap.gradients(target_scores(logits, t).sum())[name]
        acts = cap.value(name)
    return acts, grads.detach(), t


def gradient_cam(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    layer: str | None,
    weight_fn: WeightFn,
    relu: bool = True,
    upsample_to_input: bool = True,
) -> Tensor:
    """Run a gradient-weighted CAM method; ``[N, H, W]`` (or ``[N, h, w]`` without upsampling)."""
    acts, grads, _ = layer_activations_and_gradients(model, images, targets, layer)
    weights = weight_fn(acts, grads)
    return weighted_map(acts, weights, relu, tuple(images.shape[-2:]) if upsample_to_input else None)
