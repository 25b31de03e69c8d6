"""What every picture shares: the ``PNG`` type, a canvas laid out in inches, text sizes, wrapping,
captions, rendering a figure to PNG or to a tensor, and writing a PNG with its JSON sidecar.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly -- never
``pyplot`` -- so rendering needs no display, leaks no global state and can run in worker threads.
"""

from __future__ import annotations

import io
import os
import re
import struct
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

from cnnvis.errors import CnnvisError
from cnnvis.io import atomic_write, json_text

# Text sizes (points) and spacing (inches) shared by all figures.
TITLE_PT = 13.0
CAPTION_PT = 9.5
HEADER_PT = 8.0
SMALL_PT = 7.0
PT = 1.0 / 72.0  # inch per point
LINE = 1.3  # line height as a multiple of the font size
MARGIN = 0.15  # outer margin, inch
GRAY_TEXT = "#444444"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_TO_PATH = TextToPath()


class PNG(bytes):
    """PNG file contents. Displays itself in Jupyter; ``width``/``height`` read the header."""

    def _repr_png_(self) -> bytes:
        return bytes(self)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        if self[:8] != PNG_SIGNATURE or len(self) < 24:
            raise ValueError("not PNG data")
        width, height = struct.unpack(">II", self[16:24])
        return int(width), int(height)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

def count(n: int, noun: str) -> str:
    """``1 image``, ``8 images``, ``5 classes``: a number with its noun in the right number."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "x", "ch", "sh")) else f"{n} {noun}s"


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

_NBSP = "\u00a0"  # textwrap breaks only at ASCII whitespace
_SHORT_GROUP = re.compile(r"\([^()]{1,28}\)")


def text_width_in(text: str, pt: float, bold: bool = False) -> float:
    """Width of ``text`` in inches as matplotlib draws it (its default font, ``pt`` points)."""
    prop = FontProperties(size=pt, weight="bold" if bold else "normal")
    width, _, _ = _TEXT_TO_PATH.get_text_width_height_descent(text.replace(_NBSP, " "), prop, ismath=False)
    return width * PT


def wrap(text: str | None, width_in: float, pt: float, bold: bool = False) -> list[str]:
    """Wrap ``text`` at word boundaries so that each line fits ``width_in`` inches at ``pt``
    points, measured in the font it is drawn in; a short parenthesised phrase, such as
    ``(epoch 12)`` or ``(Selvaraju et al. 2017)``, stays on one line."""
    if not text:
        return []
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        kept = _SHORT_GROUP.sub(lambda m: m.group(0).replace(" ", _NBSP), para)
        chars = max(8, int(width_in / (0.5 * pt * PT)))  # a first guess, then shortened until it fits
        while True:
            found = textwrap.wrap(kept, chars, break_on_hyphens=False) or [""]
            if chars <= 8 or all(text_width_in(line, pt, bold) <= width_in for line in found):
                break
            chars -= 1
        lines.extend(line.replace(_NBSP, " ") for line in found)
    return lines

def text_h(lines: int, pt: float) -> float:
    return lines * pt * LINE * PT

class Canvas:
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
                linespacing=LINE, **kw,
            )

def figure_to_png(fig: Figure, dpi: float | None = None, close: bool = True) -> PNG:
    """Render a figure to PNG bytes; with ``close`` (default) the figure is released afterwards
    (from pyplot's registry too, if it was made there)."""
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
    # Not fig.clear(): it rebuilds every axis's ticks first (0.8 s for a 32-image grid). A figure
    # made here is referenced by nothing else and is freed with its images once dropped.
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

def finish(png: PNG, path: str | os.PathLike[str] | None, sidecar: Mapping[str, Any] | None) -> PNG:
    if path is not None:
        save_png(png, path, sidecar)
    return png

def hide(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)

def imshow(ax: Any, rgb: torch.Tensor, interpolation: str) -> None:
    """Show an RGB ``[3,H,W]`` float tensor in ``[0, 1]`` without axes."""
    ax.imshow(rgb.permute(1, 2, 0).numpy(), interpolation=interpolation, vmin=0, vmax=1)
    hide(ax)

def interpolation(h: int, w: int, shown_px: float) -> str:
    """Nearest for small images blown up (crisp digits), antialiased otherwise."""
    return "nearest" if shown_px >= 1.5 * max(h, w) else "antialiased"

def panel_size_in(h: int, w: int, dpi: float, panel: float | None, small: float, large: float) -> tuple[float, float]:
    """Panel (width, height) in inches: small images blown up to ``small``, big ones near 1:1."""
    side = panel if panel is not None else min(large, max(small, max(h, w) / dpi))
    return side * w / max(h, w), side * h / max(h, w)

def fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def tensor_to_png(image: torch.Tensor) -> PNG:
    """``uint8 [3, H, W]`` pixels as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return PNG(buffer.getvalue())


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
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("save_png needs a Figure or PNG bytes")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, data)
        if sidecar is not None:
            atomic_write(p.with_suffix(".json"), (json_text(dict(sidecar)) + "\n").encode("utf-8"))
    except OSError as exc:
        raise CnnvisError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p
