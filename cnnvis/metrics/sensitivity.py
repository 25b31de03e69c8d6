"""Max-sensitivity (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations", NeurIPS,
sec. 4): how much can a map change when the input barely does?

Each image gets ``samples`` copies with uniform noise from ``[-radius, radius]`` on every input
value (the model's normalised units), each copy is explained for the *same* target class, and the
score is the largest relative change ``||map(x + d) - map(x)||_F / ||map(x)||_F`` over the copies
(a zero map divides by 1) -- Captum's ``sensitivity_max`` with its default perturbation and norm.
Lower is better: a map that swings on invisible noise is fragile (Ghorbani et al. 2019). It is no
faithfulness score -- a map that ignores the input scores a perfect 0 -- so read it next to them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnvis.errors import ConfigError
from cnnvis.metrics.randomization import ExplainFn

DEFAULT_RADIUS = 0.02  #: Captum's default L-infinity radius
DEFAULT_SAMPLES = 10  #: Captum's default number of perturbed copies per image


def perturbations(images: Tensor, samples: int, radius: float = DEFAULT_RADIUS, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise ``[N * samples, C, H, W]`` in ``[-radius, radius]``, image-major (the copies
    of image 0 first, as Captum's ``repeat_interleave``); drawn on the CPU from ``generator`` so a
    seed gives the same noise on every device."""
    if samples < 1:
        raise ConfigError(f"sensitivity samples must be at least 1, got {samples}")
    if radius < 0:
        raise ConfigError(f"sensitivity radius must be 0 or more, got {radius}")
    shape = (images.shape[0] * samples, *images.shape[1:])
    noise = torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * radius) - radius
    return noise.to(images.device, images.dtype)


def max_sensitivity(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    explain: ExplainFn,
    *,
    samples: int = DEFAULT_SAMPLES,
    radius: float = DEFAULT_RADIUS,
    generator: torch.Generator | None = None,
    maps: Tensor | None = None,
    noise: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Max-sensitivity per image ``[N]`` of ``explain`` (an :data:`~cnnvis.metrics.randomization.ExplainFn`).

    ``maps``: the unperturbed maps when already computed; ``noise``: the perturbations
    (``[N * samples, ...]``, default :func:`perturbations`). The perturbed copies are explained
    ``chunk`` images at a time (default: all ``N * samples`` in one call; the method batches inside).
    """
    n = images.shape[0]
    if noise is None:
        noise = perturbations(images, samples, radius, generator)
    elif noise.shape[0] != n * samples or noise.shape[1:] != images.shape[1:]:
        raise ConfigError(f"sensitivity noise must be [{n * samples}, {', '.join(map(str, images.shape[1:]))}], "
                          f"got {list(noise.shape)}")
    if maps is None:
        maps = explain(model, images, targets)
    base = maps.reshape(n, -1).float()
    norm = base.norm(dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    perturbed = images.repeat_interleave(samples, dim=0) + noise
    repeated = targets.repeat_interleave(samples, dim=0)
    step = chunk or perturbed.shape[0]
    worst = []
    for first in range(0, perturbed.shape[0], step):
        found = explain(model, perturbed[first : first + step], repeated[first : first + step]).reshape(-1, base.shape[1]).float()
        owner = torch.arange(first, first + found.shape[0], device=base.device) // samples
        worst.append((found - base[owner]).norm(dim=1) / norm[owner])
    return torch.cat(worst).view(n, samples).max(dim=1).values
