"""Feature maps of chosen layers (what each conv channel responds to in a given image)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cnnvis.vis.hooks import as_input, capture, check_images, default_layer


def activations(model: nn.Module, images: Tensor, layers: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """Outputs of ``layers`` (default: :func:`~cnnvis.vis.hooks.default_layer`) for ``images``.

    Returns ``{layer name: Tensor[N, C, h, w]}`` (whatever shape the layer produces), detached and
    on the input's device. Values are snapshots taken when the layer ran, so a later in-place op
    (e.g. ``ReLU(inplace=True)`` after a BatchNorm layer) does not alter them.
    """
    check_images(model, images)
    names = [default_layer(model)] if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    with capture(model, names) as cap:
        model(as_input(images, requires_grad=False))
        return {name: cap.value(name) for name in names}
