"""The noise tunnel: any gradient method averaged over noisy copies of the image.

    SmoothGrad     (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise", eq. 3):
                   M_hat(x) = 1/n sum_i A(x + e_i)
    SmoothGrad-Sq  (Hooker et al. 2019, "A Benchmark for Interpretability Methods in Deep Neural
                   Networks"): 1/n sum_i A(x + e_i)^2
    VarGrad        (Adebayo et al. 2018, "Local Explanation Methods for Deep Neural Networks Lack
                   Sensitivity to Parameter Values"): 1/n sum_i A(x + e_i)^2 - M_hat(x)^2

with ``e_i ~ N(0, sigma^2)``, ``sigma = noise * (x_max - x_min)`` per image, and ``A`` the base
attribution chosen by ``over``: ``saliency`` (the input gradient), ``input-x-gradient``,
``guided-backprop``, ``deconvnet`` or ``integrated-gradients``. ``absolute=True`` takes ``|A|``
of each sample first (SmoothGrad's default here, as Captum's ``Saliency(abs=True)`` does).

The noise is seeded: ``samples`` draws ``eps_i ~ N(0, 1)`` of one image's shape from a CPU
``torch.Generator`` seeded with ``seed`` (the same on every device), scaled by each image's own sigma, so an image's map does
not depend on which other images share its batch. Noisy copies (times the integration steps, for
integrated gradients) go through the model in batches of the one batching rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Literal

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
from cnnvis.vis.integrated_gradients import (
    expand_baseline,
    path_attributions,
    quadrature,
)
from cnnvis.vis.maps import Reduce, reduce_channels
from cnnvis.vis.progress import advance
from cnnvis.vis.rectifier_rules import check_rule_applied, rectifier_rule

Over = Literal["saliency", "input-x-gradient", "guided-backprop", "deconvnet", "integrated-gradients"]
Tunnel = Literal["smoothgrad", "smoothgrad-sq", "vargrad"]
#: the base methods and the parameters each accepts in ``over_params`` (with their defaults)
OVER: Mapping[str, Mapping[str, Any]] = {
    "saliency": {}, "input-x-gradient": {}, "guided-backprop": {}, "deconvnet": {},
    "integrated-gradients": {"steps": 50, "baseline": 0.0, "method": "gausslegendre"},
}
_RULES = {"guided-backprop": "guided", "deconvnet": "deconvnet"}


def noise_tunnel(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    tunnel: Tunnel = "smoothgrad",
    samples: int = 25,
    noise: float = 0.15,
    over: Over = "saliency",
    over_params: Mapping[str, Any] | None = None,
    absolute: bool = False,
    reduce: Reduce = "max",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """``tunnel`` (``smoothgrad``: mean, ``smoothgrad-sq``: mean square, ``vargrad``: variance) of the
    ``over`` attributions of ``samples`` noisy copies per image, reduced over channels to ``[N, H, W]``
    (``reduce=None``: ``[N, C, H, W]``; = Captum ``NoiseTunnel`` with the same noise).

    ``noise`` is sigma relative to each image's value range (the paper's 10-20 %); ``over_params``
    passes the base method's own parameters (integrated gradients: ``steps``, ``baseline``,
    ``method``); ``batch_size`` caps model inputs per pass (noisy copies x integration steps).
    """
    check_images(model, images)
    if tunnel not in ("smoothgrad", "smoothgrad-sq", "vargrad"):
        raise VisError(f"tunnel must be smoothgrad, smoothgrad-sq or vargrad, got {tunnel!r}")
    if over not in OVER:
        raise VisError(f"{tunnel} over {over!r}: choose one of {', '.join(OVER)}")
    params = dict(over_params or {})
    unknown = sorted(set(params) - set(OVER[over]))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in OVER[over].items()) or "none"
        raise VisError(f"{tunnel} over {over} does not take {', '.join(unknown)}; its parameters: {valid}")
    if samples < 1 or noise < 0:
        raise VisError(f"{tunnel} needs samples >= 1 and noise >= 0, got samples={samples}, noise={noise}")
    params = {**OVER[over], **params}
    alphas, weights = quadrature(params["method"], params["steps"]) if over == "integrated-gradients" else ([1.0], [1.0])
    model, images = gradient_copy(model, images)  # made before a rectifier rule is on
    rule = _RULES.get(over)
    with model_state(model, grad=True), (rectifier_rule(rule) if rule else nullcontext()) as mode:
        x = as_input(images, requires_grad=False)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        sigma = (noise * (flat.amax(dim=1) - flat.amin(dim=1))).view(n, 1, 1, 1)
        # drawn on the CPU whatever the device: a seed gives the same noise, and the same maps, on a GPU
        gen = torch.Generator().manual_seed(int(seed))
        eps = torch.randn((samples, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device)
        t = resolve_targets(targets, predict(model, x))
        if mode is not None:  # after one forward pass: refuse or warn before the long part
            check_rule_applied(mode, model)
        base = expand_baseline(params["baseline"], x) if over == "integrated-gradients" else None
        batch = batching_rule(x, batch_size, backward=True)
        copies = max(1, batch // len(alphas))  # noisy copies per chunk; each brings its integration steps
        total = torch.zeros_like(x)
        total_sq = torch.zeros_like(x) if tunnel != "smoothgrad" else None
        for start in range(0, n * samples, copies):
            end = min(start + copies, n * samples)
            q = torch.arange(start, end, device=x.device)
            img, s = q // samples, q % samples
            z = x[img] + sigma[img] * eps[s]
            if base is not None:
                a = path_attributions(model, z, base[img], t[img], alphas, weights, batch)
            else:
                a = grad_of_targets(model, z, t[img])
                if over == "input-x-gradient":
                    a = a * z
            if absolute:
                a = a.abs()
            total.index_add_(0, img, a)
            if total_sq is not None:
                total_sq.index_add_(0, img, a * a)
            advance(end, n * samples)
    mean = total / samples
    if tunnel == "smoothgrad":
        out = mean
    elif tunnel == "smoothgrad-sq":
        out = total_sq / samples
    else:  # E[A^2] - E[A]^2 as Captum; clamped: rounding must not make a variance negative
        out = (total_sq / samples - mean * mean).clamp_(min=0)
    return reduce_channels(out, reduce)


def smoothgrad(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    samples: int = 25,
    noise: float = 0.15,
    over: Over = "saliency",
    over_params: Mapping[str, Any] | None = None,
    absolute: bool = True,
    reduce: Reduce = "max",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """SmoothGrad heatmaps ``[N, H, W]``: the mean ``over`` attribution of noisy copies.

    By default the mean absolute input gradient (Captum ``NoiseTunnel(Saliency(abs=True))``), max
    over channels. For a signed map over a signed method pass ``absolute=False, reduce="sum"``
    (``over="integrated-gradients"``, ``"input-x-gradient"``). Parameters: :func:`noise_tunnel`.
    """
    return noise_tunnel(model, images, targets, tunnel="smoothgrad", samples=samples, noise=noise, over=over,
                        over_params=over_params, absolute=absolute, reduce=reduce, batch_size=batch_size, seed=seed)


def smoothgrad_sq(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    samples: int = 25,
    noise: float = 0.15,
    over: Over = "saliency",
    over_params: Mapping[str, Any] | None = None,
    absolute: bool = False,
    reduce: Reduce = "max",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """SmoothGrad-Squared heatmaps ``[N, H, W]``: the mean squared ``over`` attribution of noisy
    copies (non-negative; Captum ``NoiseTunnel`` ``nt_type="smoothgrad_sq"``). Parameters: :func:`noise_tunnel`."""
    return noise_tunnel(model, images, targets, tunnel="smoothgrad-sq", samples=samples, noise=noise, over=over,
                        over_params=over_params, absolute=absolute, reduce=reduce, batch_size=batch_size, seed=seed)


def vargrad(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    samples: int = 25,
    noise: float = 0.15,
    over: Over = "saliency",
    over_params: Mapping[str, Any] | None = None,
    absolute: bool = False,
    reduce: Reduce = "max",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """VarGrad heatmaps ``[N, H, W]``: the variance of the signed ``over`` attribution over noisy
    copies (non-negative; Captum ``NoiseTunnel`` ``nt_type="vargrad"``). Parameters: :func:`noise_tunnel`."""
    return noise_tunnel(model, images, targets, tunnel="vargrad", samples=samples, noise=noise, over=over,
                        over_params=over_params, absolute=absolute, reduce=reduce, batch_size=batch_size, seed=seed)
