"""Post-processing shared by the heatmap methods: channel reduction, upsampling, normalisation."""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnvis.vis.errors import VisError

Reduce = Optional[Literal["absmax", "max", "sum", "abssum", "mean", "l2"]]
NormalizeMode = Literal["minmax", "maxabs", "positive"]


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


def normalize_maps(maps: Tensor, mode: NormalizeMode = "minmax") -> Tensor:
    """Scale each map of ``[N, H, W]`` (or one ``[H, W]``) to [0, 1], independently per image.

    * ``minmax``: ``(m - min) / (max - min)``; what pytorch-grad-cam shows.
    * ``maxabs``: ``|m| / max|m|``; for signed attributions where both signs matter.
    * ``positive``: ``max(m, 0) / max(m)``; keeps only positive evidence.

    A map that carries no information in that mode (constant for ``minmax``, all zero for
    ``maxabs``, nothing positive for ``positive``) becomes all zeros and a warning is issued;
    non-finite values are treated as 0 (with a warning). The result never contains NaN.
    """
    if maps.ndim not in (2, 3):
        raise VisError(f"normalize_maps expects [N, H, W] or [H, W] maps, got shape {tuple(maps.shape)}")
    batch = maps.unsqueeze(0) if maps.ndim == 2 else maps
    flat = batch.reshape(batch.shape[0], -1).float()
    finite = torch.isfinite(flat)
    if not bool(finite.all()):
        warnings.warn("normalize_maps: non-finite values in the maps were set to 0", stacklevel=2)
        flat = torch.where(finite, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    if mode == "minmax":
        lo = flat.amin(dim=1, keepdim=True)
        hi = flat.amax(dim=1, keepdim=True)
        scale = hi - lo
        # spans at float-rounding level relative to the values are treated as constant
        informative = scale > 1e-6 * torch.maximum(lo.abs(), hi.abs())
        shifted = flat - lo
        what = "constant"
    elif mode == "maxabs":
        shifted = flat.abs()
        scale = shifted.amax(dim=1, keepdim=True)
        informative = scale > 0
        what = "all zero"
    elif mode == "positive":
        shifted = flat.clamp(min=0)
        scale = shifted.amax(dim=1, keepdim=True)
        informative = scale > 0
        what = "without positive values"
    else:
        raise VisError(f"normalize mode must be 'minmax', 'maxabs' or 'positive', got {mode!r}")
    out = torch.where(informative, shifted / torch.where(informative, scale, torch.ones_like(scale)), 0.0)
    n_bad = int((~informative).sum())
    if n_bad:
        warnings.warn(f"normalize_maps: {n_bad} of {flat.shape[0]} maps are {what}; returned as zeros", stacklevel=2)
    out = out.clamp_(0.0, 1.0).reshape(maps.shape)
    return out
