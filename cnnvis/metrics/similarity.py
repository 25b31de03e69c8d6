"""How alike two maps are: Spearman rank correlation (ties averaged) and SSIM, batched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks ``0 .. M-1`` of each row of ``[N, M]``; ties share their mean rank ("fractional ranking").

    Ties matter: a ReLU'd Grad-CAM is zero over large areas, and ranking those zeros by position
    would make two unrelated maps look correlated.
    """
    n, m = x.shape
    values, index = x.sort(dim=1)
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1
    position = torch.arange(m, device=x.device, dtype=torch.float64).expand(n, m)
    total = torch.zeros(n, m, device=x.device, dtype=torch.float64).scatter_add_(1, group, position)
    count = torch.zeros(n, m, device=x.device, dtype=torch.float64).scatter_add_(1, group, torch.ones_like(position))
    mean_rank = total.gather(1, group) / count.gather(1, group)
    return torch.empty_like(mean_rank).scatter_(1, index, mean_rank)

def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps ``[N, ...]`` -> ``[N]`` in [-1, 1].

    Pearson correlation of the (tie-averaged) ranks. Undefined when a map is constant (nothing
    is ranked): reported as 0, "no shared ranking".
    """
    n = a.shape[0]
    ra = _average_ranks(torch.nan_to_num(a.reshape(n, -1).double()))
    rb = _average_ranks(torch.nan_to_num(b.reshape(n, -1).double()))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(dim=1) / denominator
    return torch.where(denominator > 0, rho, torch.zeros_like(rho)).float()

def _unit_range(maps: Tensor) -> Tensor:
    flat = torch.nan_to_num(maps.reshape(maps.shape[0], -1).double())
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (flat - lo) / span.clamp_min(1e-300), torch.zeros_like(flat)).reshape(maps.shape)

def ssim(a: Tensor, b: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) of each pair of maps ``[N, H, W]`` -> ``[N]``.

    Each map is first scaled to [0, 1] (min-max; a constant map becomes 0), then compared with
    an 11 x 11 Gaussian window (sigma 1.5; smaller for maps under 11 pixels), K1 = 0.01,
    K2 = 0.03, over the positions where the window fits ("valid"), averaged.
    """
    x, y = _unit_range(a)[:, None], _unit_range(b)[:, None]
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    coords = torch.arange(size, dtype=torch.float64, device=x.device) - (size - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    g = g / g.sum()

    def smooth(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = smooth(x), smooth(y)
    var_x = smooth(x * x) - mu_x**2
    var_y = smooth(y * y) - mu_y**2
    cov = smooth(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(dim=1).float()
