"""Transformation robustness for feature visualisation (Olah et al. 2017, "Feature Visualization",
Distill, section "Transformation Robustness"; Lucid's / lucent's ``transform.standard_transforms``).

An image that excites a neuron only at one exact alignment is mostly adversarial noise. Moving it a
little at every optimisation step -- pad, random translation (jitter), random scale, random
rotation -- keeps only the patterns that excite the neuron wherever they are. Here all of these are
one affine warp per step (``F.affine_grid`` + ``F.grid_sample``, bilinear, differentiable), drawn
from a seeded CPU generator before the loop and applied to the whole batch: every image of a batch
sees the same transformation, so a result does not depend on which images were optimised with it.
Areas the warp uncovers are filled with ``fill`` (Lucid pads with grey).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Transforms:
    """How much each step may move the image (Lucid's standard transforms, in these units).

    ``pad``: grey border added on each side (the model sees ``H + 2 pad`` x ``W + 2 pad``);
    ``jitter``: largest translation in pixels, each axis, integer; ``scale``: the zoom is drawn
    from ``[1 - scale, 1 + scale]``; ``rotate``: the angle from ``[-rotate, rotate]`` degrees.
    """

    pad: int = 0
    jitter: int = 0
    scale: float = 0.0
    rotate: float = 0.0

    @classmethod
    def standard(cls, height: int, width: int) -> Transforms:
        """Lucid's recipe (pad 12, jitter 8 then 4, scale 0.9-1.1, rotate +-10 degrees at 224 px),
        with pad and jitter in proportion to the image: 1/16 and 1/12 of its shorter side
        (6 and 8 px at 96 px, 14 and 18 px at 224 px)."""
        side = min(height, width)
        return cls(pad=max(1, side // 16), jitter=max(1, side // 12), scale=0.1, rotate=10.0)


def sample(transforms: Transforms, steps: int, generator: torch.Generator) -> Tensor:
    """``[steps, 4]`` float64 draws (dy, dx, zoom, angle in radians), one row per step, on the CPU."""
    shifts = torch.randint(-transforms.jitter, transforms.jitter + 1, (steps, 2), generator=generator)
    zoom = 1.0 + (torch.rand(steps, generator=generator, dtype=torch.float64) * 2 - 1) * transforms.scale
    angle = (torch.rand(steps, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(transforms.rotate)
    return torch.cat([shifts.double(), zoom[:, None], angle[:, None]], dim=1)


def affine_matrices(draws: Tensor, size: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
    """``[S, 2, 3]`` ``F.affine_grid`` matrices (``align_corners=False``) for ``draws`` from :func:`sample`.

    The output canvas ``out_size`` is centred on the input ``size``; an output pixel ``u`` (pixel
    units from the canvas centre) reads input pixel ``A^-1 (u - t)`` with ``A = zoom * R(angle)`` and
    ``t = (dx, dy)``. ``affine_grid`` wants both in normalised coordinates (-1 .. 1 spans a side), hence
    the diagonal scalings ``D_in`` and ``D_out``.
    """
    (h, w), (ho, wo) = size, out_size
    dy, dx, zoom, angle = draws.unbind(dim=1)
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (zoom R)^-1, x-y order
    d_in = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)
    d_out = torch.tensor([wo / 2.0, ho / 2.0], dtype=torch.float64)
    linear = d_in[None, :, None] * inverse * d_out[None, None, :]
    shift = -(d_in[None, :, None] * inverse @ torch.stack([dx, dy], 1)[:, :, None])
    return torch.cat([linear, shift], dim=2)


def warp(images: Tensor, matrix: Tensor, out_size: tuple[int, int], fill: float | Tensor = 0.0) -> Tensor:
    """``images`` ``[N, C, H, W]`` warped by one ``[2, 3]`` matrix of :func:`affine_matrices` onto an
    ``out_size`` canvas (bilinear); uncovered pixels are ``fill`` (a number or a ``[1, C, 1, 1]`` tensor)."""
    n, c = images.shape[:2]
    grid = F.affine_grid(matrix.to(images.dtype).expand(n, 2, 3), [n, c, *out_size], align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
