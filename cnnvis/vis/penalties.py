"""Image priors for feature visualisation: total variation and L2 distance from grey, per image.

Both as in Lucid's ``objectives.total_variation`` (``tf.image.total_variation``, Rudin et al. 1992)
and ``objectives.L2`` (Olah et al. 2017, "Feature Visualization", Distill: "Regularization"), but
one value per image (``[N]``) so that a batch of images is a batch of independent problems.
"""

from __future__ import annotations

from torch import Tensor


def total_variation(images: Tensor) -> Tensor:
    """``[N]`` sum of absolute differences between vertical and horizontal neighbours of each
    ``[C, H, W]`` image: large for noise, small for smooth pictures with few edges."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).sum(dim=1)
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).sum(dim=1)
    return dy + dx


def l2_distance(images: Tensor, constant: float | Tensor = 0.5, epsilon: float = 1e-6) -> Tensor:
    """``[N]`` Euclidean distance ``sqrt(epsilon + sum (x - constant)^2)`` of each image from a flat
    grey one (``epsilon`` keeps the gradient finite at zero distance)."""
    return ((images - constant) ** 2).flatten(1).sum(dim=1).add(epsilon).sqrt()
