"""SmoothGrad (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise", eq. 3).

    M_hat(x) = 1/n sum_{i=1..n} M(x + N(0, sigma^2)),   sigma = noise * (x_max - x_min)

with ``M`` the (absolute, by default) input gradient. Noisy copies are evaluated in batches.
The same seeded noise draws are used for every image, so an image's map does not depend on
which batch it came in.
"""

from __future__ import annotations

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


def smoothgrad(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    samples: int = 25,
    noise: float = 0.15,
    absolute: bool = True,
    reduce: Reduce = "max",
    batch_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """SmoothGrad heatmaps ``[N, H, W]``.

    ``noise`` is sigma relative to each image's value range (the paper's 10-20 %); ``absolute``
    averages ``|grad|`` (Captum ``NoiseTunnel(Saliency(abs=True))``) instead of the signed gradient;
    ``reduce`` then combines channels (``None``: ``[N, C, H, W]``). ``batch_size`` caps noisy copies per pass.
    """
    check_images(model, images)
    model, images = gradient_copy(model, images)
    if samples < 1 or noise < 0:
        raise VisError(f"smoothgrad needs samples >= 1 and noise >= 0, got samples={samples}, noise={noise}")
    with model_state(model, grad=True):  # everything inside: also correct under a caller's inference_mode
        x = as_input(images, requires_grad=False)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        sigma = (noise * (flat.amax(dim=1) - flat.amin(dim=1))).view(n, 1, 1, 1)
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        eps = torch.randn((samples, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
        batch = batching_rule(x, batch_size, backward=True)
        total = torch.zeros_like(x)
        t = resolve_targets(targets, predict(model, x))
        for start in range(0, n * samples, batch):
            q = torch.arange(start, min(start + batch, n * samples), device=x.device)
            img, s = q // samples, q % samples
            g = grad_of_targets(model, x[img] + sigma[img] * eps[s], t[img])
            total.index_add_(0, img, g.abs() if absolute else g)
    return reduce_channels(total / samples, reduce)
