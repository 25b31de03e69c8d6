"""Heatmap figures: input | map | overlay per image, with captions and one colour bar."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize

from cnnvis.plots.base import (
    CAPTION_PT,
    GRAY_TEXT,
    HEADER_PT,
    MARGIN,
    PNG,
    SMALL_PT,
    TITLE_PT,
    Canvas,
    figure_to_png,
    finish,
    fmt,
    imshow,
    interpolation,
    panel_size_in,
    text_h,
    wrap,
)
from cnnvis.plots.color import (
    ArrayLike,
    CmapLike,
    Stats,
    as_maps,
    colorize,
    images01,
    overlay,
    resize_maps,
    resolve_cmap,
    to_rgb,
)
from cnnvis.vis.maps import NormalizeMode, flat_maps, normalize_maps


def colorbar(cv: Canvas, cmap: Colormap, signed: bool, label: str, top: float) -> None:
    width = min(4.0, cv.w - 2 * MARGIN)
    ax = cv.axes((cv.w - width) / 2, top, width, 0.14)
    sm = ScalarMappable(norm=Normalize(-1.0 if signed else 0.0, 1.0), cmap=cmap)
    cb = cv.fig.colorbar(sm, cax=ax, orientation="horizontal")
    if signed:
        cb.set_ticks([-1, 0, 1], labels=["negative", "0", "positive"])
    else:
        cb.set_ticks([0, 0.5, 1], labels=["low", "", "high"])
    cb.ax.tick_params(labelsize=SMALL_PT, length=2, pad=1)
    cb.outline.set_linewidth(0.5)
    cv.text(cv.w / 2, top + 0.14 + 0.17, [label], SMALL_PT, color=GRAY_TEXT)


COLORBAR_H = 0.14 + 0.17 + text_h(1, SMALL_PT) + 0.05


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
    normalize: NormalizeMode | Literal["none"] = "minmax",
    scale: Literal["image", "batch"] = "image",
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
        cmap: colour map; default :data:`DEFAULT_CMAP`, or :data:`DIVERGING_CMAP` for ``"signed"``.
        normalize: the :func:`~cnnvis.vis.maps.normalize_maps` mode that scales the maps to
            ``[0, 1]`` (``"signed"``: zero at the centre of a diverging colour map), or ``"none"``
            for maps already in ``[0, 1]``. The raw range is printed under each map.
        scale: ``"image"``: each map scaled on its own; ``"batch"``: one scale for all maps.
        clip_percentile: clip outliers before scaling (e.g. 99 for saliency).
        caption_colors: optional text colour per caption (e.g. green right / red wrong).
        columns: image groups per row (default: 1 for up to 2 images, 2 up to 12, else 3).
        panel_size: side of one panel in inches (default: fitted to the image size).
        path / sidecar: also write the PNG atomically with a JSON sidecar (see :func:`save_png`).

    Returns the PNG bytes; the figure is released.
    """
    img01 = images01(images, mean, std)
    n, _, h, w = img01.shape
    raw = as_maps(maps)
    if raw.shape[0] != n:
        raise ValueError(f"{n} image(s) but {raw.shape[0]} map(s)")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{n} image(s) but {len(captions)} caption(s)")
    signed = normalize == "signed"
    if normalize == "none":
        m01 = torch.nan_to_num(raw.float(), nan=0.0).clamp(0.0, 1.0)
    else:
        m01 = normalize_maps(raw, normalize, scale=scale, clip_percentile=clip_percentile)
    m01 = resize_maps(m01, (h, w)).clamp(0.0, 1.0)
    cm = resolve_cmap(cmap, signed)
    over = overlay(img01, m01, alpha, cm, signed=signed)
    rgb_in = to_rgb(img01)
    rgb_map = colorize(m01, cm)

    pw, ph = panel_size_in(h, w, dpi, panel_size, small=1.8, large=2.6)
    interp = interpolation(h, w, max(pw, ph) * dpi)
    cols = columns or (1 if n <= 2 else 2 if n <= 12 else 3)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    gap = 0.08  # between panels of a group
    group_gap = 0.35  # between groups
    group_w = 3 * pw + 2 * gap
    width = max(2 * MARGIN + cols * group_w + (cols - 1) * group_gap, 4.6)

    caption_lines = [wrap(captions[i], group_w, CAPTION_PT) if captions else [] for i in range(n)]
    cap_h = max((text_h(len(c), CAPTION_PT) for c in caption_lines), default=0.0)
    header_h = text_h(1, HEADER_PT) + 0.03
    flat = flat_maps(raw).tolist() if normalize != "none" else [False] * n
    under_h = text_h(2 if any(flat) else 1, SMALL_PT) + 0.04 if normalize != "none" else 0.02
    group_h = cap_h + (0.05 if cap_h else 0) + header_h + ph + under_h
    title_lines = wrap(title, width - 2 * MARGIN, TITLE_PT, bold=True)
    title_h = text_h(len(title_lines), TITLE_PT) + 0.12 if title_lines else 0.0
    row_gap = 0.22
    height = 2 * MARGIN + title_h + rows * group_h + (rows - 1) * row_gap + COLORBAR_H + 0.12

    cv = Canvas(width, height, dpi)
    cv.text(width / 2, MARGIN, title_lines, TITLE_PT, fontweight="bold")
    x0 = (width - (cols * group_w + (cols - 1) * group_gap)) / 2
    flat_raw = raw.reshape(n, -1)
    headers = ("input", map_label, "overlay")
    for i in range(n):
        r, c = divmod(i, cols)
        left = x0 + c * (group_w + group_gap)
        top = MARGIN + title_h + r * (group_h + row_gap)
        color = (caption_colors[i] if caption_colors is not None else None) or "black"
        cv.text(left + group_w / 2, top, caption_lines[i], CAPTION_PT, color=color)
        ptop = top + cap_h + (0.05 if cap_h else 0) + header_h
        for k, pic in enumerate((rgb_in[i], rgb_map[i], over[i])):
            ax = cv.axes(left + k * (pw + gap), ptop, pw, ph)
            imshow(ax, pic, interp)
            ax.set_title(headers[k], fontsize=HEADER_PT, color=GRAY_TEXT, pad=2)
        if normalize != "none":
            lo, hi = float(flat_raw[i].min()), float(flat_raw[i].max())
            note = [f"constant {fmt(lo)}" if hi - lo <= 1e-6 * max(abs(lo), abs(hi)) else f"raw {fmt(lo)} … {fmt(hi)}"]
            if flat[i]:
                note.insert(0, "flat map: no spatial information")
            cv.text(left + pw + gap + pw / 2, ptop + ph + 0.03, note, SMALL_PT, color="#9a6700" if flat[i] else GRAY_TEXT)
    cb_top = MARGIN + title_h + rows * group_h + (rows - 1) * row_gap + 0.12
    flat_note = "; flat maps from 0, not stretched" if normalize == "minmax" and any(flat) else ""
    colorbar(cv, cm, signed, f"{map_label} ({_scale_note(normalize, scale)}{flat_note})", cb_top)
    return finish(figure_to_png(cv.fig), path, sidecar)


def _scale_note(normalize: str, scale: str) -> str:
    if normalize == "none":
        return "as given"
    how = {"minmax": "min to max", "maxabs": "0 to max |value|", "signed": "-max |value| to +max |value|",
           "positive": "0 to max, negatives as 0"}[normalize]
    return f"{'each map' if scale == 'image' else 'all maps together'} scaled {how}"
