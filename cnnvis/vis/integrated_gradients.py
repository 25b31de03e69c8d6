"""Integrated Gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks", eq. 3).

    IG_i(x) = (x_i - x'_i) * sum_s w_s * dF(x' + a_s (x - x')) / dx_i

a numerical integral of the gradient along the straight path from the baseline ``x'``. The
nodes ``a_s`` and weights ``w_s`` are Captum's: Gauss-Legendre (default) or a Riemann rule. All
(step, image) pairs are evaluated in batches of ``batch_size``; results do not depend on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from cnnvis.errors import VisError
from cnnvis.vis.batching import batch_size as batching_rule
from cnnvis.vis.fused import gradient_copy
from cnnvis.vis.gradients import grad_of_targets
from cnnvis.vis.hooks import (
    Targets,
    as_input,
    check_images,
    model_state,
    predict,
    resolve_targets,
)
from cnnvis.vis.maps import Reduce, reduce_channels

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)`` on [0, 1] exactly as ``captum.attr._utils.approximation_methods``."""
    if method == "gausslegendre":
        if steps < 1:
            raise VisError("integrated gradients needs steps >= 1")
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    if method not in METHODS:
        raise VisError(f"unknown integration method {method!r}; choose one of {', '.join(METHODS)}")
    if steps < 2:
        raise VisError("Riemann integration needs steps >= 2")
    deltas = [1 / steps] * steps
    rule = method.split("_")[1]
    if rule == "trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
        alphas = torch.linspace(0, 1, steps)
    elif rule == "left":
        alphas = torch.linspace(0, 1 - 1 / steps, steps)
    elif rule == "middle":
        alphas = torch.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps)
    else:
        alphas = torch.linspace(1 / steps, 1, steps)
    return alphas.tolist(), deltas


def integrated_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    baseline: float | Tensor = 0.0,
    steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    reduce: Reduce = "sum",
) -> Tensor:
    """Integrated-gradients heatmaps ``[N, H, W]``; signed, summed over channels by default.

    ``baseline`` is a scalar or a tensor broadcastable to the images (normalised input space).
    ``reduce=None`` returns ``[N, C, H, W]`` attributions; they sum to about ``F(x) - F(x')``.
    """
    check_images(model, images)
    model, images = gradient_copy(model, images)
    alphas, weights = quadrature(method, steps)
    with model_state(model, grad=True):  # everything inside: also correct under a caller's inference_mode
        x = as_input(images, requires_grad=False)
        base = expand_baseline(baseline, x)
        t = resolve_targets(targets, predict(model, x))
        attributions = path_attributions(model, x, base, t, alphas, weights, batching_rule(x, batch_size, backward=True))
    return reduce_channels(attributions, reduce)


def expand_baseline(baseline: float | Tensor, x: Tensor) -> Tensor:
    """``baseline`` (a scalar or a tensor broadcastable to ``x``) as a tensor of ``x``'s shape."""
    try:
        return torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    except RuntimeError:
        raise VisError(f"baseline of shape {tuple(torch.as_tensor(baseline).shape)} does not broadcast to the "
                       f"images {tuple(x.shape)}") from None


def path_attributions(model: nn.Module, x: Tensor, base: Tensor, targets: Tensor, alphas: list[float],
                      weights: list[float], batch: int) -> Tensor:
    """``(x - base) * sum_s w_s dF(base + a_s (x - base))/dx`` ``[N, C, H, W]`` for resolved ``targets``,
    ``batch`` (step, image) pairs per pass; call inside ``model_state(model, grad=True)``."""
    a = torch.tensor(alphas, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    n, total_pairs = x.shape[0], x.shape[0] * len(alphas)
    total = torch.zeros_like(x)
    for start in range(0, total_pairs, batch):
        q = torch.arange(start, min(start + batch, total_pairs), device=x.device)
        s, img = q // n, q % n  # step-major order, like Captum
        path = base[img] + a[s] * (x[img] - base[img])
        total.index_add_(0, img, grad_of_targets(model, path, targets[img]) * w[s])
    return total * (x - base)
