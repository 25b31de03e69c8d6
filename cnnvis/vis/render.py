"""Turn tensors into pictures: heat maps, overlays, activation and filter grids, captioned grids.

Computing (hooks, gradients, occlusion ...) lives elsewhere; everything here is a pure function of
tensors that returns pixels. Figures are built on :class:`matplotlib.figure.Figure` with the Agg
canvas directly -- never ``pyplot`` -- so rendering needs no display, leaks no global state and can
run in worker threads. Every ``*_figure`` function renders to PNG, releases its figure and returns
:class:`PNG` bytes; pass ``path=`` to also write the file (atomically) with a JSON sidecar.

Conventions

* ``images`` are ``[N,C,H,W]`` (or ``[C,H,W]`` / ``[H,W]``) tensors. With ``mean``/``std`` they are
  taken as normalised with the data set's per-channel statistics and denormalised; without, float
  images are taken as already in ``[0, 1]`` and ``uint8`` images as ``0..255``.
* Maps "01" are in ``[0, 1]``. Raw maps (any range) go through :func:`normalize_maps` first; signed
  maps (``signed=True``) are scaled by their largest magnitude so that ``0.5`` means zero and are
  drawn with a diverging colour map.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import math
import os
import struct
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from cnnvis.errors import CnnvisError
from cnnvis.files import atomic_write

__all__ = [
    "DEFAULT_CMAP",
    "DIVERGING_CMAP",
    "PNG",
    "activation_grid_figure",
    "colorize",
    "denormalize",
    "figure_to_png",
    "figure_to_tensor",
    "filter_grid_figure",
    "format_caption",
    "heatmap_figure",
    "image_grid_figure",
    "normalize_maps",
    "overlay",
    "save_png",
    "to_jsonable",
    "to_rgb",
]

DEFAULT_CMAP = "inferno"
"""Perceptually uniform map for non-negative maps (CAM, Grad-CAM, |saliency|, occlusion drop)."""
DIVERGING_CMAP = "RdBu_r"
"""Diverging map for signed maps (blue = negative, white = zero, red = positive)."""

ArrayLike = Union[torch.Tensor, np.ndarray]
CmapLike = Union[str, Colormap]
Stats = Union[Sequence[float], torch.Tensor, None]

# Text sizes (points) and spacing (inches) shared by all figures.
_TITLE_PT = 13.0
_CAPTION_PT = 9.5
_HEADER_PT = 8.0
_SMALL_PT = 7.0
_PT = 1.0 / 72.0  # inch per point
_LINE = 1.3  # line height as a multiple of the font size
_MARGIN = 0.15  # outer margin, inch
_GRAY_TEXT = "#444444"


class PNG(bytes):
    """PNG file contents. Displays itself in Jupyter; ``width``/``height`` read the header."""

    def _repr_png_(self) -> bytes:
        return bytes(self)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        if self[:8] != b"\x89PNG\r\n\x1a\n" or len(self) < 24:
            raise ValueError("not PNG data")
        width, height = struct.unpack(">II", self[16:24])
        return int(width), int(height)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


# --------------------------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------------------------


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor or numpy array, got {type(x).__name__}")
    return x.detach().cpu()


def _as_images(images: ArrayLike) -> torch.Tensor:
    """``[N,C,H,W]`` from ``[N,C,H,W]``, ``[C,H,W]`` or ``[H,W]``."""
    x = _as_tensor(images)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N,C,H,W], [C,H,W] or [H,W]; got {list(x.shape)}")
    return x


def _as_maps(maps: ArrayLike) -> torch.Tensor:
    """``[N,H,W]`` from ``[N,H,W]``, ``[N,1,H,W]`` or ``[H,W]``."""
    m = _as_tensor(maps)
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
    x = _as_images(images)
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    m = _stats(mean, c, "mean")
    s = _stats(std, c, "std")
    out = x.to(torch.float64) * s + m
    return out.clamp_(0.0, 1.0).to(dtype)


def _images01(images: ArrayLike, mean: Stats = None, std: Stats = None) -> torch.Tensor:
    """Images in ``[0, 1]`` as float ``[N,C,H,W]`` (see the module conventions)."""
    x = _as_images(images)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        return denormalize(x, mean, std)  # type: ignore[arg-type]
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float().clamp(0.0, 1.0)


def to_rgb(images01: ArrayLike) -> torch.Tensor:
    """``[N,3,H,W]``: grey (1 channel) images repeated to RGB, RGBA images lose alpha."""
    x = _as_images(images01)
    c = x.shape[1]
    if c == 1:
        return x.expand(-1, 3, -1, -1).clone()
    if c == 3:
        return x.clone()
    if c == 4:
        return x[:, :3].clone()
    raise ValueError(f"cannot show {c}-channel images as RGB (expected 1, 3 or 4 channels)")


def _cmap(cmap: CmapLike) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise CnnvisError(f"unknown colour map {cmap!r}", "Try 'inferno', 'viridis', 'jet' or 'RdBu_r'.") from None


def normalize_maps(
    maps: ArrayLike,
    *,
    scale: Literal["image", "batch"] = "image",
    signed: bool = False,
    clip_percentile: float | None = None,
) -> torch.Tensor:
    """Raw maps of any range -> float ``[N,H,W]`` in ``[0, 1]``.

    * unsigned (default): min-max scaling, per image (``scale="image"``) or over the whole batch
      (``scale="batch"``, keeps images comparable);
    * ``signed=True``: divided by the largest magnitude, so ``0`` maps to ``0.5``, ``-max`` to 0
      and ``+max`` to 1 (draw with :data:`DIVERGING_CMAP`);
    * ``clip_percentile`` (e.g. ``99``) clips outliers first -- useful for spiky gradient maps.

    Constant maps carry no information: they become zeros (``0.5`` when signed) with a
    :func:`warnings.warn`, never NaN. NaN/inf values are replaced by 0 with a warning.
    """
    m = _as_maps(maps).to(torch.float64)
    n = m.shape[0]
    if not torch.isfinite(m).all():
        warnings.warn("map contains NaN or infinite values; they are shown as 0", RuntimeWarning, stacklevel=2)
        m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    if scale not in ("image", "batch"):
        raise ValueError(f"scale must be 'image' or 'batch', not {scale!r}")
    flat = m.reshape(n, -1) if scale == "image" else m.reshape(1, -1)
    if clip_percentile is not None:
        if not 0 < clip_percentile <= 100:
            raise ValueError("clip_percentile must be in (0, 100]")
        q = clip_percentile / 100.0
        if signed:
            hi = torch.quantile(flat.abs(), q, dim=1, keepdim=True)
            flat = torch.maximum(torch.minimum(flat, hi), -hi)
        else:
            lo = torch.quantile(flat, 1.0 - q, dim=1, keepdim=True)
            hi = torch.quantile(flat, q, dim=1, keepdim=True)
            flat = torch.maximum(torch.minimum(flat, hi), lo)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    absmax = flat.abs().max(dim=1, keepdim=True).values
    constant = (hi - lo) <= 1e-6 * absmax  # relative: tiny but real gradient maps are kept
    if signed:
        out = torch.where(constant, torch.full_like(flat, 0.5), flat / (2 * absmax.clamp_min(1e-300)) + 0.5)
    else:
        out = torch.where(constant, torch.zeros_like(flat), (flat - lo) / (hi - lo).clamp_min(1e-300))
    bad = constant.flatten().nonzero().flatten().tolist()
    if bad:
        which = "all maps together are" if scale == "batch" else f"map(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} are"
        warnings.warn(
            f"{which} constant (no spatial information); shown as {'0.5 (zero)' if signed else 'zeros'}",
            RuntimeWarning,
            stacklevel=2,
        )
    return out.clamp_(0.0, 1.0).reshape(m.shape).float()


def colorize(maps01: ArrayLike, cmap: CmapLike = DEFAULT_CMAP) -> torch.Tensor:
    """Maps in ``[0, 1]`` (``[N,H,W]``/``[N,1,H,W]``/``[H,W]``) -> RGB float ``[N,3,H,W]`` in ``[0, 1]``."""
    m = _as_maps(maps01)
    arr = torch.nan_to_num(m.float(), nan=0.0).clamp(0.0, 1.0).numpy()
    rgba = _cmap(cmap)(arr)  # [N,H,W,4] float64
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).float().permute(0, 3, 1, 2).contiguous()


def _resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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
    img = to_rgb(_as_images(images01).float().clamp(0.0, 1.0))
    m = _as_maps(maps01)
    if m.shape[0] != img.shape[0]:
        raise ValueError(f"{img.shape[0]} image(s) but {m.shape[0]} map(s)")
    m = _resize_maps(m, (img.shape[-2], img.shape[-1])).clamp(0.0, 1.0)
    a = (alpha * (2.0 * m - 1.0).abs())[:, None] if signed else alpha
    return ((1.0 - a) * img + a * colorize(m, cmap)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def format_caption(
    true: str | None = None,
    pred: str | None = None,
    prob: float | None = None,
    target: str | None = None,
    sep: str = " · ",
) -> str:
    """``"true: rose · pred: rose 97% · target: rose"``; parts that are ``None`` are left out."""
    parts = []
    if true is not None:
        parts.append(f"true: {true}")
    if pred is not None:
        parts.append(f"pred: {pred}" + (f" {_percent(prob)}" if prob is not None else ""))
    elif prob is not None:
        parts.append(_percent(prob))
    if target is not None:
        parts.append(f"target: {target}")
    return sep.join(parts)


def _percent(p: float) -> str:
    p = float(p) * 100.0
    if p >= 99.95 or p < 0.05:
        return f"{p:.0f}%" if p >= 1 or p == 0 else f"{p:.1g}%"
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%"


def _wrap(text: str | None, width_in: float, pt: float) -> list[str]:
    """Wrap ``text`` so that each line fits ``width_in`` inches at ``pt`` points."""
    if not text:
        return []
    chars = max(8, int(width_in / (0.56 * pt * _PT)))
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        lines.extend(textwrap.wrap(para, chars, break_on_hyphens=False) or [""])
    return lines


def _text_h(lines: int, pt: float) -> float:
    return lines * pt * _LINE * _PT


# --------------------------------------------------------------------------------------------
# Figure plumbing
# --------------------------------------------------------------------------------------------


class _Canvas:
    """A figure laid out in inches from the top-left corner."""

    def __init__(self, width: float, height: float, dpi: float) -> None:
        self.w, self.h = float(width), float(height)
        self.fig = Figure(figsize=(self.w, self.h), dpi=dpi, facecolor="white")
        FigureCanvasAgg(self.fig)

    def axes(self, left: float, top: float, width: float, height: float) -> Any:
        ax = self.fig.add_axes((left / self.w, 1.0 - (top + height) / self.h, width / self.w, height / self.h))
        return ax

    def text(self, x: float, top: float, lines: Sequence[str], pt: float, ha: str = "center", **kw: Any) -> None:
        if lines:
            self.fig.text(
                x / self.w, 1.0 - top / self.h, "\n".join(lines), ha=ha, va="top", fontsize=pt,
                linespacing=_LINE, **kw,
            )


def figure_to_png(fig: Figure, dpi: float | None = None, close: bool = True) -> PNG:
    """Render a figure to PNG bytes; with ``close`` (default) the figure is cleared afterwards."""
    buf = io.BytesIO()
    try:
        if not isinstance(fig.canvas, FigureCanvasAgg):
            FigureCanvasAgg(fig)
        fig.savefig(buf, format="png", dpi=dpi or fig.dpi, facecolor="white")
    finally:
        if close:
            _close(fig)
    return PNG(buf.getvalue())


def _close(fig: Figure) -> None:
    fig.clear()
    try:  # a figure made with pyplot also lives in pyplot's registry
        import matplotlib._pylab_helpers as helpers

        num = getattr(fig, "number", None)
        if num is not None and helpers.Gcf.has_fignum(num):
            helpers.Gcf.destroy(num)
    except Exception:  # pragma: no cover - best effort only
        pass


def figure_to_tensor(fig: Figure | bytes, close: bool = True) -> torch.Tensor:
    """A figure (or PNG bytes) as a ``uint8`` RGB tensor ``[3,H,W]``.

    Ready for ``SummaryWriter.add_image(tag, t, step, dataformats="CHW")``; divide by 255 for floats.
    """
    if isinstance(fig, (bytes, bytearray)):
        from PIL import Image

        with Image.open(io.BytesIO(bytes(fig))) as im:
            rgba = np.asarray(im.convert("RGBA"))
    else:
        canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
        try:
            canvas.draw()
            rgba = np.asarray(canvas.buffer_rgba()).copy()
        finally:
            if close:
                _close(fig)
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgb * a + 255.0 * (1.0 - a)  # composite over white
    return torch.from_numpy(np.ascontiguousarray(rgb.round().astype(np.uint8))).permute(2, 0, 1).contiguous()


def _finish(png: PNG, path: str | os.PathLike[str] | None, sidecar: Mapping[str, Any] | None) -> PNG:
    if path is not None:
        save_png(png, path, sidecar)
    return png


def _hide(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _imshow(ax: Any, rgb: torch.Tensor, interpolation: str) -> None:
    """Show an RGB ``[3,H,W]`` float tensor in ``[0, 1]`` without axes."""
    ax.imshow(rgb.permute(1, 2, 0).numpy(), interpolation=interpolation, vmin=0, vmax=1)
    _hide(ax)


def _interp(h: int, w: int, shown_px: float) -> str:
    """Nearest for small images blown up (crisp digits), antialiased otherwise."""
    return "nearest" if shown_px >= 1.5 * max(h, w) else "antialiased"


def _panel_size(h: int, w: int, dpi: float, panel: float | None, small: float, large: float) -> tuple[float, float]:
    """Panel (width, height) in inches: small images blown up to ``small``, big ones near 1:1."""
    side = panel if panel is not None else min(large, max(small, max(h, w) / dpi))
    return side * w / max(h, w), side * h / max(h, w)


def _resolve_cmap(cmap: CmapLike | None, signed: bool) -> Colormap:
    return _cmap(cmap if cmap is not None else (DIVERGING_CMAP if signed else DEFAULT_CMAP))


def _colorbar(cv: _Canvas, cmap: Colormap, signed: bool, label: str, top: float) -> None:
    width = min(4.0, cv.w - 2 * _MARGIN)
    ax = cv.axes((cv.w - width) / 2, top, width, 0.14)
    sm = ScalarMappable(norm=Normalize(-1.0 if signed else 0.0, 1.0), cmap=cmap)
    cb = cv.fig.colorbar(sm, cax=ax, orientation="horizontal")
    if signed:
        cb.set_ticks([-1, 0, 1], labels=["negative", "0", "positive"])
    else:
        cb.set_ticks([0, 0.5, 1], labels=["low", "", "high"])
    cb.ax.tick_params(labelsize=_SMALL_PT, length=2, pad=1)
    cb.outline.set_linewidth(0.5)
    cv.text(cv.w / 2, top + 0.14 + 0.17, [label], _SMALL_PT, color=_GRAY_TEXT)


_COLORBAR_H = 0.14 + 0.17 + _text_h(1, _SMALL_PT) + 0.05


def _fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


# --------------------------------------------------------------------------------------------
# Heat maps
# --------------------------------------------------------------------------------------------


def heatmap_figure(
    images: ArrayLike,
    maps: ArrayLike,
    *,
    mean: Stats = None,
    std: Stats = None,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    map_label: str = "map",
    cmap: CmapLike | None = None,
    alpha: float = 0.5,
    signed: bool = False,
    normalize: Literal["image", "batch", "none"] = "image",
    clip_percentile: float | None = None,
    caption_colors: Sequence[str | None] | None = None,
    columns: int | None = None,
    panel_size: float | None = None,
    dpi: float = 100,
    path: str | os.PathLike[str] | None = None,
    sidecar: Mapping[str, Any] | None = None,
) -> PNG:
    """One group per image: input | map | overlay, with a caption above and a shared colour bar.

    Args:
        images: ``[N,C,H,W]`` normalised with ``mean``/``std`` (or in ``[0, 1]`` without them), 1 or
            3 channels; grey images are shown grey and overlaid in RGB.
        maps: ``[N,h,w]`` or ``[N,1,h,w]`` raw maps of any range (upsampled bilinearly to
            ``H x W``). With ``normalize="none"`` they must already be in ``[0, 1]``.
        captions: one per image, e.g. ``format_caption("rose", "rose", 0.97, "rose")``; wrapped.
        title: figure title (method, layer, checkpoint ...).
        map_label: header of the map panels and label of the colour bar ("Grad-CAM", ...).
        cmap: colour map; default :data:`DEFAULT_CMAP`, or :data:`DIVERGING_CMAP` when ``signed``.
        signed: maps keep their sign (0 -> centre of a diverging colour map).
        normalize: ``"image"``: each map scaled to its own range (the raw range is printed under
            it); ``"batch"``: one scale for all maps; ``"none"``: maps already in ``[0, 1]``.
        clip_percentile: clip outliers before scaling (e.g. 99 for saliency).
        caption_colors: optional text colour per caption (e.g. green right / red wrong).
        columns: image groups per row (default: 1 for up to 2 images, 2 up to 12, else 3).
        panel_size: side of one panel in inches (default: fitted to the image size).
        path / sidecar: also write the PNG atomically with a JSON sidecar (see :func:`save_png`).

    Returns the PNG bytes; the figure is released.
    """
    img01 = _images01(images, mean, std)
    n, _, h, w = img01.shape
    raw = _as_maps(maps)
    if raw.shape[0] != n:
        raise ValueError(f"{n} image(s) but {raw.shape[0]} map(s)")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{n} image(s) but {len(captions)} caption(s)")
    if normalize == "none":
        m01 = torch.nan_to_num(raw.float(), nan=0.0).clamp(0.0, 1.0)
    else:
        m01 = normalize_maps(raw, scale=normalize, signed=signed, clip_percentile=clip_percentile)
    m01 = _resize_maps(m01, (h, w)).clamp(0.0, 1.0)
    cm = _resolve_cmap(cmap, signed)
    over = overlay(img01, m01, alpha, cm, signed=signed)
    rgb_in = to_rgb(img01)
    rgb_map = colorize(m01, cm)

    pw, ph = _panel_size(h, w, dpi, panel_size, small=1.8, large=2.6)
    interp = _interp(h, w, max(pw, ph) * dpi)
    cols = columns or (1 if n <= 2 else 2 if n <= 12 else 3)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    gap = 0.08  # between panels of a group
    group_gap = 0.35  # between groups
    group_w = 3 * pw + 2 * gap
    width = max(2 * _MARGIN + cols * group_w + (cols - 1) * group_gap, 4.6)

    caption_lines = [_wrap(captions[i], group_w, _CAPTION_PT) if captions else [] for i in range(n)]
    cap_h = max((_text_h(len(c), _CAPTION_PT) for c in caption_lines), default=0.0)
    header_h = _text_h(1, _HEADER_PT) + 0.03
    under_h = _text_h(1, _SMALL_PT) + 0.04 if normalize != "none" else 0.02
    group_h = cap_h + (0.05 if cap_h else 0) + header_h + ph + under_h
    title_lines = _wrap(title, width - 2 * _MARGIN, _TITLE_PT)
    title_h = _text_h(len(title_lines), _TITLE_PT) + 0.12 if title_lines else 0.0
    row_gap = 0.22
    height = 2 * _MARGIN + title_h + rows * group_h + (rows - 1) * row_gap + _COLORBAR_H + 0.12

    cv = _Canvas(width, height, dpi)
    cv.text(width / 2, _MARGIN, title_lines, _TITLE_PT, fontweight="bold")
    x0 = (width - (cols * group_w + (cols - 1) * group_gap)) / 2
    flat_raw = raw.reshape(n, -1)
    headers = ("input", map_label, "overlay")
    for i in range(n):
        r, c = divmod(i, cols)
        left = x0 + c * (group_w + group_gap)
        top = _MARGIN + title_h + r * (group_h + row_gap)
        color = (caption_colors[i] if caption_colors is not None else None) or "black"
        cv.text(left + group_w / 2, top, caption_lines[i], _CAPTION_PT, color=color)
        ptop = top + cap_h + (0.05 if cap_h else 0) + header_h
        for k, pic in enumerate((rgb_in[i], rgb_map[i], over[i])):
            ax = cv.axes(left + k * (pw + gap), ptop, pw, ph)
            _imshow(ax, pic, interp)
            ax.set_title(headers[k], fontsize=_HEADER_PT, color=_GRAY_TEXT, pad=2)
        if normalize != "none":
            lo, hi = float(flat_raw[i].min()), float(flat_raw[i].max())
            note = f"constant {_fmt(lo)}" if hi - lo <= 1e-6 * max(abs(lo), abs(hi)) else f"raw {_fmt(lo)} … {_fmt(hi)}"
            cv.text(left + pw + gap + pw / 2, ptop + ph + 0.03, [note], _SMALL_PT, color=_GRAY_TEXT)
    scale_note = {"image": "each map scaled to its own range", "batch": "one scale for all maps", "none": "as given"}
    cb_top = _MARGIN + title_h + rows * group_h + (rows - 1) * row_gap + 0.12
    _colorbar(cv, cm, signed, f"{map_label} ({scale_note[normalize]})", cb_top)
    return _finish(figure_to_png(cv.fig), path, sidecar)


# --------------------------------------------------------------------------------------------
# Captioned image grids
# --------------------------------------------------------------------------------------------


def image_grid_figure(
    images: ArrayLike,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    *,
    mean: Stats = None,
    std: Stats = None,
    columns: int | None = None,
    caption_colors: Sequence[str | None] | None = None,
    panel_size: float | None = None,
    dpi: float = 100,
    path: str | os.PathLike[str] | None = None,
    sidecar: Mapping[str, Any] | None = None,
) -> PNG:
    """Images in a grid, each with a (wrapped) caption above: misclassified samples, class
    examples, activation-maximisation images ("true 7 / pred 1 (83%)").

    ``images`` as in :func:`heatmap_figure` (normalised with ``mean``/``std`` or in ``[0, 1]``);
    ``columns`` defaults to at most 8.
    """
    img01 = _images01(images, mean, std)
    n, _, h, w = img01.shape
    if captions is not None and len(captions) != n:
        raise ValueError(f"{n} image(s) but {len(captions)} caption(s)")
    pw, ph = _panel_size(h, w, dpi, panel_size, small=1.5, large=2.4)
    interp = _interp(h, w, max(pw, ph) * dpi)
    cols = max(1, min(columns or 8, n))
    rows = math.ceil(n / cols)
    gap = 0.18
    cell_w = max(pw, 1.2)
    width = max(2 * _MARGIN + cols * cell_w + (cols - 1) * gap, 3.0)
    caption_lines = [_wrap(captions[i], cell_w + gap * 0.8, _CAPTION_PT) if captions else [] for i in range(n)]
    cap_h = max((_text_h(len(c), _CAPTION_PT) for c in caption_lines), default=0.0)
    cell_h = cap_h + (0.04 if cap_h else 0) + ph
    title_lines = _wrap(title, width - 2 * _MARGIN, _TITLE_PT)
    title_h = _text_h(len(title_lines), _TITLE_PT) + 0.12 if title_lines else 0.0
    row_gap = 0.15
    height = 2 * _MARGIN + title_h + rows * cell_h + (rows - 1) * row_gap

    cv = _Canvas(width, height, dpi)
    cv.text(width / 2, _MARGIN, title_lines, _TITLE_PT, fontweight="bold")
    x0 = (width - (cols * cell_w + (cols - 1) * gap)) / 2
    rgb = to_rgb(img01)
    for i in range(n):
        r, c = divmod(i, cols)
        left = x0 + c * (cell_w + gap)
        top = _MARGIN + title_h + r * (cell_h + row_gap)
        color = (caption_colors[i] if caption_colors is not None else None) or "black"
        cv.text(left + cell_w / 2, top, caption_lines[i], _CAPTION_PT, color=color)
        ax = cv.axes(left + (cell_w - pw) / 2, top + cap_h + (0.04 if cap_h else 0), pw, ph)
        _imshow(ax, rgb[i], interp)
    return _finish(figure_to_png(cv.fig), path, sidecar)


# --------------------------------------------------------------------------------------------
# Activations and filters
# --------------------------------------------------------------------------------------------


def _grid_columns(count: int) -> int:
    return 8 if count >= 32 else max(1, math.ceil(math.sqrt(count)))


_SEPARATOR = (0.62, 0.72, 0.86)
"""Colour between grey filter tiles (white would read as a large positive weight)."""


def _tile_grid(
    tiles_rgb: torch.Tensor, cols: int, pad: int = 1, pad_rgb: tuple[float, float, float] | None = None
) -> torch.Tensor:
    """``[K,3,h,w]`` -> one ``[3,H,W]`` image with separators (torchvision ``make_grid``);
    white separators unless ``pad_rgb`` is given."""
    grid = make_grid(tiles_rgb, nrow=cols, padding=pad, pad_value=1.0)
    if pad_rgb is not None:
        border = make_grid(torch.zeros_like(tiles_rgb[:, :1]).expand(-1, 3, -1, -1), nrow=cols, padding=pad, pad_value=1.0)
        colour = torch.tensor(pad_rgb, dtype=grid.dtype).view(3, 1, 1).expand_as(grid)
        grid = torch.where(border > 0.5, colour, grid)
    return grid


def _tile_ticks(ax: Any, count: int, cols: int, th: int, tw: int, pad: int, x_labels: bool = True) -> None:
    """Label grid rows with the index of their first tile and columns with the offset."""
    rows = math.ceil(count / cols)
    ax.set_yticks([pad + r * (th + pad) + (th - 1) / 2 for r in range(rows)], [str(r * cols) for r in range(rows)])
    if x_labels and cols > 1:
        ax.set_xticks([pad + c * (tw + pad) + (tw - 1) / 2 for c in range(cols)], [f"+{c}" for c in range(cols)])
    else:
        ax.set_xticks([])
    ax.tick_params(labelsize=_SMALL_PT, length=0, pad=1, colors=_GRAY_TEXT)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _as_act(t: ArrayLike) -> torch.Tensor:
    a = _as_tensor(t).float()
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1 and a.shape[-2] == 1:
        a = a[:, 0, 0]
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (1, 3):
        raise ValueError(f"activations must be [C,h,w] or [C] (one sample); got {list(a.shape)}")
    return a


def activation_grid_figure(
    acts: Mapping[str, ArrayLike],
    title: str | None = None,
    *,
    max_channels: int = 64,
    scale: Literal["channel", "layer"] = "channel",
    cmap: CmapLike = "viridis",
    image: ArrayLike | None = None,
    mean: Stats = None,
    std: Stats = None,
    columns: int | None = None,
    block_width: float = 4.6,
    dpi: float = 100,
    path: str | os.PathLike[str] | None = None,
    sidecar: Mapping[str, Any] | None = None,
) -> PNG:
    """Feature maps of one sample, one block per layer: ``{layer_name: [C,h,w]}``.

    Each block shows the first ``max_channels`` channels as a grid (row labels give the index of
    the first channel in the row, column labels the offset) titled with the layer name, the shape
    and how many channels are shown. ``scale="channel"`` stretches each map to its own range (shapes
    are visible, all-zero "dead" maps stay dark); ``"layer"`` uses one range per layer (strengths
    comparable). Vector activations (``[C]`` or ``[C,1,1]``, e.g. after pooling) are drawn as bars.
    ``image`` (optional) is the input, shown first (normalised with ``mean``/``std`` or in
    ``[0, 1]``).
    """
    if not acts and image is None:
        raise ValueError("no activations to show")
    cm = _cmap(cmap)
    blocks: list[tuple[str, Any]] = []  # (kind, payload)
    if image is not None:
        blocks.append(("image", to_rgb(_images01(image, mean, std))[0]))
    for name, tensor in acts.items():
        full = _as_tensor(tensor)
        while full.ndim > 1 and full.shape[0] == 1 and full.ndim != 3:
            full = full[0]  # drop a batch of one, keep [C,h,w] / [C,1,1] as given
        blocks.append(("act", (name, _as_act(tensor), tuple(full.shape))))
    cols = max(1, min(columns or (1 if len(blocks) == 1 else 2), len(blocks)))
    pad = 1

    # Render each block's pixels first so the layout knows its aspect ratio.
    prepared = []
    for kind, payload in blocks:
        if kind == "image":
            img = payload
            heading = ["input", f"{img.shape[-1]}×{img.shape[-2]} pixels"]
            prepared.append(("image", heading, img, None))
            continue
        name, a, full_shape = payload
        total = a.shape[0]
        shown = min(total, max_channels)
        shape = ", ".join(str(s) for s in full_shape)
        count = f"all {total} channels" if shown == total else f"first {shown} of {total} channels"
        heading = [name, f"shape [{shape}] · {count}"]
        if a.ndim == 1:
            prepared.append(("bars", heading, a[:shown], None))
            continue
        x = a[:shown]
        flat = x.reshape(shown, -1)
        if scale == "channel":
            lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        else:
            lo, hi = flat.min().expand(shown, 1), flat.max().expand(shown, 1)
        rng = hi - lo
        x01 = torch.where(rng > 0, (flat - lo) / rng.clamp_min(1e-30), torch.zeros_like(flat)).reshape(x.shape)
        tiles = colorize(x01, cm)
        gcols = _grid_columns(shown)
        grid = _tile_grid(tiles, gcols, pad)
        prepared.append(("grid", heading, grid, (shown, gcols, x.shape[-2], x.shape[-1])))

    heading_h = _text_h(2, _CAPTION_PT) + 0.06
    max_img_h = 1.1 * block_width
    sizes = []
    for kind, _, pix, _ in prepared:
        if kind == "bars":
            sizes.append((block_width, 1.5))
        else:
            ih, iw = pix.shape[-2], pix.shape[-1]
            bh = block_width * ih / iw
            bw = block_width
            if kind == "image":
                bh, bw = min(bh, 2.2), min(bw, 2.2 * iw / ih)
            if bh > max_img_h:
                bw, bh = bw * max_img_h / bh, max_img_h
            sizes.append((bw, bh))
    nrows = math.ceil(len(prepared) / cols)
    row_h = [max(sizes[i][1] for i in range(r * cols, min(len(prepared), (r + 1) * cols))) for r in range(nrows)]
    col_gap, row_gap = 0.45, 0.3
    width = 2 * _MARGIN + 0.3 + cols * block_width + (cols - 1) * col_gap
    title_lines = _wrap(title, width - 2 * _MARGIN, _TITLE_PT)
    note = "each map scaled to its own range" if scale == "channel" else "one colour scale per layer"
    note_lines = [f"{note} · colour map {cm.name} (dark = low, bright = high)"]
    title_h = _text_h(len(title_lines), _TITLE_PT) + _text_h(1, _SMALL_PT + 1) + 0.15 if title_lines else _text_h(1, _SMALL_PT + 1) + 0.1
    height = 2 * _MARGIN + title_h + sum(row_h) + nrows * (heading_h + 0.12) + (nrows - 1) * row_gap

    cv = _Canvas(width, height, dpi)
    cv.text(width / 2, _MARGIN, title_lines, _TITLE_PT, fontweight="bold")
    cv.text(width / 2, _MARGIN + title_h - _text_h(1, _SMALL_PT + 1) - 0.08, note_lines, _SMALL_PT + 1, color=_GRAY_TEXT)
    top = _MARGIN + title_h
    for r in range(nrows):
        for c in range(cols):
            i = r * cols + c
            if i >= len(prepared):
                break
            kind, heading, pix, info = prepared[i]
            bw, bh = sizes[i]
            left0 = _MARGIN + 0.3 + c * (block_width + col_gap)
            cv.text(left0 + block_width / 2, top, heading[:1], _CAPTION_PT, fontweight="bold")
            cv.text(left0 + block_width / 2, top + _text_h(1, _CAPTION_PT), heading[1:], _CAPTION_PT - 1, color=_GRAY_TEXT)
            atop = top + heading_h
            left = left0 + (block_width - bw) / 2
            ax = cv.axes(left, atop, bw, bh)
            if kind == "bars":
                vals = pix.numpy()
                ax.bar(np.arange(len(vals)), vals, width=0.85, color=cm(0.35))
                ax.axhline(0, color="black", linewidth=0.5)
                ax.set_xlim(-0.7, len(vals) - 0.3)
                ax.tick_params(labelsize=_SMALL_PT, length=2, pad=1)
                ax.set_xlabel("channel", fontsize=_SMALL_PT, labelpad=1)
                for side in ("top", "right"):
                    ax.spines[side].set_visible(False)
            elif kind == "image":
                _imshow(ax, pix, _interp(pix.shape[-2], pix.shape[-1], bh * dpi))
            else:
                shown, gcols, th, tw = info
                interp = "nearest" if bh * dpi >= pix.shape[-2] else "antialiased"
                ax.imshow(pix.permute(1, 2, 0).numpy(), interpolation=interp)
                _tile_ticks(ax, shown, gcols, th, tw, pad, x_labels=gcols <= 16)
        top += row_h[r] + heading_h + 0.12 + row_gap
    return _finish(figure_to_png(cv.fig), path, sidecar)


def filter_grid_figure(
    weights: ArrayLike | torch.nn.Module,
    layer_name: str,
    *,
    title: str | None = None,
    max_filters: int = 64,
    max_inputs: int = 16,
    rgb: bool | None = None,
    max_size: float = 6.0,
    dpi: float = 100,
    path: str | os.PathLike[str] | None = None,
    sidecar: Mapping[str, Any] | None = None,
) -> PNG:
    """Convolution kernels ``[out, in, kh, kw]`` (or a module with ``.weight``) as a tile grid.

    * 3 input channels (``rgb`` default): each filter is one colour tile -- how first-layer filters
      of an RGB network respond to colour;
    * 1 input channel: each filter is one grey tile;
    * deeper layers: a grey matrix, one row per output filter (first ``max_filters``, capped at
      16 rows unless ``max_filters`` is smaller) and one column per input channel (first ``max_inputs``).

    Each filter is scaled by its largest magnitude, so mid-grey is 0, white positive, black
    negative (in colour: each channel the same way).
    """
    if isinstance(weights, torch.nn.Module):
        if not isinstance(getattr(weights, "weight", None), torch.Tensor):
            raise ValueError(f"{type(weights).__name__} has no weight tensor")
        weights = weights.weight  # type: ignore[assignment]
    wt = _as_tensor(weights).float()  # type: ignore[arg-type]
    if wt.ndim != 4:
        raise ValueError(f"filter weights must be [out, in, kh, kw]; got {list(wt.shape)}")
    out_c, in_c, kh, kw = wt.shape
    shape = ", ".join(str(s) for s in wt.shape)
    colour = (in_c == 3) if rgb is None else bool(rgb and in_c == 3)
    pad = 1
    matrix = not colour and in_c > 1
    n_out = min(out_c, max_filters if not matrix else min(max_filters, 16))
    n_in = min(in_c, max_inputs) if matrix else in_c
    w = wt[:n_out, :n_in]
    absmax = w.reshape(n_out, -1).abs().max(1).values.clamp_min(1e-30).view(n_out, 1, 1, 1)
    w01 = (w / (2 * absmax) + 0.5).clamp(0.0, 1.0)
    outs = f"{n_out}" if n_out == out_c else f"first {n_out} of {out_c}"
    if colour:
        grid = _tile_grid(w01, _grid_columns(n_out), pad)
        kind = f"{outs} filters, in colour (one tile per filter, RGB input)"
        legend = "each filter scaled to its max |w|; mid-grey = 0 (no response to that colour)"
    elif not matrix:
        grid = _tile_grid(w01.expand(-1, 3, -1, -1), _grid_columns(n_out), pad, _SEPARATOR)
        kind = f"{outs} filters (one tile per filter, grey input)"
        legend = "each filter scaled to its max |w|: mid-grey = 0, white = positive, black = negative"
    else:
        tiles = w01.reshape(n_out * n_in, 1, kh, kw).expand(-1, 3, -1, -1)
        grid = _tile_grid(tiles, n_in, pad, _SEPARATOR)
        ins = f"{n_in}" if n_in == in_c else f"first {n_in} of {in_c}"
        kind = f"{outs} filters (rows) × {ins} input channels (columns)"
        legend = "each filter (row) scaled to its max |w|: mid-grey = 0, white = positive, black = negative"
    gcols = _grid_columns(n_out) if not matrix else n_in
    gh, gw = grid.shape[-2], grid.shape[-1]
    # Long side: 4.5 in (several screen pixels per weight), more for big grids, at most max_size.
    side = min(max_size, max(4.5, max(gh, gw) / dpi))
    iw, ih = side * gw / max(gh, gw), side * gh / max(gh, gw)
    label_w = 0.55 if matrix else 0.35
    width = max(iw + 2 * label_w + 2 * _MARGIN, 5.6)
    title_lines = _wrap(title, width - 2 * _MARGIN, _TITLE_PT)
    name_lines = _wrap(f"{layer_name}  ·  weight [{shape}]", width - 2 * _MARGIN, _CAPTION_PT + 1)
    kind_lines = _wrap(kind, width - 2 * _MARGIN, _CAPTION_PT)
    legend_lines = _wrap(legend, width - 2 * _MARGIN, _SMALL_PT + 0.5)
    title_h = _text_h(len(title_lines), _TITLE_PT) + 0.1 if title_lines else 0.0
    name_h = _text_h(len(name_lines), _CAPTION_PT + 1)
    kind_h = _text_h(len(kind_lines), _CAPTION_PT)
    legend_h = _text_h(len(legend_lines), _SMALL_PT + 0.5)
    head_h = name_h + kind_h + legend_h + 0.12
    xlabel_h = 0.45 if matrix else 0.3
    height = 2 * _MARGIN + title_h + head_h + ih + xlabel_h

    cv = _Canvas(width, height, dpi)
    top = _MARGIN
    cv.text(width / 2, top, title_lines, _TITLE_PT, fontweight="bold")
    top += title_h
    cv.text(width / 2, top, name_lines, _CAPTION_PT + 1, fontweight="bold")
    top += name_h
    cv.text(width / 2, top, kind_lines, _CAPTION_PT)
    top += kind_h
    cv.text(width / 2, top, legend_lines, _SMALL_PT + 0.5, color=_GRAY_TEXT)
    ax = cv.axes((width - iw) / 2, _MARGIN + title_h + head_h, iw, ih)
    interp = "nearest" if ih * dpi >= gh else "antialiased"
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation=interp)
    if matrix:
        _tile_ticks(ax, n_out * n_in, gcols, kh, kw, pad, x_labels=False)
        ax.set_yticks([pad + r * (kh + pad) + (kh - 1) / 2 for r in range(n_out)], [str(r) for r in range(n_out)])
        step = 1 if n_in <= 16 else math.ceil(n_in / 16)
        ax.set_xticks([pad + c * (kw + pad) + (kw - 1) / 2 for c in range(0, n_in, step)], [str(c) for c in range(0, n_in, step)])
        ax.tick_params(labelsize=_SMALL_PT)
        ax.set_ylabel("output filter", fontsize=_SMALL_PT + 0.5, color=_GRAY_TEXT, labelpad=2)
        ax.set_xlabel("input channel", fontsize=_SMALL_PT + 0.5, color=_GRAY_TEXT, labelpad=2)
    else:
        _tile_ticks(ax, n_out, gcols, kh, kw, pad, x_labels=gcols <= 16)
        ax.tick_params(labelsize=_SMALL_PT)
    return _finish(figure_to_png(cv.fig), path, sidecar)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Make metadata JSON-safe: tensors/arrays -> numbers or lists, paths -> str, tuples -> lists,
    dataclasses -> dicts, enums -> values, non-finite floats -> ``None``; anything else -> ``str``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return to_jsonable(t.item() if t.ndim == 0 else t.tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic models
        return to_jsonable(obj.model_dump())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    return str(obj)


def save_png(
    fig_or_bytes: Figure | bytes,
    path: str | os.PathLike[str],
    sidecar: Mapping[str, Any] | None = None,
) -> Path:
    """Write a PNG (a figure is rendered and released; bytes are written as they are) and, with
    ``sidecar``, a JSON file of that metadata next to it (``x.png`` -> ``x.json``).

    Parent folders are created; both files are written atomically (temporary file + ``os.replace``)
    so readers never see half a picture. Returns the PNG path.
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    data = figure_to_png(fig_or_bytes) if isinstance(fig_or_bytes, Figure) else bytes(fig_or_bytes)
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("save_png needs a Figure or PNG bytes")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, data)
        if sidecar is not None:
            text = json.dumps(to_jsonable(dict(sidecar)), indent=2, ensure_ascii=False, allow_nan=False)
            atomic_write(p.with_suffix(".json"), (text + "\n").encode("utf-8"))
    except OSError as exc:
        raise CnnvisError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p
