"""The default-layer rule, applied to one probed forward pass (see :func:`cnnvis.vis.hooks.default_layer`).

:func:`~cnnvis.vis.hooks.default_layer` runs the model once with a hook on every module and hands
the calls, in the order they ended, to :func:`choose_layer`. Which output is a spatial map, channels
last or tokens is :mod:`cnnvis.vis.layouts`' call.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from cnnvis.errors import UnsupportedModelError
from cnnvis.vis.layouts import Layout, infer_layout

_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d)


def _is_flat_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and all(not any(True for _ in c.children()) for c in module.children())


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


@dataclass
class Call:
    """One module call seen by the probe: when it started and ended, what it got and gave."""

    name: str
    module: nn.Module
    start: int
    end: int = -1
    output: Tensor | None = None
    input_shape: tuple[int, ...] | None = None


def choose_layer(model: nn.Module, calls: list[Call], image: tuple[int, int]) -> str:
    """The default layer's name from ``calls`` (ended in this order) of ``model`` on one ``image``-sized input:
    the norm feeding the last attention run on tokens, else the last spatial map not made by pooling."""
    def layout(call: Call) -> Layout:
        return infer_layout(model, call.module, tuple(call.output.shape), 1, image)  # type: ignore[union-attr]

    outputs = [c for c in calls if c.output is not None]
    pooled = {id(c.output) for c in outputs if isinstance(c.module, _POOLING)}
    maps = [(c, layout(c)) for c in outputs if id(c.output) not in pooled]
    attention = [c for c in calls if _is_attention(c.module) and c.input_shape is not None
                 and (len(c.input_shape) == 3 or (len(c.input_shape) == 4 and infer_layout(
                     model, None, c.input_shape, None, image).kind == "channels_last"))]
    if attention:
        last = max(attention, key=lambda c: c.start)
        feeding = [c for c, lay in maps if c.end < last.start and lay.is_map]
        if feeding:
            return _outermost(feeding[-1], outputs)
    spatial = [(c, lay.map_shape()) for c, lay in maps if lay.kind == "channels_first" and len(lay.shape) == 4]
    found = [c for c, s in spatial if s[2] > 1 and s[3] > 1] or [c for c, _ in spatial]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} makes no spatial feature map [N, C, h, w] or token "
                                    f"grid for a {image[0]}x{image[1]} input; pass a layer name")
    return _outermost(found[-1], outputs)


def _outermost(call: Call, outputs: list[Call]) -> str:
    """Of the modules that returned ``call``'s tensor (a block, its last layer, an in-place ReLU),
    the last to finish that is not a flat Sequential of plain layers."""
    same = [c for c in outputs if c.output is call.output and not _is_flat_sequential(c.module)]
    return max(same, key=lambda c: c.end).name if same else call.name
