"""Feature maps of chosen layers (what each conv channel responds to in a given image)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cnnvis.vis.hooks import (
    _ELEMENTWISE,
    as_input,
    capture,
    check_images,
    default_layer,
)


def activations(model: nn.Module, images: Tensor, layers: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """Outputs of ``layers`` (default: :func:`~cnnvis.vis.hooks.default_layer`) for ``images``.

    Returns ``{layer name: Tensor[N, C, h, w]}`` (a transformer's tokens on their patch grid, other
    shapes as the layer produces them; see :mod:`cnnvis.vis.layouts`), detached and
    on the input's device. Values are snapshots taken when the layer ran, so a later in-place op
    (e.g. ``ReLU(inplace=True)`` after a BatchNorm layer) does not alter them.
    """
    check_images(model, images)
    names = [default_layer(model, images)] if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    with capture(model, names) as cap:
        model(as_input(images, requires_grad=False))
        return {name: cap.value(name) for name in names}


def _is_conv(module: nn.Module) -> bool:
    """A 2-D convolution, or what is left of one in a ``torch.export`` program (a leaf module whose
    ``weight`` is 4-D): the program keeps the module tree but not the module types."""
    if isinstance(module, nn.Conv2d):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 4 and not any(True for _ in module.children())


def _after_elementwise(items: list[tuple[str, nn.Module]], i: int) -> str:
    """The last of the element-wise modules (BatchNorm, ReLU ...) right after ``items[i]``, looking
    past a pooling layer that sits between the conv and them (conv, pool, BN, ReLU)."""
    pooled = i + 2 < len(items) and isinstance(items[i + 1][1], (nn.MaxPool2d, nn.AvgPool2d))
    if pooled and isinstance(items[i + 2][1], _ELEMENTWISE):
        i += 1
    while i + 1 < len(items) and isinstance(items[i + 1][1], _ELEMENTWISE):
        i += 1
    return items[i][0]


def stage_layers(model: nn.Module, limit: int = 8, *, images: Tensor | None = None) -> list[str]:
    """Layers worth showing side by side, shallow to deep: the activation after every conv of a
    flat conv stack (``features.2, features.6, ...`` for ``mnist_cnn``), or for a network built of
    blocks (a ResNet) each top-level child that holds a conv (``relu, layer1 ... layer4``), then the
    :func:`~cnnvis.vis.hooks.default_layer` for ``images`` unless one of those holds it (a
    transformer: its patch embedding, then its last block's norm). At most ``limit``; the deepest
    ones are kept."""
    names: list[str] = []
    children = list(model.named_children())
    for i, (child_name, child) in enumerate(children):
        if _is_conv(child):
            names.append(_after_elementwise(children, i))
        elif isinstance(child, nn.Sequential) and all(len(list(m.children())) == 0 for m in child):
            items = list(child.named_children())
            names += [f"{child_name}.{_after_elementwise(items, j)}" for j, (_, m) in enumerate(items) if _is_conv(m)]
        elif any(_is_conv(m) for m in child.modules()):
            names.append(child_name)
    last = default_layer(model, images)
    if not any(last == n or last.startswith(n + ".") for n in names):
        names.append(last)
    return names[-limit:]
