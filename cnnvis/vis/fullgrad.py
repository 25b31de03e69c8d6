"""FullGrad (Srinivas & Fleuret 2019, "Full-Gradient Representation for Neural Network
Visualization", NeurIPS).

A ReLU network's output is exactly its input-gradient term plus one bias-gradient term per layer
with a bias (the full-gradient decomposition); the saliency map adds them all up after
post-processing each:

    map = psi( |dY/dx (.) x| )  +  sum_layers sum_channels psi( |b (.) dY/dz| )

``z`` is the output of a layer with bias ``b``; ``psi`` scales each (image, channel) map to [0, 1]
(``(m - min) / (max - min + 1e-7)``) and resizes it bilinearly to the input. As in
pytorch-grad-cam's ``FullGrad`` the bias layers are ``nn.Conv2d`` with a bias and ``nn.BatchNorm2d``
with an affine bias (a BN's effective bias in eval mode is ``beta - mean * gamma / sqrt(var + eps)``);
biases of linear layers are not used. Bilinear resizing is linear, so each layer's channels are
summed before the one resize. One forward and one backward pass give every gradient.
The map covers the whole network; there is no layer to choose.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnvis.errors import UnsupportedModelError
from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.hooks import (
    Targets,
    as_input,
    capture,
    check_images,
    resolve_targets,
    target_scores,
)
from cnnvis.vis.maps import minmax_scale, upsample

EPS = 1e-7


def bias_layers(model: nn.Module) -> dict[str, Tensor]:
    """Name -> effective bias ``[K]`` of every conv / BatchNorm layer with a bias, or UnsupportedModelError."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            found[name] = m.bias.detach()
        elif isinstance(m, nn.BatchNorm2d) and m.bias is not None and m.running_mean is not None:
            scale = m.weight.detach() / torch.sqrt(m.running_var + m.eps)
            found[name] = m.bias.detach() - m.running_mean * scale
    if not found:
        raise UnsupportedModelError(
            f"FullGrad needs conv layers with biases or BatchNorm2d layers (with affine parameters and running "
            f"statistics); {type(model).__name__} has none. Use 'gradcam' or 'integrated-gradients' instead.")
    return found


def _psi_sum(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, K, h, w]`` -> ``[N, H, W]``: absolute value, per-channel [0, 1] scaling, channel sum, resize."""
    return upsample(minmax_scale(maps.abs(), EPS).sum(dim=1), size)


def fullgrad(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    aug_smooth: bool = False,
) -> Tensor:
    """FullGrad saliency maps ``[N, H, W]`` (raw, non-negative); ``aug_smooth``: see :mod:`~cnnvis.vis.aug_smooth`."""
    check_images(model, images)
    biases = bias_layers(model)
    return cam_maps(lambda x, t: _fullgrad(model, x, t, biases), model, images, targets, aug_smooth)


def _fullgrad(model: nn.Module, images: Tensor, targets: Targets, biases: dict[str, Tensor]) -> Tensor:
    size = tuple(images.shape[-2:])
    with capture(model, list(biases), grads=True) as cap:
        x = as_input(images, requires_grad=True)
        logits = model(x)
        t = resolve_targets(targets, logits)
        grads, (input_grad,) = cap.gradients_with(target_scores(logits, t).sum(), [x])
    cam = _psi_sum(input_grad * images, size)
    for name, bias in biases.items():
        g = grads[name]
        if g.ndim != 4:
            raise UnsupportedModelError(f"layer {name!r} outputs shape {tuple(g.shape)}; FullGrad needs [N, C, h, w]")
        cam = cam + _psi_sum(bias.to(g.dtype)[None, :, None, None] * g, size)
    return cam
