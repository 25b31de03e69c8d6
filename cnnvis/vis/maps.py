"""Post-processing shared by the methods: channel reduction, upsampling, the one normalisation of
maps for display, and a Gaussian blur.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnvis.errors import VisError

Reduce = Optional[Literal["absmax", "max", "sum", "abssum", "mean", "l2"]]
NormalizeMode = Literal["minmax", "maxabs", "signed", "positive"]

#: a map whose values span at most this fraction of its largest magnitude is "flat": stretching it
#: to full contrast would draw a strong pattern out of a few percent of variation (a Grad-CAM of
#: 0.183 ... 0.19, say)
FLAT_SPREAD = 0.05


def flat_maps(maps: Tensor, spread: float = FLAT_SPREAD) -> Tensor:
    """``[N]`` bool: which of the ``[N, H, W]`` maps vary by at most ``spread`` x their largest
    magnitude (all-zero maps included): maps with no spatial information to show."""
    flat = torch.nan_to_num(maps.detach().reshape(maps.shape[0], -1).to(torch.float64))
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    return (hi - lo) <= spread * flat.abs().amax(dim=1)


def reduce_channels(attributions: Tensor, reduce: Reduce) -> Tensor:
    """``[N, C, H, W]`` attributions to an ``[N, H, W]`` map; ``reduce=None`` returns them unchanged.

    ``absmax`` is Simonyan et al. 2014 (sec. 3.1): max over channels of the absolute gradient.
    """
    if reduce is None:
        return attributions
    if reduce == "absmax":
        return attributions.abs().amax(dim=1)
    if reduce == "max":
        return attributions.amax(dim=1)
    if reduce == "sum":
        return attributions.sum(dim=1)
    if reduce == "abssum":
        return attributions.abs().sum(dim=1)
    if reduce == "mean":
        return attributions.mean(dim=1)
    if reduce == "l2":
        return attributions.norm(dim=1)
    raise VisError(f"reduce must be one of absmax, max, sum, abssum, mean, l2 or None, got {reduce!r}")


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[N, h, w]`` maps to ``size = (H, W)`` (``align_corners=False``)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax_scale(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """``(m - min) / (max - min + eps)`` over the last two dims, for any leading dims; no checks, no warnings.

    Part of a method's definition rather than a display step: FullGrad rescales every channel this
    way before summing them (Srinivas & Fleuret 2019, sec. 4), test-time augmentation averages maps
    scaled this way, Score-CAM turns channels into masks with it. ``eps`` is pytorch-grad-cam's.
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo + eps)


def normalize_maps(
    maps: Tensor,
    mode: NormalizeMode = "minmax",
    *,
    scale: Literal["image", "batch"] = "image",
    clip_percentile: float | None = None,
    flat_spread: float | None = FLAT_SPREAD,
) -> Tensor:
    """Raw maps ``[N, H, W]`` (or ``[N, 1, H, W]``, ``[H, W]``) of any range -> float ``[N, H, W]`` in [0, 1].

    * ``minmax``: ``(m - min) / (max - min)``; what pytorch-grad-cam shows.
    * ``maxabs``: ``|m| / max|m|``; the magnitude, zero stays black.
    * ``signed``: ``m / (2 max|m|) + 0.5``: zero at 0.5, for a diverging colour map.
    * ``positive``: ``max(m, 0) / max(m)``; keeps only positive evidence.

    ``scale="image"`` scales each map on its own, ``"batch"`` all maps together (comparable
    strengths). ``clip_percentile`` (e.g. 99) clips outliers first: spiky gradient maps.
    A map that carries no information in that mode (constant for ``minmax`` and ``signed``, all
    zero for ``maxabs``, nothing positive for ``positive``) becomes zeros (0.5 when signed) with a
    ``RuntimeWarning``; non-finite values count as 0, also with a warning. Never NaN.

    ``minmax`` would stretch a flat map (see :func:`flat_maps`; ``flat_spread`` sets the
    threshold, ``None`` turns this off) to full contrast; such a map (unless exactly constant) is
    scaled over its range extended to include 0 instead, so it looks as flat as it is. The other
    modes already measure from 0.
    """
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim not in (2, 3):
        raise VisError(f"normalize_maps expects [N, H, W] or [H, W] maps, got shape {tuple(maps.shape)}")
    if scale not in ("image", "batch"):
        raise VisError(f"normalize_maps scale must be 'image' or 'batch', got {scale!r}")
    batch = maps.unsqueeze(0) if maps.ndim == 2 else maps
    n = batch.shape[0]
    flat = batch.detach().reshape(n if scale == "image" else 1, -1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        warnings.warn("normalize_maps: non-finite values (NaN or inf) in the maps are shown as 0", RuntimeWarning, stacklevel=2)
        flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    if clip_percentile is not None:
        flat = _clip(flat, clip_percentile, symmetric=mode in ("maxabs", "signed"))
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    constant = (hi - lo) <= 1e-6 * absmax  # relative: tiny but real gradient maps are kept
    if mode == "minmax":
        if flat_spread is not None:  # a flat map keeps 0 in its range: drawn flat, not stretched
            level = (hi - lo) <= flat_spread * absmax
            lo, hi = torch.where(level, lo.clamp(max=0), lo), torch.where(level, hi.clamp(min=0), hi)
        shifted, span, empty, fill, what = flat - lo, hi - lo, constant, 0.0, "constant (no spatial information)"
    elif mode == "maxabs":
        shifted, span, empty, fill, what = flat.abs(), absmax, absmax == 0, 0.0, "all zero"
    elif mode == "signed":
        shifted, span, empty, fill, what = flat + absmax, 2 * absmax, constant, 0.5, "constant (no spatial information)"
    elif mode == "positive":
        shifted = flat.clamp(min=0)
        span = shifted.amax(dim=1, keepdim=True)
        empty, fill, what = span == 0, 0.0, "without positive values"
    else:
        raise VisError(f"normalize mode must be 'minmax', 'maxabs', 'signed' or 'positive', got {mode!r}")
    out = torch.where(empty, torch.full_like(flat, fill), shifted / torch.where(empty, torch.ones_like(span), span))
    bad = int(empty.sum())
    if bad:
        which = "all maps together are" if scale == "batch" else f"{bad} of {n} maps are"
        warnings.warn(f"normalize_maps: {which} {what}; shown as {'0.5 (zero)' if fill else 'zeros'}",
                      RuntimeWarning, stacklevel=2)
    return out.clamp_(0.0, 1.0).reshape(batch.shape).float()


def _clip(flat: Tensor, percentile: float, symmetric: bool) -> Tensor:
    if not 0 < percentile <= 100:
        raise VisError(f"clip_percentile must be in (0, 100], got {percentile}")
    q = percentile / 100.0
    if symmetric:
        top = torch.quantile(flat.abs(), q, dim=1, keepdim=True)
        return torch.maximum(torch.minimum(flat, top), -top)
    low = torch.quantile(flat, 1.0 - q, dim=1, keepdim=True)
    top = torch.quantile(flat, q, dim=1, keepdim=True)
    return torch.maximum(torch.minimum(flat, top), low)


def gaussian_blur(images: Tensor, sigma: float, truncate: float = 3.0) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` per channel with reflected borders.

    The kernel reaches ``ceil(truncate * sigma)`` pixels (``scipy.ndimage.gaussian_filter``'s
    ``truncate``), at most a side minus one so that the reflection fits. ``sigma <= 0`` returns the images.
    """
    if sigma <= 0:
        return images
    n, c, h, w = images.shape
    radius = max(1, min(math.ceil(truncate * sigma), h - 1, w - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)
