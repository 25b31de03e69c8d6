"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML): deletion without the out-of-distribution artefact.

Deleting pixels to a flat colour leaves sharp holes whose *shape* tells the model which pixels
mattered, so deletion scores partly measure the mask, not the map. ROAD fills each removed pixel
with *noisy linear imputation*: the value that makes it the weighted mean of its 8 neighbours
(1/6 for the 4 direct ones, 1/12 for the diagonals; removed neighbours are unknowns of the same
sparse linear system, one per image, solved with ``scipy.sparse``) plus a little Gaussian noise,
so the filled image carries no trace of where the mask was.

Two orders at several removal fractions: *most relevant first* (MoRF: the map's top pixels are
removed; a faithful map makes the target probability drop, lower is better) and *least relevant
first* (LeRF: its bottom pixels are removed; the probability should stay, higher is better). The
summary :func:`road_score` is pytorch-grad-cam's ``ROADCombined``: (mean LeRF - mean MoRF) / 2.

Same pixels, same fill and same noise stream as pytorch-grad-cam's ``ROADMostRelevantFirst`` /
``ROADLeastRelevantFirst`` (its ``percentile`` is the share *kept*: ``100 * (1 - fraction)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn

from cnnvis.errors import ConfigError
from cnnvis.metrics.perturbation import importance_order
from cnnvis.vis.batching import batch_size as batching_rule
from cnnvis.vis.hooks import model_state

DEFAULT_FRACTIONS = (0.2, 0.5, 0.8)  #: shares of the pixels removed (the imputation of large shares of big images costs most)
NOISE = 0.01  #: std of the imputation noise, in the model's (normalised) input units, as the authors
#: (dy, dx, weight) of each neighbour in the imputation; the weights sum to 1
NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
              (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))
Order = Literal["morf", "lerf"]


def kept_count(pixels: int, fraction: float) -> int:
    """Pixels kept when ``fraction`` of ``pixels`` is removed: those on the kept side of numpy's
    (linear) ``percentile(map, 100 * (1 - fraction))``, the reference's threshold, i.e.
    ``ceil((1 - fraction) * (pixels - 1))`` (rounded first, so 0.3 of 101 pixels is 70, not 71)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"ROAD removal fractions must be between 0 and 1 (exclusive), got {fraction}")
    return math.ceil(round((1 - fraction) * (pixels - 1), 6))


def removal_masks(maps: Tensor, fractions: Sequence[float], order: Order, generator: torch.Generator | None = None) -> Tensor:
    """``BoolTensor[F, N, H*W]``, True where a pixel is removed at each fraction.

    ``morf`` removes the map's most important pixels, ``lerf`` its least important. Ties (flat
    regions) are broken randomly with ``generator`` (as :func:`~cnnvis.metrics.perturbation.importance_order`),
    so each fraction removes exactly its share of pixels.
    """
    if order not in ("morf", "lerf"):
        raise ConfigError(f"ROAD order must be 'morf' or 'lerf', got {order!r}")
    n = maps.shape[0]
    ranking = importance_order(maps, generator)  # [N, HW], most important first
    hw = ranking.shape[1]
    rank = torch.empty_like(ranking).scatter_(1, ranking, torch.arange(hw, device=ranking.device).expand(n, hw).contiguous())
    removed = []
    for fraction in fractions:
        kept = kept_count(hw, fraction)
        removed.append(rank < hw - kept if order == "morf" else rank >= kept)
    return torch.stack(removed)


def impute(images: Tensor, removed: Tensor, noise: float = NOISE, generator: torch.Generator | None = None) -> Tensor:
    """Noisy linear imputation of ``images`` ``[N, C, H, W]`` where ``removed`` ``[N, H*W]`` is True.

    One sparse system for the whole batch (block diagonal: no pixel sees another image), solved in
    float64 for all channels at once; the noise ``noise * N(0, 1)`` is drawn from ``generator`` per
    image as ``[C, removed pixels]``, in image order (the reference's draw). Returns a new CPU float
    tensor; an image with every pixel removed has nothing to interpolate from and gets 0 (the data
    set's mean colour) plus the noise.
    """
    n, c, h, w = images.shape
    hw = h * w
    flat = images.detach().to("cpu", torch.float32).reshape(n, c, hw)
    mask = removed.detach().to("cpu").reshape(n * hw).numpy()
    values = flat.permute(0, 2, 1).reshape(n * hw, c).double().numpy()  # [pixel, channel]
    unknown = np.flatnonzero(mask)
    out = flat.clone()
    if unknown.size == 0:
        return out.view(n, c, h, w)
    variable = np.full(n * hw, -1, dtype=np.int64)
    variable[unknown] = np.arange(unknown.size)
    local = unknown % hw
    y, x = local // w, local % w
    rhs = np.zeros((unknown.size, c))
    diagonal = np.ones(unknown.size)
    rows, cols, weights = [], [], []
    for dy, dx, weight in NEIGHBOURS:
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diagonal[~inside] -= weight  # an edge pixel averages over the neighbours it has
        at, neighbour = np.flatnonzero(inside), (unknown + dy * w + dx)[inside]
        missing = mask[neighbour]
        rhs[at[~missing]] -= weight * values[neighbour[~missing]]
        rows.append(at[missing])
        cols.append(variable[neighbour[missing]])
        weights.append(np.full(int(missing.sum()), weight))
    # an image with no pixel left: its block would be singular; pin each pixel to 0 instead
    empty = mask.reshape(n, hw).all(axis=1)
    pinned = np.repeat(empty, hw)[unknown]
    keep = ~pinned
    rows = np.concatenate([*rows, np.arange(unknown.size)])
    cols = np.concatenate([*cols, np.arange(unknown.size)])
    weights = np.concatenate([*weights, -diagonal])
    coupled = keep[rows] | (rows == cols)
    rows, cols, weights = rows[coupled], cols[coupled], weights[coupled]
    weights[pinned[rows] & (rows == cols)] = 1.0
    rhs[pinned] = 0.0
    system = csc_matrix((weights, (rows, cols)), shape=(unknown.size, unknown.size))
    solution = spsolve(system, rhs)
    filled = torch.from_numpy(np.asarray(solution).reshape(unknown.size, c)).float().t()  # [C, K]
    image_of = unknown // hw
    counts = np.bincount(image_of, minlength=n)
    draws = [torch.randn(c, int(k), generator=generator) for k in counts if k]
    filled = filled + noise * torch.cat(draws, dim=1)
    channels = out.permute(1, 0, 2).reshape(c, n * hw)  # a copy: pixels of all images side by side
    channels[:, torch.from_numpy(unknown)] = filled
    return channels.view(c, n, h, w).transpose(0, 1).contiguous()


def road_curves(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    order: Order,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    noise: float = NOISE,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Target softmax probability ``[N, F]`` after removing ``fractions`` of each image's pixels in
    the ``maps`` ``[N, H, W]`` ``order`` (``morf`` / ``lerf``) and imputing them.

    ``generator`` draws the tie-breaks of the ranking first, then the imputation noise (fraction
    by fraction, image by image). The imputation runs on the CPU; the ``N * F`` filled images go
    through the model on the images' device, ``batch_size`` at a time.
    """
    if not fractions:
        raise ConfigError("ROAD needs at least one removal fraction")
    n = images.shape[0]
    removed = removal_masks(maps, fractions, order, generator)
    filled = torch.cat([impute(images, step, noise, generator) for step in removed]).to(images.device, images.dtype)
    index = torch.arange(n, device=images.device).repeat(len(fractions))  # filled is fraction-major
    size = batching_rule(images, batch_size)
    out = torch.empty(filled.shape[0], device=images.device)
    with model_state(model, grad=False):
        for first in range(0, filled.shape[0], size):
            probs = model(filled[first : first + size]).float().softmax(dim=1)
            out[first : first + size] = probs.gather(1, targets[index[first : first + size]][:, None])[:, 0]
    return out.view(len(fractions), n).t()


def road_score(morf: Tensor, lerf: Tensor) -> Tensor:
    """pytorch-grad-cam's ``ROADCombined`` per image: (mean LeRF - mean MoRF probability) / 2, in
    [-0.5, 0.5]; higher is better (removing the unimportant pixels keeps the class, removing the
    important ones loses it)."""
    return (lerf.mean(dim=1) - morf.mean(dim=1)) / 2
