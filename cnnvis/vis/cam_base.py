"""The CAM family shares one computation; the methods differ only in their channel weights.

    map_c = ReLU( sum_k  w_k^c  A^k )            (Selvaraju et al. 2017, eq. 2)

``A`` is the ``[N, K, h, w]`` output of a conv layer (or a transformer's tokens on their patch grid,
see :mod:`cnnvis.vis.layouts`) and ``w`` the ``[N, K]`` channel weights,
computed from ``A`` and ``dY^c/dA`` by a small weight function (pytorch-grad-cam's design:
each method only overrides ``get_cam_weights``). The map is then upsampled bilinearly to the
input resolution. Methods with per-position weights (HiResCAM, LayerCAM) give a map function
``(A, dY/dA) -> [N, h, w]`` to :func:`gradient_map` instead; gradient-free ones (Score-CAM,
Ablation-CAM, Eigen-CAM) read ``A`` with :func:`layer_activations`. Layer outputs are always read
through :func:`~cnnvis.vis.hooks.capture`.
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
    predict,
    resolve_targets,
    target_scores,
)
from cnnvis.vis.maps import upsample

#: weights(activations [N,K,h,w], gradients [N,K,h,w]) -> channel weights [N,K]
WeightFn = Callable[[Tensor, Tensor], Tensor]
#: map(activations [N,K,h,w], gradients [N,K,h,w]) -> maps [N,h,w] (before ReLU and upsampling)
MapFn = Callable[[Tensor, Tensor], Tensor]


def _check_grid(name: str, acts: Tensor) -> None:
    if acts.ndim != 4:
        raise UnsupportedModelError(f"layer {name!r} outputs shape {tuple(acts.shape)}; CAM methods need [N, C, h, w]")


def finish_map(cam: Tensor, relu: bool, size: tuple[int, int] | None) -> Tensor:
    """Optional ReLU, then optional bilinear upsampling to ``size``: the last step of every CAM."""
    if relu:
        cam = cam.clamp(min=0)
    return upsample(cam, size) if size is not None else cam


def weighted_map(acts: Tensor, weights: Tensor, relu: bool, size: tuple[int, int] | None) -> Tensor:
    """``sum_k w_k A^k``, optional ReLU, optional bilinear upsampling to ``size``."""
    return finish_map((weights[:, :, None, None] * acts).sum(dim=1), relu, size)


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


def layer_activations(model: nn.Module, images: Tensor, targets: Targets, layer: str | None
                      ) -> tuple[str, Tensor, Tensor, Tensor]:
    """``(layer name, A, logits, targets)`` from one forward pass without autograd."""
    check_images(model, images)
    name = default_layer(model, images) if layer is None else layer
    with capture(model, name) as cap:
        logits = predict(model, images)
        t = resolve_targets(targets, logits)
        acts = cap.value(name)
    _check_grid(name, acts)
    return name, acts, logits, t


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


def gradient_map(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    layer: str | None,
    map_fn: MapFn,
    relu: bool = True,
    upsample_to_input: bool = True,
) -> Tensor:
    """Run a CAM method whose map is not a channel-weighted sum (per-position weights)."""
    acts, grads, _ = layer_activations_and_gradients(model, images, targets, layer)
    return finish_map(map_fn(acts, grads), relu, tuple(images.shape[-2:]) if upsample_to_input else None)
