"""Convolution weights of a layer (first-layer filters are the classic picture)."""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.errors import UnsupportedModelError
from cnnvis.vis.hooks import get_layer


def first_conv(model: nn.Module) -> str:
    """Name of the first ``nn.Conv2d`` in registration order (the default for :func:`filters`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise UnsupportedModelError(f"{type(model).__name__} has no nn.Conv2d layer")


def filters(model: nn.Module, layer: str | None = None) -> Tensor:
    """A detached copy of the conv weights of ``layer`` (default: the first conv), ``[out, in, kh, kw]``.

    Whether to show them in colour (``in == 3``) or one tile per input channel is the renderer's call.
    """
    name = first_conv(model) if layer is None else layer
    module = get_layer(model, name)
    if not isinstance(module, nn.Conv2d):
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        raise UnsupportedModelError(
            f"layer {name!r} is a {type(module).__name__}, not a Conv2d; conv layers: {', '.join(convs)}"
        )
    return module.weight.detach().clone()
