"""Convolution filters as pictures: a figure for ``visualize`` and a plain tile grid for TensorBoard.

Each filter is scaled by its largest magnitude, so mid-grey is 0, white positive, black negative
(in colour: each channel the same way).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

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
    text_h,
    wrap,
)
from cnnvis.plots.color import ArrayLike, as_tensor
from cnnvis.plots.grids import SEPARATOR, grid_columns, tile_grid, tile_ticks

FILTER_TILE = 24  #: side of one first-layer filter tile in the TensorBoard grid, pixels


def scaled_filters(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in, kh, kw]`` kernels in ``[0, 1]``: each filter divided by twice its max |w|, 0 at 0.5."""
    w = weight.detach().float()
    absmax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)
    return (w / (2 * absmax) + 0.5).clamp(0.0, 1.0)


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
    wt = as_tensor(weights).float()  # type: ignore[arg-type]
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
    w01 = scaled_filters(w)
    outs = f"{n_out}" if n_out == out_c else f"first {n_out} of {out_c}"
    if colour:
        grid = tile_grid(w01, grid_columns(n_out), pad)
        kind = f"{outs} filters, in colour (one tile per filter, RGB input)"
        legend = "each filter scaled to its max |w|; mid-grey = 0 (no response to that colour)"
    elif not matrix:
        grid = tile_grid(w01.expand(-1, 3, -1, -1), grid_columns(n_out), pad, SEPARATOR)
        kind = f"{outs} filters (one tile per filter, grey input)"
        legend = "each filter scaled to its max |w|: mid-grey = 0, white = positive, black = negative"
    else:
        tiles = w01.reshape(n_out * n_in, 1, kh, kw).expand(-1, 3, -1, -1)
        grid = tile_grid(tiles, n_in, pad, SEPARATOR)
        ins = f"{n_in}" if n_in == in_c else f"first {n_in} of {in_c}"
        kind = f"{outs} filters (rows) × {ins} input channels (columns)"
        legend = "each filter (row) scaled to its max |w|: mid-grey = 0, white = positive, black = negative"
    gcols = grid_columns(n_out) if not matrix else n_in
    gh, gw = grid.shape[-2], grid.shape[-1]
    # Long side: 4.5 in (several screen pixels per weight), more for big grids, at most max_size.
    side = min(max_size, max(4.5, max(gh, gw) / dpi))
    iw, ih = side * gw / max(gh, gw), side * gh / max(gh, gw)
    label_w = 0.55 if matrix else 0.35
    width = max(iw + 2 * label_w + 2 * MARGIN, 5.6)
    title_lines = wrap(title, width - 2 * MARGIN, TITLE_PT, bold=True)
    name_lines = wrap(f"{layer_name}  ·  weight [{shape}]", width - 2 * MARGIN, CAPTION_PT + 1)
    kind_lines = wrap(kind, width - 2 * MARGIN, CAPTION_PT)
    legend_lines = wrap(legend, width - 2 * MARGIN, SMALL_PT + 0.5)
    title_h = text_h(len(title_lines), TITLE_PT) + 0.1 if title_lines else 0.0
    name_h = text_h(len(name_lines), CAPTION_PT + 1)
    kind_h = text_h(len(kind_lines), CAPTION_PT)
    legend_h = text_h(len(legend_lines), SMALL_PT + 0.5)
    head_h = name_h + kind_h + legend_h + 0.12
    xlabel_h = 0.45 if matrix else 0.3
    height = 2 * MARGIN + title_h + head_h + ih + xlabel_h

    cv = Canvas(width, height, dpi)
    top = MARGIN
    cv.text(width / 2, top, title_lines, TITLE_PT, fontweight="bold")
    top += title_h
    cv.text(width / 2, top, name_lines, CAPTION_PT + 1, fontweight="bold")
    top += name_h
    cv.text(width / 2, top, kind_lines, CAPTION_PT)
    top += kind_h
    cv.text(width / 2, top, legend_lines, SMALL_PT + 0.5, color=GRAY_TEXT)
    ax = cv.axes((width - iw) / 2, MARGIN + title_h + head_h, iw, ih)
    interp = "nearest" if ih * dpi >= gh else "antialiased"
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation=interp)
    if matrix:
        tile_ticks(ax, n_out * n_in, gcols, kh, kw, pad, x_labels=False)
        ax.set_yticks([pad + r * (kh + pad) + (kh - 1) / 2 for r in range(n_out)], [str(r) for r in range(n_out)])
        step = 1 if n_in <= 16 else math.ceil(n_in / 16)
        ax.set_xticks([pad + c * (kw + pad) + (kw - 1) / 2 for c in range(0, n_in, step)], [str(c) for c in range(0, n_in, step)])
        ax.tick_params(labelsize=SMALL_PT)
        ax.set_ylabel("output filter", fontsize=SMALL_PT + 0.5, color=GRAY_TEXT, labelpad=2)
        ax.set_xlabel("input channel", fontsize=SMALL_PT + 0.5, color=GRAY_TEXT, labelpad=2)
    else:
        tile_ticks(ax, n_out, gcols, kh, kw, pad, x_labels=gcols <= 16)
        ax.tick_params(labelsize=SMALL_PT)
    return finish(figure_to_png(cv.fig), path, sidecar)


def filter_tiles(weight: torch.Tensor, max_filters: int = 64) -> torch.Tensor:
    """First-layer kernels ``[out, in, kh, kw]`` as one RGB ``[3, H, W]`` grid in ``[0, 1]`` (TensorBoard).

    Three input channels are shown in colour; one as grey; any other count as the mean over the
    inputs. Separators are blue-grey, not white or black, which would read as weights.
    """
    w = weight.detach()[:max_filters].float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)
    tiles = scaled_filters(w).expand(-1, 3, -1, -1)
    factor = max(1, FILTER_TILE // max(tiles.shape[-2:]))
    tiles = tiles.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    grid = make_grid(tiles, nrow=min(8, max(1, math.ceil(math.sqrt(tiles.shape[0])))), padding=2, pad_value=-1.0)
    separator = torch.tensor(SEPARATOR).view(3, 1, 1).expand_as(grid)
    return torch.where(grid < 0, separator, grid)
