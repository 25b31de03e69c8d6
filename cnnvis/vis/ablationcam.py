"""Ablation-CAM (Desai & Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep Convolutional
Network via Gradient-free Localization", WACV).

Gradient-free: channel ``k`` is weighted by the relative drop of the target's logit when that
channel of the layer is ablated:

    w_k^c = (Y^c - Y^c_k) / Y^c

(a target logit of exactly 0 makes the weights infinite, as in pytorch-grad-cam; the drawn map then
says so through :func:`~cnnvis.vis.maps.normalize_maps`'s non-finite warning).

Ablating means setting the channel to 0 when the image's activations reach 0 (after a ReLU), as
in the paper, and otherwise to ``min(A) - 1e7`` (pytorch-grad-cam's choice for layers with
negative values; pytorch-grad-cam lowers this value further for each later copy in a batch, we use
the same value for every channel).

``N x K`` forward passes, but only of the part of the network after the layer: a forward hook on
the layer returns the batch of ablated copies, and the network's input is one image per pass (the
rest of the network broadcasts it, e.g. a residual branch) -- or only a 32 px crop of it when
nothing after the layer reads anything but the layer's output (a whole ResNet stage), so the
network before the layer costs next to nothing. Both are checked once per call on unablated
copies; where neither reproduces the logits the image is repeated instead (the whole network then
runs per copy, as in pytorch-grad-cam). A channel that is already all at the
ablation value (a dead ReLU channel) does not change by ablation: it gets weight 0 without a pass.
Passes are ``batch_size`` copies (:mod:`~cnnvis.vis.batching`, counted by the layer's
activation size) under ``torch.inference_mode``; progress goes to :func:`~cnnvis.vis.progress.advance`.
Transformer tokens and channels-last outputs are ablated on their map (:mod:`~cnnvis.vis.layouts`)
and handed on in the layer's own layout, prefix tokens untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnvis.vis import progress
from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.batching import batch_size as batching_rule
from cnnvis.vis.cam_base import layer_activations, weighted_map
from cnnvis.vis.hooks import (
    Targets,
    capture,
    get_layer,
    model_state,
    predict,
    target_scores,
    temporary_hooks,
)

#: below the smallest activation, for layers whose activations never reach 0
ABLATION_OFFSET = 1e7
#: side of the crop fed to the network when only the hooked layer's output matters after it
SMALL_INPUT = 32


def ablation_values(acts: Tensor) -> Tensor:
    """``[N]`` the value an ablated channel of each image is set to."""
    low = acts.flatten(1).amin(dim=1)
    return torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)


def ablated_scores(model: nn.Module, images: Tensor, layer: str, acts: Tensor, logits: Tensor, targets: Tensor,
                   batch_size: int | None = None) -> Tensor:
    """``[N, K]`` target logits with each channel of ``layer`` ablated in turn."""
    n, k = acts.shape[:2]
    values = ablation_values(acts)
    base = target_scores(logits, targets)
    changes = (acts.flatten(2) != values[:, None, None]).any(dim=2)
    scores = base[:, None].expand(n, k).clone()
    per_image: list[list[int]] = [[] for _ in range(n)]
    for i, c in changes.nonzero().tolist():  # one host copy: which passes to run
        per_image[i].append(c)
    step = batching_rule(images, batch_size, activation_elements=acts[0].numel())
    with capture(model, layer) as cap:  # how the layer's own output reads as maps (tokens, channels last)
        predict(model, images[:1])
        layout = cap.layouts[layer]
    feed: list[Tensor] = []
    module = get_layer(model, layer)
    with model_state(model, grad=False), torch.inference_mode(), \
            temporary_hooks([lambda: module.register_forward_hook(lambda _m, _a, out: layout.from_map(feed[0], out))]):
        feed.append(acts[:1].repeat(2, 1, 1, 1))
        # what goes into the network per pass: a small crop of the image when nothing after the layer
        # reads anything but the layer's output (a whole ResNet stage), else the image, else its copies
        crop = images[:, :, :SMALL_INPUT, :SMALL_INPUT]
        small = crop.shape != images.shape and _reproduces(model, crop[:1], logits[0])
        single = small or _reproduces(model, images[:1], logits[0])
        done, total = 0, sum(map(len, per_image))
        for i, channels in enumerate(per_image):
            for start in range(0, len(channels), step):
                chunk = torch.tensor(channels[start:start + step], device=acts.device)
                ablated = acts[i].expand(len(chunk), *acts.shape[1:]).clone()
                ablated[torch.arange(len(chunk), device=acts.device), chunk] = values[i]
                feed[0] = ablated
                x = (crop if small else images)[i:i + 1]
                x = x if single else x.expand(len(chunk), *x.shape[1:])
                scores[i, chunk] = model(x)[:, targets[i]].to(scores.dtype)
                done += len(chunk)
                progress.advance(done, total)
    return scores


def _reproduces(model: nn.Module, image: Tensor, logits: Tensor) -> bool:
    """Whether the network after the hooked layer gives the right logits from one input image."""
    try:
        out = model(image)
    except Exception:  # noqa: BLE001 -- shapes that do not broadcast: fall back to repeating the image
        return False
    return out.shape == (2, *logits.shape) and bool(torch.allclose(out, logits.expand_as(out), rtol=1e-4, atol=1e-5))


def ablationcam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    relu: bool = True,
    upsample: bool = True,
    batch_size: int | None = None,
    aug_smooth: bool = False,
) -> Tensor:
    """Ablation-CAM heatmaps ``[N, H, W]`` (raw); options as for :func:`~cnnvis.vis.gradcam.gradcam`;
    ``batch_size``: ablated copies per forward pass (default: :mod:`~cnnvis.vis.batching`'s rule)."""
    def run(x: Tensor, t: Targets) -> Tensor:
        name, acts, logits, resolved = layer_activations(model, x, t, layer)
        base = target_scores(logits, resolved)[:, None]
        weights = (base - ablated_scores(model, x, name, acts, logits, resolved, batch_size)) / base
        return weighted_map(acts, weights, relu, tuple(x.shape[-2:]) if upsample else None)

    return cam_maps(run, model, images, targets, aug_smooth)
