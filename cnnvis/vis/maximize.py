"""Activation maximisation (Erhan et al. 2009, "Visualizing Higher-Layer Features of a Deep Network", sec. 3.1).

Gradient ascent on the input, x* = argmax_x h(x) subject to a norm constraint, from seeded Gaussian
noise, where ``h`` is a class logit or the mean activation of one channel of a layer. The
regularisers of Yosinski et al. 2015 ("Understanding Neural Networks Through Deep Visualization",
sec. 3) keep the images natural: L2 decay ``x <- (1 - l2) x`` (their r_theta = L2 decay), random
jitter (translate before each step), and a periodic Gaussian blur. Each image's gradient is
normalised by its mean absolute value, so the step size does not depend on the scale of the logits.
The seeded noise and jitter are shared by all targets, so an image does not depend on which other
targets were optimised in the same batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnnvis.errors import VisError
from cnnvis.vis import progress
from cnnvis.vis.hooks import capture
from cnnvis.vis.maps import gaussian_blur


def maximize(
    model: nn.Module,
    targets: int | Sequence[int] | Tensor,
    image_shape: tuple[int, int, int],
    *,
    layer: str | None = None,
    steps: int = 128,
    lr: float = 0.05,
    l2: float = 0.01,
    jitter: int = 2,
    blur_sigma: float = 0.5,
    blur_every: int = 4,
    init_std: float = 0.1,
    clamp: tuple[float, float] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Images ``[K, C, H, W]`` (normalised input space) that maximise each of the K ``targets``.

    Without ``layer`` a target is a class index and the objective its logit; with ``layer`` it is
    a channel index of that layer and the objective the channel's mean activation.
    ``lr`` is the step per pixel relative to the mean gradient, ``l2`` the weight decay per step.
    ``clamp=(lo, hi)`` keeps pixel values in the valid normalised range if you know it.
    """
    t = torch.as_tensor(targets).long().reshape(-1)
    if t.numel() == 0 or steps < 1 or len(image_shape) != 3:
        raise VisError("maximize needs at least one target, steps >= 1 and image_shape = (C, H, W)")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    k = t.numel()
    with capture(model, [] if layer is None else [layer], live=True) as cap:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        x = (torch.randn((1, *image_shape), generator=gen) * init_std).expand(k, *image_shape).to(device).clone()
        shifts = torch.randint(-jitter, jitter + 1, (steps, 2), generator=gen).tolist() if jitter > 0 else [[0, 0]] * steps
        t = t.to(device)
        for step, (dy, dx) in enumerate(shifts):
            x.requires_grad_(True)
            logits = model(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
            if layer is None:
                if t.max() >= logits.shape[1] or t.min() < 0:
                    raise VisError(f"class index out of range; the model has {logits.shape[1]} classes")
                objective = logits.gather(1, t[:, None]).squeeze(1)
            else:
                act = cap.value(layer)
                if act.ndim < 2 or t.max() >= act.shape[1] or t.min() < 0:
                    raise VisError(f"channel index out of range for layer {layer!r} with output {tuple(act.shape)}")
                objective = act[torch.arange(k, device=act.device), t].reshape(k, -1).mean(dim=1)
            (grad,) = torch.autograd.grad(objective.sum(), x)
            with torch.no_grad():
                scale = grad.abs().reshape(k, -1).mean(dim=1).view(k, 1, 1, 1)
                if step == 0 and bool((scale == 0).any()):
                    warnings.warn("maximize: the objective has zero gradient for some targets (e.g. a channel "
                                  "after a ReLU that is off everywhere); try the layer before the activation",
                                  stacklevel=2)
                x = (1 - l2) * x.detach() + lr * grad / scale.clamp(min=1e-12)
                if blur_every > 0 and (step + 1) % blur_every == 0:
                    x = gaussian_blur(x, blur_sigma, truncate=2.0)
                if clamp is not None:
                    x = x.clamp(*clamp)
            progress.advance(step + 1, steps)
    return x.detach()
