"""Deletion and insertion (Petsiuk et al. 2018, "RISE", sec. 4.1): does a map point at what the model uses?

Pixels are removed from the image (set to ``baseline``; 0 in normalised space is the data set's
mean colour) in the order of the map's importance, most important first, and the target class's
softmax probability is tracked; insertion starts from the baseline image (or, as in RISE, a
blurred copy) and puts the original pixels back in the same order. The area under each curve over
the fraction of pixels in ``[0, 1]`` (trapezoid rule, ``steps + 1`` points) summarises it: a
faithful map makes the probability fall fast when deleting (low deletion AUC) and rise fast when
inserting (high insertion AUC). A seeded random pixel order is the baseline to beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from cnnvis.errors import ConfigError
from cnnvis.vis.batching import batch_size as batching_rule
from cnnvis.vis.hooks import model_state
from cnnvis.vis.maps import gaussian_blur

DEFAULT_STEPS = 16  #: curve points minus one: 16 steps = 6.25 % of the pixels per step
InsertionStart = Literal["blur", "baseline"]


def importance_order(maps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Pixel indices ``LongTensor[N, H*W]``, most important first.

    Equal values (the flat zero regions of ReLU'd maps, a constant map) are ordered randomly with
    ``generator`` rather than top-left first, which would favour whatever sits in that corner.
    Non-finite values come last.
    """
    n = maps.shape[0]
    flat = torch.nan_to_num(maps.reshape(n, -1).float(), nan=-math.inf)
    noise = torch.rand(flat.shape, generator=generator).to(flat.device)  # CPU draw: same order on every device
    perm = noise.argsort(dim=1)
    ordered = flat.gather(1, perm).argsort(dim=1, descending=True, stable=True)
    return perm.gather(1, ordered)

def random_order(shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """A seeded random pixel order per image (the baseline every map must beat): ``[N, H*W]``."""
    n, h, w = shape[0], shape[-2], shape[-1]
    return torch.rand(n, h * w, generator=generator).argsort(dim=1).to(device)

def insertion_start(images: Tensor, start: InsertionStart = "baseline", baseline: float = 0.0) -> Tensor:
    """Where insertion begins: the flat ``baseline`` (default) or a blurred copy (sigma = a tenth of
    the shorter side), RISE's choice that avoids sharp artificial edges.

    The baseline is the default because blur keeps large shapes: on small images (digits, the test
    suite's 20-pixel bars) the blurred copy is often still recognised, and every order -- random
    included -- then scores an insertion AUC near 1, which tells the methods apart from nothing.
    """
    if start == "blur":
        return gaussian_blur(images, max(1.0, min(images.shape[-2:]) / 10))
    if start == "baseline":
        return torch.full_like(images, baseline)
    raise ConfigError(f"insertion start must be 'blur' or 'baseline', got {start!r}")

def perturbation_curves(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    order: Tensor,
    *,
    mode: Literal["deletion", "insertion"],
    steps: int = DEFAULT_STEPS,
    baseline: float = 0.0,
    start: Tensor | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Target probability ``[N, steps + 1]`` at pixel fractions ``0, 1/steps, ..., 1``.

    ``order`` ([N, H*W], most important first) decides which pixels go first. ``deletion``: the
    first ``k/steps`` of them are set to ``baseline`` (all channels); ``insertion``: they are taken
    from the image and the rest from ``start`` (default: :func:`insertion_start`). All
    ``N * (steps + 1)`` perturbed images are evaluated ``batch_size`` at a time, built per batch
    with one broadcast ``torch.where`` so that memory stays at one batch.
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if mode not in ("deletion", "insertion"):
        raise ConfigError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    n, _, h, w = images.shape
    device = images.device
    hw = h * w
    points = steps + 1
    counts = torch.round(torch.linspace(0, 1, points, device=device) * hw).long()
    # rank[i, p]: where pixel p of image i stands in its order (0 = most important)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(hw, device=device).expand(n, hw).contiguous())
    if mode == "deletion":
        present, absent = torch.full_like(images[:1], baseline), images  # pixels in the mask are deleted
    else:
        present, absent = images, start if start is not None else insertion_start(images)
    size = batching_rule(images, batch_size)
    out = torch.empty(n * points, device=device)
    with model_state(model, grad=False):
        for first in range(0, n * points, size):
            pair = torch.arange(first, min(first + size, n * points), device=device)
            img, step = pair // points, pair % points
            mask = (rank[img] < counts[step][:, None]).view(-1, 1, h, w)
            if mode == "deletion":
                batch = torch.where(mask, present, absent[img])
            else:
                batch = torch.where(mask, present[img], absent[img])
            probs = model(batch).float().softmax(dim=1)
            out[first : first + len(pair)] = probs.gather(1, targets[img][:, None])[:, 0]
    return out.view(n, points)

def auc(curves: Tensor) -> Tensor:
    """Area under ``[N, steps + 1]`` curves over the pixel fraction in [0, 1] (trapezoid rule): ``[N]``."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)
