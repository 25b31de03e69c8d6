"""Occlusion sensitivity (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks", sec. 4.2).

A ``window`` square (all channels) is set to ``baseline`` at every position on a ``stride`` grid,
the first window at the top-left corner and windows cut off at the right/bottom border, as in
Captum's ``Occlusion``. For each position we record the target class's score and the predicted
class. The per-pixel heatmap is the score drop ``score(x) - score(x occluded)`` averaged over all
windows that cover the pixel, which is exactly Captum's definition when ``score="logit"``.
``score="prob"`` (default) uses the softmax probability of the target class instead.

Speed: all (position, image) pairs are flattened and evaluated ``batch_size`` at a time; occluded
copies are built with one broadcast ``torch.where`` per batch from row/column window masks, and the
averaging over windows is a ``conv_transpose2d`` with a ones kernel. On CPU the forward passes run
through a conv-BN-fused, oneDNN-layout copy of the model (``torch.fx`` ``optimize_for_inference``)
when the model can be traced and the copy reproduces its logits; otherwise the model itself is used.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnvis.errors import VisError
from cnnvis.vis import progress
from cnnvis.vis.batching import batch_size as batching_rule
from cnnvis.vis.hooks import Targets, check_images, model_state, resolve_targets

Score = Literal["prob", "logit"]


@dataclass
class OcclusionMaps:
    """Everything one occlusion sweep measures (grids are indexed by window position).

    Window ``(i, j)`` covers rows ``i*stride[0] .. i*stride[0]+window[0]-1`` and columns
    ``j*stride[1] .. j*stride[1]+window[1]-1`` (clipped to the image).
    """

    heatmap: Tensor  #: [N, H, W] mean score drop over the windows covering each pixel
    drop: Tensor  #: [N, nh, nw] score(original) - score(window (i, j) occluded)
    score: Tensor  #: [N, nh, nw] target score with window (i, j) occluded
    predicted: Tensor  #: [N, nh, nw] class predicted with window (i, j) occluded
    base_score: Tensor  #: [N] target score of the unoccluded image
    targets: Tensor  #: [N] target classes
    window: tuple[int, int]
    stride: tuple[int, int]


def default_window(height: int, width: int) -> int:
    """About a seventh of the shorter side: 4 px for 28 px digits, 32 px for 224 px photos."""
    return max(1, round(min(height, width) / 7))


def _pair(value: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise VisError(f"occlusion {what} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def _score(logits: Tensor, targets: Tensor, score: Score) -> Tensor:
    values = logits.softmax(dim=1) if score == "prob" else logits
    return values.gather(1, targets[:, None]).squeeze(1)


def _inference_copy(model: nn.Module, sample: Tensor) -> nn.Module:
    """A fused, oneDNN-layout copy of ``model`` for CPU float32 inference, or ``model`` itself."""
    if sample.device.type != "cpu" or sample.dtype != torch.float32:
        return model
    try:
        from torch.fx.experimental.optimization import optimize_for_inference

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = optimize_for_inference(model)
            ok = torch.allclose(fast(sample), model(sample), rtol=1e-4, atol=1e-5)
    except Exception:  # not traceable, unsupported op, ...: the plain model is always correct
        return model
    return fast if ok else model


def occlusion_maps(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    baseline: float | Tensor = 0.0,
    score: Score = "prob",
    batch_size: int | None = None,
    optimize: bool = True,
) -> OcclusionMaps:
    """Slide an occluding window over each image; see :class:`OcclusionMaps` for what comes back.

    ``window`` defaults to :func:`default_window`, ``stride`` to half the window. ``baseline`` is the
    fill value in normalised input space (scalar or tensor broadcastable to the images).
    ``batch_size`` is the number of occluded images per forward pass (Captum's
    ``perturbations_per_eval`` times N); the default is :func:`cnnvis.vis.batching.batch_size`'s.
    ``optimize=False`` runs the user's model as is instead of a fused copy.
    """
    check_images(model, images)
    if score not in ("prob", "logit"):
        raise VisError(f"occlusion score must be 'prob' or 'logit', got {score!r}")
    n, c, h, w = images.shape
    kh, kw = _pair(window if window is not None else default_window(h, w), "window")
    sh, sw = _pair(stride if stride is not None else (max(1, kh // 2), max(1, kw // 2)), "stride")
    if kh > h or kw > w:
        raise VisError(f"occlusion window {(kh, kw)} is larger than the image {(h, w)}")
    if (sh > kh and kh < h) or (sw > kw and kw < w):
        raise VisError(f"occlusion stride {(sh, sw)} larger than the window {(kh, kw)} would leave pixels uncovered")
    nh, nw = math.ceil((h - kh) / sh) + 1, math.ceil((w - kw) / sw) + 1
    total = nh * nw * n
    batch = batching_rule(images, batch_size)

    dev = images.device
    with model_state(model, grad=False):
        x = images.detach()
        try:
            fill = torch.as_tensor(baseline, dtype=x.dtype, device=dev).expand_as(x)
        except RuntimeError:
            raise VisError(f"occlusion baseline of shape {tuple(torch.as_tensor(baseline).shape)} does not "
                           f"broadcast to the images {tuple(x.shape)}") from None
        logits = model(x)
        t = resolve_targets(targets, logits)
        base_score = _score(logits, t, score)
        net = _inference_copy(model, x[: min(n, 8)]) if optimize else model
        # window masks along each axis: rows[i, y] is True where window row-position i covers pixel row y
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        top, left = torch.arange(nh, device=dev)[:, None] * sh, torch.arange(nw, device=dev)[:, None] * sw
        rows, cols = (ys >= top) & (ys < top + kh), (xs >= left) & (xs < left + kw)
        scores = torch.empty(total, dtype=logits.dtype, device=dev)
        predicted = torch.empty(total, dtype=torch.long, device=dev)
        for start in range(0, total, batch):
            q = torch.arange(start, min(start + batch, total), device=dev)
            pos, img = q // n, q % n  # position-major: each image appears once per position
            mask = rows[pos // nw][:, :, None] & cols[pos % nw][:, None, :]
            out = net(torch.where(mask[:, None], fill[img], x[img]))
            scores[start : start + len(q)] = _score(out, t[img], score)
            predicted[start : start + len(q)] = out.argmax(dim=1)
            progress.advance(start + len(q), total)
        del net

    grid_score = scores.view(nh, nw, n).permute(2, 0, 1)
    drop = base_score.view(n, 1, 1) - grid_score
    ones = torch.ones(1, 1, kh, kw, dtype=drop.dtype, device=dev)
    summed = F.conv_transpose2d(drop[:, None], ones, stride=(sh, sw))[:, 0, :h, :w]
    count = F.conv_transpose2d(torch.ones_like(drop[:1, None]), ones, stride=(sh, sw))[:, 0, :h, :w]
    return OcclusionMaps(
        heatmap=summed / count,
        drop=drop,
        score=grid_score.contiguous(),
        predicted=predicted.view(nh, nw, n).permute(2, 0, 1).contiguous(),
        base_score=base_score,
        targets=t,
        window=(kh, kw),
        stride=(sh, sw),
    )


def occlusion(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    baseline: float | Tensor = 0.0,
    score: Score = "prob",
    batch_size: int | None = None,
    optimize: bool = True,
) -> Tensor:
    """Occlusion heatmaps ``[N, H, W]``: mean drop of the target's probability (or logit) when covered."""
    return occlusion_maps(
        model, images, targets, window=window, stride=stride, baseline=baseline, score=score,
        batch_size=batch_size, optimize=optimize,
    ).heatmap
