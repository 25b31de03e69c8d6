"""Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for Convolutional
Neural Networks", CVPR workshops).

Gradient-free: each channel ``A^k`` of the layer, upsampled to the input (bilinear,
``align_corners=True``) and min-max scaled to a mask ``M^k`` in [0, 1], masks the image; the
target's logit on the masked image is the channel's score, and the weights are their softmax
over channels:

    w^c = softmax_k( Y^c(x (.) M^k) ),     M^k = (up(A^k) - min) / (max - min + 1e-8)

(pytorch-grad-cam's ``ScoreCAM``: logits, not the paper's baseline-subtracted probabilities.)

That is ``N x K`` forward passes. They are flattened over (image, channel) pairs and run
``batch_size`` at a time (:mod:`~cnnvis.vis.batching`) under ``torch.inference_mode`` through the
BatchNorm-folded channels-last copy of :mod:`~cnnvis.vis.fused` (the model itself where that does
not apply). A constant channel gives an all-zero mask, hence the all-zero image, whose score is
computed once and shared by every such channel: dead ReLU channels cost nothing. Progress is
reported per batch (:func:`~cnnvis.vis.progress.advance`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnvis.vis import progress
from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.batching import batch_size as batching_rule
from cnnvis.vis.cam_base import layer_activations, weighted_map
from cnnvis.vis.fused import gradient_copy
from cnnvis.vis.hooks import Targets, model_state
from cnnvis.vis.maps import minmax_scale

MASK_EPS = 1e-8


def masked_scores(model: nn.Module, images: Tensor, acts: Tensor, targets: Tensor, batch_size: int | None = None
                  ) -> Tensor:
    """``[N, K]`` target logits of each image masked by each of its upsampled, scaled channels."""
    n, k = acts.shape[:2]
    size = tuple(images.shape[-2:])
    flat = acts.flatten(2)
    constant = flat.amax(dim=2) == flat.amin(dim=2)
    pairs = (~constant).nonzero()  # the one host sync: how many passes there are
    scores = torch.empty(n, k, dtype=acts.dtype, device=acts.device)
    step = batching_rule(images, batch_size)
    with model_state(model, grad=False):
        fast, _ = gradient_copy(model, images)  # built outside inference mode: its weights serve gradient passes too
        layout = torch.channels_last if fast is not model else torch.contiguous_format
        with torch.inference_mode():
            if bool(constant.any()):
                zero = fast(torch.zeros_like(images[:1]).contiguous(memory_format=layout))[0]
                scores[constant] = zero[targets][:, None].expand(n, k)[constant].to(scores.dtype)
            total = len(pairs)
            for start in range(0, total, step):
                ni, ki = pairs[start:start + step].unbind(1)
                up = F.interpolate(acts[ni, ki][:, None], size=size, mode="bilinear", align_corners=True)
                masked = (images[ni] * minmax_scale(up, MASK_EPS)).contiguous(memory_format=layout)
                logits = fast(masked)
                scores[ni, ki] = logits.gather(1, targets[ni][:, None])[:, 0].to(scores.dtype)
                progress.advance(min(start + step, total), total)
    return scores


def scorecam(
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
    """Score-CAM heatmaps ``[N, H, W]`` (raw); options as for :func:`~cnnvis.vis.gradcam.gradcam`;
    ``batch_size``: masked images per forward pass (default: :mod:`~cnnvis.vis.batching`'s rule)."""
    def run(x: Tensor, t: Targets) -> Tensor:
        _, acts, _, resolved = layer_activations(model, x, t, layer)
        weights = masked_scores(model, x, acts, resolved, batch_size).softmax(dim=1)
        return weighted_map(acts, weights, relu, tuple(x.shape[-2:]) if upsample else None)

    return cam_maps(run, model, images, targets, aug_smooth)
