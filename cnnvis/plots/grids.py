"""Grids of pictures: captioned images, a sample's feature maps per layer, convolution filters."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torchvision.utils import make_grid

from cnnvis.plots.base import (
    CAPTION_PT,
    GRAY_TEXT,
    MARGIN,
    PNG,
    SMALL_PT,
    TITLE_PT,
    Canvas,
    figure_to_png,
    finish,
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
    as_tensor,
    colorize,
    get_cmap,
    images01,
    to_rgb,
)

SEPARATOR = (0.62, 0.72, 0.86)
"""Colour between grey filter tiles (white would read as a large positive weight)."""


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
    legend: Sequence[tuple[str, tuple[float, float, float]]] = (),
    legend_note: str = "",
    dpi: float = 100,
    path: str | os.PathLike[str] | None = None,
    sidecar: Mapping[str, Any] | None = None,
) -> PNG:
    """Images in a grid, each with a (wrapped) caption above: misclassified samples, class
    examples, activation-maximisation images ("true 7 / pred 1 (83%)").

    ``images`` as in :func:`heatmap_figure` (normalised with ``mean``/``std`` or in ``[0, 1]``);
    ``columns`` defaults to at most 8. ``legend``: ``(name, rgb)`` swatches under the grid (the
    key of a colour-coded picture), followed by ``legend_note``.
    """
    img01 = images01(images, mean, std)
    n, _, h, w = img01.shape
    if captions is not None and len(captions) != n:
        raise ValueError(f"{n} image(s) but {len(captions)} caption(s)")
    pw, ph = panel_size_in(h, w, dpi, panel_size, small=1.5, large=2.4)
    interp = interpolation(h, w, max(pw, ph) * dpi)
    cols = max(1, min(columns or 8, n))
    rows = math.ceil(n / cols)
    gap = 0.18
    cell_w = max(pw, 1.2)
    width = max(2 * MARGIN + cols * cell_w + (cols - 1) * gap, 3.0)
    caption_lines = [wrap(captions[i], cell_w + gap * 0.8, CAPTION_PT) if captions else [] for i in range(n)]
    cap_h = max((text_h(len(c), CAPTION_PT) for c in caption_lines), default=0.0)
    cell_h = cap_h + (0.04 if cap_h else 0) + ph
    title_lines = wrap(title, width - 2 * MARGIN, TITLE_PT, bold=True)
    title_h = text_h(len(title_lines), TITLE_PT) + 0.12 if title_lines else 0.0
    row_gap = 0.15
    key_rows = _legend_rows(legend, width - 2 * MARGIN)
    note_lines = wrap(legend_note, width - 2 * MARGIN, SMALL_PT)  # a one-image figure is narrower than the note
    key_h = (len(key_rows) * LEGEND_ROW_H + 0.1 if key_rows else 0.0) + (text_h(len(note_lines), SMALL_PT) + 0.05 if note_lines else 0.0)
    height = 2 * MARGIN + title_h + rows * cell_h + (rows - 1) * row_gap + key_h

    cv = Canvas(width, height, dpi)
    cv.text(width / 2, MARGIN, title_lines, TITLE_PT, fontweight="bold")
    x0 = (width - (cols * cell_w + (cols - 1) * gap)) / 2
    rgb = to_rgb(img01)
    for i in range(n):
        r, c = divmod(i, cols)
        left = x0 + c * (cell_w + gap)
        top = MARGIN + title_h + r * (cell_h + row_gap)
        color = (caption_colors[i] if caption_colors is not None else None) or "black"
        cv.text(left + cell_w / 2, top, caption_lines[i], CAPTION_PT, color=color)
        ax = cv.axes(left + (cell_w - pw) / 2, top + cap_h + (0.04 if cap_h else 0), pw, ph)
        imshow(ax, rgb[i], interp)
    _draw_legend(cv, key_rows, MARGIN + title_h + rows * cell_h + (rows - 1) * row_gap + 0.1, note_lines)
    return finish(figure_to_png(cv.fig), path, sidecar)


LEGEND_ROW_H = 0.2  #: inch per row of legend swatches
_SWATCH = 0.12  #: inch


def _legend_item_w(name: str) -> float:
    return _SWATCH + 0.06 + len(name) * SMALL_PT * 0.6 / 72 + 0.2  # DejaVu Sans is ~0.6 em per character


def _legend_rows(items: Sequence[tuple[str, tuple[float, float, float]]], width: float) -> list[list[tuple[str, Any]]]:
    """Swatches flowed into rows that fit ``width`` inches."""
    rows: list[list[tuple[str, Any]]] = []
    used = width
    for name, rgb in items:
        if used + _legend_item_w(name) > width and (rows == [] or rows[-1]):
            rows.append([])
            used = 0.0
        rows[-1].append((name, rgb))
        used += _legend_item_w(name)
    return rows


def _draw_legend(cv: Canvas, rows: list[list[tuple[str, Any]]], top: float, note: Sequence[str]) -> None:
    for r, row in enumerate(rows):
        x = (cv.w - sum(_legend_item_w(name) for name, _ in row) + 0.2) / 2
        y = top + r * LEGEND_ROW_H
        for name, rgb in row:
            swatch = cv.axes(x, y, _SWATCH, _SWATCH)
            swatch.set_facecolor(tuple(float(v) for v in rgb))
            swatch.set_xticks([])
            swatch.set_yticks([])
            cv.text(x + _SWATCH + 0.06, y - 0.01, [name], SMALL_PT, ha="left", color=GRAY_TEXT)
            x += _legend_item_w(name)
    if note:
        cv.text(cv.w / 2, top + len(rows) * LEGEND_ROW_H + 0.02, note, SMALL_PT, color=GRAY_TEXT)

def grid_columns(count: int) -> int:
    return 8 if count >= 32 else max(1, math.ceil(math.sqrt(count)))

def tile_grid(
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

def tile_ticks(ax: Any, count: int, cols: int, th: int, tw: int, pad: int, x_labels: bool = True) -> None:
    """Label grid rows with the index of their first tile and columns with the offset."""
    rows = math.ceil(count / cols)
    ax.set_yticks([pad + r * (th + pad) + (th - 1) / 2 for r in range(rows)], [str(r * cols) for r in range(rows)])
    if x_labels and cols > 1:
        ax.set_xticks([pad + c * (tw + pad) + (tw - 1) / 2 for c in range(cols)], [f"+{c}" for c in range(cols)])
    else:
        ax.set_xticks([])
    ax.tick_params(labelsize=SMALL_PT, length=0, pad=1, colors=GRAY_TEXT)
    for spine in ax.spines.values():
        spine.set_visible(False)

def as_act(t: ArrayLike) -> torch.Tensor:
    a = as_tensor(t).float()
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
    cm = get_cmap(cmap)
    blocks: list[tuple[str, Any]] = []  # (kind, payload)
    if image is not None:
        blocks.append(("image", to_rgb(images01(image, mean, std))[0]))
    for name, tensor in acts.items():
        full = as_tensor(tensor)
        while full.ndim > 1 and full.shape[0] == 1 and full.ndim != 3:
            full = full[0]  # drop a batch of one, keep [C,h,w] / [C,1,1] as given
        blocks.append(("act", (name, as_act(tensor), tuple(full.shape))))
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
        gcols = grid_columns(shown)
        grid = tile_grid(tiles, gcols, pad)
        prepared.append(("grid", heading, grid, (shown, gcols, x.shape[-2], x.shape[-1])))

    heading_h = text_h(2, CAPTION_PT) + 0.06
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
    width = 2 * MARGIN + 0.3 + cols * block_width + (cols - 1) * col_gap
    title_lines = wrap(title, width - 2 * MARGIN, TITLE_PT, bold=True)
    note = "each map scaled to its own range" if scale == "channel" else "one colour scale per layer"
    note_lines = [f"{note} · colour map {cm.name} (dark = low, bright = high)"]
    title_h = text_h(len(title_lines), TITLE_PT) + text_h(1, SMALL_PT + 1) + 0.15 if title_lines else text_h(1, SMALL_PT + 1) + 0.1
    height = 2 * MARGIN + title_h + sum(row_h) + nrows * (heading_h + 0.12) + (nrows - 1) * row_gap

    cv = Canvas(width, height, dpi)
    cv.text(width / 2, MARGIN, title_lines, TITLE_PT, fontweight="bold")
    cv.text(width / 2, MARGIN + title_h - text_h(1, SMALL_PT + 1) - 0.08, note_lines, SMALL_PT + 1, color=GRAY_TEXT)
    top = MARGIN + title_h
    for r in range(nrows):
        for c in range(cols):
            i = r * cols + c
            if i >= len(prepared):
                break
            kind, heading, pix, info = prepared[i]
            bw, bh = sizes[i]
            left0 = MARGIN + 0.3 + c * (block_width + col_gap)
            cv.text(left0 + block_width / 2, top, heading[:1], CAPTION_PT, fontweight="bold")
            cv.text(left0 + block_width / 2, top + text_h(1, CAPTION_PT), heading[1:], CAPTION_PT - 1, color=GRAY_TEXT)
            atop = top + heading_h
            left = left0 + (block_width - bw) / 2
            ax = cv.axes(left, atop, bw, bh)
            if kind == "bars":
                vals = pix.numpy()
                ax.bar(np.arange(len(vals)), vals, width=0.85, color=cm(0.35))
                ax.axhline(0, color="black", linewidth=0.5)
                ax.set_xlim(-0.7, len(vals) - 0.3)
                ax.tick_params(labelsize=SMALL_PT, length=2, pad=1)
                ax.set_xlabel("channel", fontsize=SMALL_PT, labelpad=1)
                for side in ("top", "right"):
                    ax.spines[side].set_visible(False)
            elif kind == "image":
                imshow(ax, pix, interpolation(pix.shape[-2], pix.shape[-1], bh * dpi))
            else:
                shown, gcols, th, tw = info
                interp = "nearest" if bh * dpi >= pix.shape[-2] else "antialiased"
                ax.imshow(pix.permute(1, 2, 0).numpy(), interpolation=interp)
                tile_ticks(ax, shown, gcols, th, tw, pad, x_labels=gcols <= 16)
        top += row_h[r] + heading_h + 0.12 + row_gap
    return finish(figure_to_png(cv.fig), path, sidecar)
