"""Class Activation Mapping (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization").

For a network ending in global average pooling and one linear layer,
``Y^c = sum_k w_k^c * mean_xy f_k(x, y) + b_c``, so the class activation map

    M_c(x, y) = sum_k w_k^c f_k(x, y)                                       (eq. 2)

satisfies ``mean_xy M_c + b_c = Y^c`` exactly. ``f`` is the input of the last
``nn.AdaptiveAvgPool2d`` (read with a forward pre-hook), ``w`` the weights of the head linear layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.errors import UnsupportedModelError, VisError
from cnnvis.vis.aug_smooth import cam_maps
from cnnvis.vis.cam_base import weighted_map
from cnnvis.vis.hooks import Targets, as_input, capture, check_images, resolve_targets

_PASSTHROUGH = (nn.Dropout, nn.Flatten, nn.Identity)


def gap_and_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name of the last global AdaptiveAvgPool2d, the head nn.Linear)``, or UnsupportedModelError."""
    pools = [n for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)
             and m.output_size in (1, (1, 1))]
    head = next((getattr(model, a) for a in ("fc", "classifier") if isinstance(getattr(model, a, None), nn.Module)), None)
    if isinstance(head, nn.Sequential):
        linears = [m for m in head if isinstance(m, nn.Linear)]
        others = [m for m in head if not isinstance(m, (nn.Linear, *_PASSTHROUGH))]
        head = linears[0] if len(linears) == 1 and not others else None
    if not pools or not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"CAM needs a model ending in global average pooling (nn.AdaptiveAvgPool2d(1)) and one linear layer "
            f"(model.fc or model.classifier); {type(model).__name__} is not one. Use 'gradcam' instead."
        )
    return pools[-1], head


def cam(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    relu: bool = False,
    upsample: bool = True,
    aug_smooth: bool = False,
) -> Tensor:
    """Class activation maps ``[N, H, W]`` (raw, signed unless ``relu=True``; ``upsample=False``: GAP-input size;
    ``aug_smooth``: see :mod:`~cnnvis.vis.aug_smooth`)."""
    return cam_maps(lambda x, t: _cam(model, x, t, relu, upsample), model, images, targets, aug_smooth)


def _cam(model: nn.Module, images: Tensor, targets: Targets, relu: bool, upsample: bool) -> Tensor:
    check_images(model, images)
    pool, head = gap_and_head(model)
    with capture(model, pool, where="input") as cap:
        logits = model(as_input(images, requires_grad=False))
        t = resolve_targets(targets, logits)
        feats = cap.value(pool)
    if feats.ndim != 4 or feats.shape[1] != head.in_features:
        raise VisError(f"the input of {pool!r} has shape {tuple(feats.shape)}, which does not fit the head "
                       f"linear layer ({head.in_features} inputs); CAM does not apply. Use 'gradcam' instead.")
    weights = head.weight.detach()[t]
    return weighted_map(feats, weights.to(feats.dtype), relu, tuple(images.shape[-2:]) if upsample else None)
