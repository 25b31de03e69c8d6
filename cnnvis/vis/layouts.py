"""How a layer's output becomes a map ``[N, C, h, w]``: channels first, channels last, or tokens.

CNN layers already give ``[N, C, h, w]``. Vision transformers do not:

* ViT / DeiT blocks give tokens ``[N, P + h*w, C]``: ``P`` prefix tokens (the class token, DeiT's
  distillation token, register tokens) and then the patches row by row;
* Swin blocks (torchvision and timm) give channels-last maps ``[N, h, w, C]``.

pytorch-grad-cam asks its users for a ``reshape_transform`` that turns such outputs into maps
(drop the class token, reshape to the patch grid, move channels first). Here it is inferred once per
layer and forward pass from the output shape, the input image size and what the model declares
(timm's ``num_prefix_tokens``, torchvision ViT's ``class_token``), and applied to the layer's value
*and* its gradient by :func:`cnnvis.vis.hooks.capture`, so every method that reads a layer gets maps.

Rules (``image`` is the model input's ``H x W``):

* 4-D ``[N, a, b, c]``: channels last if ``a x b`` is the image at one stride on both axes (up to
  rounding) and fits its aspect better than ``b x c`` does, else channels first; when both fit as well (a square image and
  ``a == b == c``) the layer decides: a ``LayerNorm`` or ``Linear`` over the last dimension makes it
  channels last.
* 3-D ``[N, T, C]`` (batch first, channels last, prefix tokens first): ``T - P`` patch tokens must
  form a grid with the image's aspect; ``P`` is the model's declared prefix count, else the smallest
  ``P <= 16`` for which they do. A square count is required when the image size is unknown.
* Anything else (``[N, K]`` logits, tokens with no grid) stays as it is, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Kind = Literal["channels_first", "channels_last", "tokens", "other"]
MAX_PREFIX = 16  #: prefix tokens tried when the model does not declare its count (class + distillation + registers)


@dataclass(frozen=True)
class Layout:
    """How one layer output of ``shape`` reads as ``[N, C, h, w]``; ``reason`` says why not for ``other``."""

    kind: Kind
    shape: tuple[int, ...]
    prefix: int = 0
    grid: tuple[int, int] | None = None
    reason: str = ""

    @property
    def is_map(self) -> bool:
        return self.kind != "other"

    def to_map(self, x: Tensor) -> Tensor:
        """``x`` (this layer's output or its gradient) as ``[N, C, h, w]``; unchanged for ``other``."""
        if self.kind == "channels_last":
            return x.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            assert self.grid is not None
            h, w = self.grid
            return x[:, self.prefix:].reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
        return x

    def from_map(self, maps: Tensor, like: Tensor) -> Tensor:
        """``[B, C, h, w]`` maps back in this layer's own layout (what its next module reads); ``like``
        is an output of the layer (batch 1 or B) whose prefix tokens are kept for every map."""
        if self.kind == "channels_last":
            return maps.permute(0, 2, 3, 1)
        if self.kind == "tokens":
            b, c = maps.shape[:2]
            grid = maps.permute(0, 2, 3, 1).reshape(b, -1, c)
            return torch.cat([like[:, :self.prefix].expand(b, -1, -1), grid], dim=1)
        return maps

    def map_shape(self) -> tuple[int, ...]:
        """The ``[N, C, h, w]`` shape :meth:`to_map` gives (the raw shape for ``other``)."""
        if self.kind == "channels_last":
            n, h, w, c = self.shape
            return (n, c, h, w)
        if self.kind == "tokens":
            assert self.grid is not None
            return (self.shape[0], self.shape[-1], *self.grid)
        return self.shape


def _stride_mismatch(h: int, w: int, image: tuple[int, int]) -> float:
    """How far ``h x w`` is from the image's aspect (0: exactly), or inf when no one stride gives
    ``h`` rows and ``w`` columns of the image, rounding up or down (padded and strided layers do)."""
    if h < 1 or w < 1:
        return math.inf
    (rows, cols), inf = image, math.inf
    lowest = max(rows / (h + 1), cols / (w + 1))
    highest = min(rows / (h - 1) if h > 1 else inf, cols / (w - 1) if w > 1 else inf)
    return abs(math.log(rows * w / (cols * h))) if lowest < highest else inf


def _same_stride(h: int, w: int, image: tuple[int, int]) -> bool:
    """``h x w`` is the image downsampled (or upsampled) by about the same factor on both axes."""
    return _stride_mismatch(h, w, image) < math.inf


def _last_dim_is_channels(module: nn.Module | None, channels: int) -> bool:
    """Layers that work on the last dimension: a LayerNorm over it, a Linear producing it."""
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape) == (channels,)
    return isinstance(module, nn.Linear) and module.out_features == channels


def declared_prefix(model: nn.Module) -> int | None:
    """Prefix tokens the model declares: timm's ``num_prefix_tokens``, torchvision ViT's class token."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    if isinstance(getattr(model, "class_token", None), Tensor):  # torchvision VisionTransformer
        return 1
    return None


def _grid(count: int, image: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(h, w)`` with ``h * w == count`` and the image's aspect (square when the image is unknown)."""
    if count < 1:
        return None
    if image is None or image[0] == image[1]:
        side = math.isqrt(count)
        return (side, side) if side * side == count else None
    # the grid whose aspect is nearest the image's, if it is near enough
    pairs = [(h, count // h) for h in range(1, count + 1) if count % h == 0]
    h, w = min(pairs, key=lambda p: abs(math.log(p[0] * image[1] / (p[1] * image[0]))))
    return (h, w) if _same_stride(h, w, image) else None


def infer_layout(
    model: nn.Module,
    module: nn.Module | None,
    shape: tuple[int, ...],
    batch: int | None,
    image: tuple[int, int] | None,
) -> Layout:
    """The :class:`Layout` of ``module``'s output ``shape`` when ``model`` ran on ``batch`` images of ``image`` size."""
    shape = tuple(int(s) for s in shape)
    if batch is not None and (not shape or shape[0] != batch):
        return Layout("other", shape, reason=f"its first dimension is not the batch of {batch}")
    if len(shape) == 4:
        _, a, b, c = shape
        by_layer = _last_dim_is_channels(module, c)
        if image is None:
            return Layout("channels_last" if by_layer else "channels_first", shape)
        first, last = _stride_mismatch(b, c, image), _stride_mismatch(a, b, image)
        if last < first or (last == first < math.inf and by_layer):
            return Layout("channels_last", shape)
        return Layout("channels_first", shape)
    if len(shape) == 3:
        tokens = shape[1]
        known = declared_prefix(model)
        for prefix in [known] if known is not None else range(min(MAX_PREFIX, tokens - 1) + 1):
            grid = _grid(tokens - prefix, image)
            if grid is not None:
                return Layout("tokens", shape, prefix=prefix, grid=grid)
        aspect = "a square" if image is None or image[0] == image[1] else f"a {image[0]}:{image[1]}"
        prefixes = f"{known} prefix token(s)" if known is not None else f"0 to {MAX_PREFIX} prefix tokens"
        return Layout("other", shape, reason=f"its {tokens} tokens minus {prefixes} do not form {aspect} grid")
    return Layout("other", shape)
