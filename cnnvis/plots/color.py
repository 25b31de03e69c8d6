"""Tensors to colours: image coercion, denormalisation, colour maps and overlays (pure functions).

``images`` are ``[N,C,H,W]`` (or ``[C,H,W]`` / ``[H,W]``) tensors. With ``mean``/``std`` they are
taken as normalised with the data set's per-channel statistics and denormalised; without, float
images are taken as already in ``[0, 1]`` and ``uint8`` images as ``0..255``. Maps "01" are in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import Colormap

from cnnvis.errors import CnnvisError

DEFAULT_CMAP = "inferno"
"""Perceptually uniform map for non-negative maps (CAM, Grad-CAM, |saliency|, occlusion drop)."""
DIVERGING_CMAP = "RdBu_r"
"""Diverging map for signed maps (blue = negative, white = zero, red = positive)."""

ArrayLike = Union[torch.Tensor, np.ndarray]
CmapLike = Union[str, Colormap]
Stats = Union[Sequence[float], torch.Tensor, None]


def as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor or numpy array, got {type(x).__name__}")
    return x.detach().cpu()

def as_images(images: ArrayLike) -> torch.Tensor:
    """``[N,C,H,W]`` from ``[N,C,H,W]``, ``[C,H,W]`` or ``[H,W]``."""
    x = as_tensor(images)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N,C,H,W], [C,H,W] or [H,W]; got {list(x.shape)}")
    return x

def as_maps(maps: ArrayLike) -> torch.Tensor:
    """``[N,H,W]`` from ``[N,H,W]``, ``[N,1,H,W]`` or ``[H,W]``."""
    m = as_tensor(maps)
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(f"maps must have one channel; got shape {list(m.shape)}")
        m = m[:, 0]
    elif m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"maps must have shape [N,H,W], [N,1,H,W] or [H,W]; got {list(m.shape)}")
    return m.float() if not m.is_floating_point() else m

def _stats(values: Stats, channels: int, what: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        vals = [float(v) for v in values.detach().flatten().cpu()]
    else:
        vals = [float(v) for v in values]  # type: ignore[union-attr]
    if len(vals) not in (1, channels):
        raise CnnvisError(
            f"normalisation {what} has {len(vals)} values but the images have {channels} channel(s)",
            "Use the mean/std of the data set the model was trained on (one value per channel).",
        )
    if what == "std" and any(v == 0 for v in vals):
        raise CnnvisError("normalisation std contains 0")
    return torch.tensor(vals, dtype=torch.float64).view(1, -1, 1, 1)

def denormalize(images: ArrayLike, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Undo ``Normalize(mean, std)``: ``x * std + mean``, clamped to ``[0, 1]``.

    ``images`` is ``[N,C,H,W]`` (``[C,H,W]`` and ``[H,W]`` are promoted to a batch of one); ``mean``
    and ``std`` hold one value per channel (or a single value for all channels). Returns a float
    tensor (float64 inputs stay float64) of shape ``[N,C,H,W]`` on the CPU.
    """
    x = as_images(images)
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    m = _stats(mean, c, "mean")
    s = _stats(std, c, "std")
    out = x.to(torch.float64) * s + m
    return out.clamp_(0.0, 1.0).to(dtype)

def images01(images: ArrayLike, mean: Stats = None, std: Stats = None) -> torch.Tensor:
    """Images in ``[0, 1]`` as float ``[N,C,H,W]`` (see the module conventions)."""
    x = as_images(images)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        return denormalize(x, mean, std)  # type: ignore[arg-type]
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float().clamp(0.0, 1.0)

def to_rgb(images01: ArrayLike) -> torch.Tensor:
    """``[N,3,H,W]``: grey (1 channel) images repeated to RGB, RGBA images lose alpha."""
    x = as_images(images01)
    c = x.shape[1]
    if c == 1:
        return x.expand(-1, 3, -1, -1).clone()
    if c == 3:
        return x.clone()
    if c == 4:
        return x[:, :3].clone()
    raise ValueError(f"cannot show {c}-channel images as RGB (expected 1, 3 or 4 channels)")

def get_cmap(cmap: CmapLike) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise CnnvisError(f"unknown colour map {cmap!r}", "Try 'inferno', 'viridis', 'jet' or 'RdBu_r'.") from None

def resolve_cmap(cmap: CmapLike | None, signed: bool) -> Colormap:
    return get_cmap(cmap if cmap is not None else (DIVERGING_CMAP if signed else DEFAULT_CMAP))

def colorize(maps01: ArrayLike, cmap: CmapLike = DEFAULT_CMAP) -> torch.Tensor:
    """Maps in ``[0, 1]`` (``[N,H,W]``/``[N,1,H,W]``/``[H,W]``) -> RGB float ``[N,3,H,W]`` in ``[0, 1]``."""
    m = as_maps(maps01)
    arr = torch.nan_to_num(m.float(), nan=0.0).clamp(0.0, 1.0).numpy()
    rgba = get_cmap(cmap)(arr)  # [N,H,W,4] float64
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).float().permute(0, 3, 1, 2).contiguous()

def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[N,H,W]`` maps (antialiased when shrinking)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    shrink = maps.shape[-2] > size[0] or maps.shape[-1] > size[1]
    out = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0]

def overlay(
    images01: ArrayLike,
    maps01: ArrayLike,
    alpha: float = 0.5,
    cmap: CmapLike = DEFAULT_CMAP,
    signed: bool = False,
) -> torch.Tensor:
    """Alpha-blend coloured maps over images: ``(1 - alpha) * image + alpha * colorize(map)``.

    ``images01``: ``[N,C,H,W]`` in ``[0, 1]`` with 1 (grey), 3 or 4 channels; ``maps01``: ``[N,h,w]``
    in ``[0, 1]``, resized (bilinear) to ``H x W`` when the sizes differ. With ``signed`` (maps where
    0.5 means zero) the blend weight is ``alpha * |2 * map - 1|`` so zero leaves the image untouched.
    Returns RGB ``[N,3,H,W]`` in ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = to_rgb(as_images(images01).float().clamp(0.0, 1.0))
    m = as_maps(maps01)
    if m.shape[0] != img.shape[0]:
        raise ValueError(f"{img.shape[0]} image(s) but {m.shape[0]} map(s)")
    m = resize_maps(m, (img.shape[-2], img.shape[-1])).clamp(0.0, 1.0)
    a = (alpha * (2.0 * m - 1.0).abs())[:, None] if signed else alpha
    return ((1.0 - a) * img + a * colorize(m, cmap)).clamp_(0.0, 1.0)
