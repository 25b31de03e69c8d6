"""Which map can I trust? Faithfulness checks for every heatmap method of :data:`cnnvis.vis.METHODS`.

Two questions, asked of each method on the same images and target classes:

* **Does the map point at what the model uses?** Deletion and insertion (Petsiuk et al. 2018,
  "RISE", sec. 4.1): pixels are removed from the image (set to ``baseline``; 0 in normalised space
  is the data set's mean colour) in the order of the map's importance, most important first, and
  the target class's softmax probability is tracked; insertion starts from the baseline image
  (or, as in RISE, a blurred copy) and puts the original pixels back in the same order. The area under each curve over the fraction of
  pixels in ``[0, 1]`` (trapezoid rule, ``steps + 1`` points) summarises it: a faithful map makes
  the probability fall fast when deleting (low deletion AUC) and rise fast when inserting (high
  insertion AUC). The same curves for a seeded random pixel order are the baseline to beat.

* **Does the map depend on the model at all?** The model randomization test (Adebayo et al. 2018,
  "Sanity Checks for Saliency Maps", sec. 3.1, cascading): a copy of the model has its layers
  re-initialised from the output layer down to the input, and the maps for the same images and
  target classes are compared with the original ones (Spearman rank correlation and SSIM). A map
  that barely changes when the weights it claims to explain are random cannot be explaining the
  weights: the method *fails* when the mean absolute Spearman correlation with the fully
  randomised model's maps stays above :data:`SANITY_THRESHOLD`.

Maps are compared as the importance they rank: the raw heatmap, upsampled to the input size,
higher = more important (signed maps therefore rank positive evidence first). Everything is
batched and runs on the images' device; nothing here prints.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from cnnvis.errors import ConfigError, DataError
from cnnvis.vis import render
from cnnvis.vis.errors import UnsupportedModelError, VisError
from cnnvis.vis.hooks import Targets, check_images, default_layer, get_layer, model_state, resolve_targets
from cnnvis.vis.maps import upsample
from cnnvis.vis.registry import METHODS, get_method, run_method

#: A method fails the randomization test when the mean |Spearman| between its maps for the trained
#: and the fully randomised model is above this. Adebayo et al. (fig. 2, 4) find methods that
#: ignore the weights (guided backprop, gradient x input on image edges) far above 0.5 while
#: gradients and Grad-CAM fall close to 0.
SANITY_THRESHOLD = 0.5
DEFAULT_IMAGES = 32
DEFAULT_STEPS = 16  #: curve points minus one: 16 steps = 6.25 % of the pixels per step
DEFAULT_CASCADE_POINTS = 3  #: randomization depths reported: the top layer only, about half, all
SEED = 0
#: input elements per forward batch of perturbed images (CPU / GPU), capped at MAX_BATCH images
ELEMENTS_PER_BATCH = {"cpu": 2**22, "cuda": 2**25}
MAX_BATCH = 1024

InsertionStart = Literal["blur", "baseline"]
#: explain(model, images [N,C,H,W], targets LongTensor[N]) -> importance maps [N, H, W]
ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------- methods


def heatmap_methods() -> list[str]:
    """The registered methods whose result is a heatmap, in display order."""
    return [name for name, spec in METHODS.items() if spec.kind == "heatmap"]


def method_explainer(name: str, layer: str | None = None, **params: Any) -> ExplainFn:
    """An :data:`ExplainFn` for registry method ``name``: maps upsampled to the input size.

    ``layer`` only applies to layer-based methods (the others ignore it); stochastic methods get
    ``seed=SEED`` unless ``params`` say otherwise, so the trained and the randomised model see the
    same noise and only the weights differ.
    """
    spec = get_method(name)
    if spec.kind != "heatmap":
        raise ConfigError(f"{name} does not make a heatmap; faithfulness applies to: {', '.join(heatmap_methods())}")
    if "seed" in spec.defaults:
        params = {"seed": SEED, **params}
    use_layer = layer if spec.needs_layer else None

    def explain(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        maps = run_method(name, model, images, targets, use_layer, **params)
        return upsample(maps.detach().float(), tuple(images.shape[-2:]))

    return explain


# ----------------------------------------------------------------------------------- deletion / insertion


def importance_order(maps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Pixel indices ``LongTensor[N, H*W]``, most important first.

    Equal values (the flat zero regions of ReLU'd maps, a constant map) are ordered randomly with
    ``generator`` rather than top-left first, which would favour whatever sits in that corner.
    Non-finite values come last.
    """
    n = maps.shape[0]
    flat = torch.nan_to_num(maps.reshape(n, -1).float(), nan=-math.inf)
    noise = torch.rand(flat.shape, generator=generator).to(flat.device)  # CPU draw: same order on every device
    perm = noise.argsort(dim=1)
    ordered = flat.gather(1, perm).argsort(dim=1, descending=True, stable=True)
    return perm.gather(1, ordered)


def random_order(shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """A seeded random pixel order per image (the baseline every map must beat): ``[N, H*W]``."""
    n, h, w = shape[0], shape[-2], shape[-1]
    return torch.rand(n, h * w, generator=generator).argsort(dim=1).to(device)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with reflected borders (radius 3 sigma, at most side - 1)."""
    n, c, h, w = images.shape
    radius = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def insertion_start(images: Tensor, start: InsertionStart = "baseline", baseline: float = 0.0) -> Tensor:
    """Where insertion begins: the flat ``baseline`` (default) or a blurred copy (sigma = a tenth of
    the shorter side), RISE's choice that avoids sharp artificial edges.

    The baseline is the default because blur keeps large shapes: on small images (digits, the test
    suite's 20-pixel bars) the blurred copy is often still recognised, and every order -- random
    included -- then scores an insertion AUC near 1, which tells the methods apart from nothing.
    """
    if start == "blur":
        return gaussian_blur(images, max(1.0, min(images.shape[-2:]) / 10))
    if start == "baseline":
        return torch.full_like(images, baseline)
    raise ConfigError(f"insertion start must be 'blur' or 'baseline', got {start!r}")


def default_batch_size(images: Tensor) -> int:
    per_image = images[0].numel()
    budget = ELEMENTS_PER_BATCH["cuda" if images.device.type == "cuda" else "cpu"]
    return max(1, min(MAX_BATCH, budget // per_image))


def perturbation_curves(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    order: Tensor,
    *,
    mode: Literal["deletion", "insertion"],
    steps: int = DEFAULT_STEPS,
    baseline: float = 0.0,
    start: Tensor | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Target probability ``[N, steps + 1]`` at pixel fractions ``0, 1/steps, ..., 1``.

    ``order`` ([N, H*W], most important first) decides which pixels go first. ``deletion``: the
    first ``k/steps`` of them are set to ``baseline`` (all channels); ``insertion``: they are taken
    from the image and the rest from ``start`` (default: :func:`insertion_start`). All
    ``N * (steps + 1)`` perturbed images are evaluated ``batch_size`` at a time, built per batch
    with one broadcast ``torch.where`` so that memory stays at one batch.
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if mode not in ("deletion", "insertion"):
        raise ConfigError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    n, _, h, w = images.shape
    device = images.device
    hw = h * w
    points = steps + 1
    counts = torch.round(torch.linspace(0, 1, points, device=device) * hw).long()
    # rank[i, p]: where pixel p of image i stands in its order (0 = most important)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(hw, device=device).expand(n, hw).contiguous())
    if mode == "deletion":
        present, absent = torch.full_like(images[:1], baseline), images  # pixels in the mask are deleted
    else:
        present, absent = images, start if start is not None else insertion_start(images)
    size = batch_size or default_batch_size(images)
    out = torch.empty(n * points, device=device)
    with model_state(model, grad=False):
        for first in range(0, n * points, size):
            pair = torch.arange(first, min(first + size, n * points), device=device)
            img, step = pair // points, pair % points
            mask = (rank[img] < counts[step][:, None]).view(-1, 1, h, w)
            if mode == "deletion":
                batch = torch.where(mask, present, absent[img])
            else:
                batch = torch.where(mask, present[img], absent[img])
            probs = model(batch).float().softmax(dim=1)
            out[first : first + len(pair)] = probs.gather(1, targets[img][:, None])[:, 0]
    return out.view(n, points)


def auc(curves: Tensor) -> Tensor:
    """Area under ``[N, steps + 1]`` curves over the pixel fraction in [0, 1] (trapezoid rule): ``[N]``."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


# ----------------------------------------------------------------------------------- map similarity


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


# ----------------------------------------------------------------------------------- randomization


def randomizable_layers(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, output side first (the cascade order)."""
    names = [name for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None]
    return names[::-1]


def reinitialize(module: nn.Module) -> None:
    """Fresh random weights as at construction (``reset_parameters``: PyTorch's default init;
    BatchNorm also forgets its running statistics). Modules without it get N(0, std of the weight)."""
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
        return
    with torch.no_grad():
        for param in module.parameters(recurse=False):
            std = float(param.std()) if param.numel() > 1 else 0.0
            param.normal_(0.0, std if std > 0 else 0.01)


def cascade_stops(layer_count: int, points: int) -> list[int]:
    """How many layers are randomised at each reported depth: evenly spread, always ending at all."""
    if layer_count < 1:
        raise UnsupportedModelError("the model has no parameters to randomise")
    if points < 1:
        raise ConfigError(f"cascade points must be at least 1, got {points}")
    if points == 1:
        return [layer_count]
    return sorted({round(1 + i * (layer_count - 1) / (points - 1)) for i in range(points)})


def cascading_randomization(model: nn.Module, points: int = DEFAULT_CASCADE_POINTS, seed: int = SEED) -> Iterator[tuple[str, int, nn.Module]]:
    """``(lowest randomised layer, layers randomised, model)`` at each depth of :func:`cascade_stops`.

    One deep copy is randomised further at each step (the same copy is yielded every time, so use
    it before asking for the next). The user's model is never touched; the global random state is
    restored (each layer is drawn from its own seed, so the result does not depend on the device
    history or on how many depths are reported).
    """
    randomized = copy.deepcopy(model).eval()
    names = randomizable_layers(randomized)
    modules = dict(randomized.named_modules())
    cuda = sorted({p.device.index or 0 for p in randomized.parameters() if p.device.type == "cuda"})
    done = 0
    for stop in cascade_stops(len(names), points):
        with torch.random.fork_rng(devices=cuda):
            for i in range(done, stop):
                torch.manual_seed(seed * 100_003 + i)
                reinitialize(modules[names[i]])
        done = stop
        yield names[stop - 1], stop, randomized


@dataclass
class CascadeStep:
    """Map similarity after the top ``layers_randomized`` layers (down to ``layer``) were re-initialised."""

    layer: str
    layers_randomized: int
    spearman: float  #: mean |Spearman| over the images
    ssim: float  #: mean SSIM over the images


@dataclass
class RandomizationResult:
    steps: list[CascadeStep]
    threshold: float = SANITY_THRESHOLD

    @property
    def spearman(self) -> float:
        """Mean |Spearman| with the fully randomised model (the verdict's number)."""
        return self.steps[-1].spearman

    @property
    def ssim(self) -> float:
        return self.steps[-1].ssim

    @property
    def passed(self) -> bool:
        return self.spearman <= self.threshold


def randomization_checks(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    explainers: Mapping[str, ExplainFn],
    *,
    originals: Mapping[str, Tensor] | None = None,
    points: int = DEFAULT_CASCADE_POINTS,
    seed: int = SEED,
    threshold: float = SANITY_THRESHOLD,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, RandomizationResult]:
    """The cascading randomization test for several methods at once (one cascade, all methods per depth).

    ``targets`` stay the trained model's classes: the question is whether the explanation *of the
    same decision* changes when the weights behind it are gone. ``originals`` are the trained
    model's maps when already computed.
    """
    originals = dict(originals or {})
    for name, explain in explainers.items():
        if name not in originals:
            originals[name] = explain(model, images, targets)
    steps: dict[str, list[CascadeStep]] = {name: [] for name in explainers}
    for layer, count, randomized in cascading_randomization(model, points, seed):
        for name, explain in explainers.items():
            if on_progress is not None:
                on_progress(f"randomization: {name}, layers down to {layer}")
            maps = explain(randomized, images, targets)
            rho = spearman(originals[name], maps).abs().mean()
            similarity = ssim(originals[name], maps).mean()
            steps[name].append(CascadeStep(layer, count, float(rho), float(similarity)))
    return {name: RandomizationResult(found, threshold) for name, found in steps.items()}


def randomization_check(model: nn.Module, images: Tensor, targets: Targets, explain: ExplainFn, **options: Any) -> RandomizationResult:
    """:func:`randomization_checks` for one explanation function (any ``ExplainFn``: a registry
    method from :func:`method_explainer`, or your own)."""
    check_images(model, images)
    with model_state(model, grad=False):
        t = resolve_targets(targets, model(images))
    return randomization_checks(model, images, t, {"map": explain}, **options)["map"]


# ----------------------------------------------------------------------------------- the whole check


@dataclass
class FaithfulnessRow:
    """One method's scores. ``rank`` 1 is the most trustworthy (see :func:`rank_rows`)."""

    method: str
    layer: str | None
    deletion_auc: float  #: mean over the images; lower is better
    insertion_auc: float  #: higher is better
    randomization: RandomizationResult
    deletion_curve: list[float]  #: mean target probability at each step
    insertion_curve: list[float]
    beats_random: bool  #: lower deletion and higher insertion AUC than the random pixel order
    seconds: float
    rank: int = 0

    @property
    def passed(self) -> bool:
        return self.randomization.passed

    @property
    def margin(self) -> float:
        """Insertion minus deletion AUC: how much better the map's order is at both at once."""
        return self.insertion_auc - self.deletion_auc


@dataclass
class FaithfulnessReport:
    rows: list[FaithfulnessRow]
    random_deletion_auc: float
    random_insertion_auc: float
    random_deletion_curve: list[float]
    random_insertion_curve: list[float]
    images: int
    steps: int
    cascade_points: int
    threshold: float
    insertion_start: str
    baseline: float
    seed: int
    targets: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (method, reason)
    info: dict[str, Any] = field(default_factory=dict)  #: checkpoint, images used, class names ...

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            rows.append({
                "rank": r.rank, "method": r.method, "layer": r.layer,
                "deletion_auc": r.deletion_auc, "insertion_auc": r.insertion_auc,
                "randomization_spearman": r.randomization.spearman, "randomization_ssim": r.randomization.ssim,
                "randomization_check": "pass" if r.passed else "fail", "beats_random": r.beats_random,
                "cascade": r.randomization.steps, "deletion_curve": r.deletion_curve,
                "insertion_curve": r.insertion_curve, "seconds": r.seconds,
            })
        return render.to_jsonable({
            "methods": rows,
            "random_order": {"deletion_auc": self.random_deletion_auc, "insertion_auc": self.random_insertion_auc,
                             "deletion_curve": self.random_deletion_curve, "insertion_curve": self.random_insertion_curve},
            "skipped": [{"method": m, "reason": why} for m, why in self.skipped],
            "parameters": {
                "images": self.images, "steps": self.steps, "cascade_points": self.cascade_points,
                "threshold": self.threshold, "insertion_start": self.insertion_start,
                "deletion_baseline": self.baseline, "seed": self.seed,
                "similarity": "mean |Spearman| (verdict) and SSIM between trained and fully randomised maps",
                "ranking": "passing methods first, then insertion AUC minus deletion AUC, highest first",
            },
            "targets": self.targets,
            **self.info,
        })


def rank_rows(rows: Sequence[FaithfulnessRow]) -> list[FaithfulnessRow]:
    """Methods that pass the randomization test first (a map that ignores the weights is no
    explanation however well it deletes), then by insertion minus deletion AUC."""
    ranked = sorted(rows, key=lambda r: (not r.passed, -r.margin))
    for i, row in enumerate(ranked, 1):
        row.rank = i
    return ranked


def faithfulness(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    methods: Sequence[str] | None = None,
    layer: str | None = None,
    steps: int = DEFAULT_STEPS,
    cascade_points: int = DEFAULT_CASCADE_POINTS,
    threshold: float = SANITY_THRESHOLD,
    start: InsertionStart = "baseline",
    baseline: float = 0.0,
    seed: int = SEED,
    batch_size: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> FaithfulnessReport:
    """Deletion / insertion AUC and the randomization test for each heatmap method (default: all).

    ``images`` are normalised ``[N, C, H, W]`` on the model's device; ``targets`` as for the
    methods (default: each image's predicted class). A method the model cannot support (CAM
    without GAP + linear head) is skipped with its reason unless it was asked for by name.
    """
    check_images(model, images)
    explicit = bool(methods)
    names = list(dict.fromkeys(methods)) if explicit else heatmap_methods()
    for name in names:
        if get_method(name).kind != "heatmap":
            raise ConfigError(f"{name} does not make a heatmap; faithfulness applies to: {', '.join(heatmap_methods())}")
    if layer is not None:
        get_layer(model, layer)  # a wrong name fails before any work, listing the valid ones
    resolved_layer = layer or default_layer(model)
    progress = on_progress or (lambda text: None)
    with model_state(model, grad=False):
        t = resolve_targets(targets, model(images))

    generator = torch.Generator().manual_seed(seed)
    start_images = insertion_start(images, start, baseline)

    def curves(order: Tensor) -> tuple[Tensor, Tensor]:
        deletion = perturbation_curves(model, images, t, order, mode="deletion", steps=steps, baseline=baseline, batch_size=batch_size)
        insertion = perturbation_curves(model, images, t, order, mode="insertion", steps=steps, start=start_images, batch_size=batch_size)
        return deletion, insertion

    progress("deletion / insertion: random pixel order")
    random_deletion, random_insertion = curves(random_order(images.shape, generator, images.device))
    random_del_auc, random_ins_auc = float(auc(random_deletion).mean()), float(auc(random_insertion).mean())

    explainers: dict[str, ExplainFn] = {}
    originals: dict[str, Tensor] = {}
    measured: dict[str, tuple[Tensor, Tensor, float]] = {}
    skipped: list[tuple[str, str]] = []
    for name in names:
        progress(f"deletion / insertion: {name}")
        started = time.perf_counter()
        explain = method_explainer(name, resolved_layer)
        try:
            maps = explain(model, images, t)
        except UnsupportedModelError as exc:
            if explicit:
                raise
            skipped.append((name, str(exc)))
            continue
        # one tie-break stream per method: its order does not depend on which other methods ran
        order = importance_order(maps, torch.Generator().manual_seed(seed))
        deletion, insertion = curves(order)
        explainers[name], originals[name] = explain, maps
        measured[name] = (deletion, insertion, time.perf_counter() - started)
    if not explainers:
        raise VisError("no heatmap method works on this model: " + "; ".join(f"{m}: {why}" for m, why in skipped))

    started = time.perf_counter()
    checks = randomization_checks(model, images, t, explainers, originals=originals, points=cascade_points,
                                  seed=seed, threshold=threshold, on_progress=progress)
    shared = (time.perf_counter() - started) / len(explainers)
    rows = []
    for name, (deletion, insertion, seconds) in measured.items():
        del_auc, ins_auc = float(auc(deletion).mean()), float(auc(insertion).mean())
        rows.append(FaithfulnessRow(
            method=name,
            layer=resolved_layer if METHODS[name].needs_layer else None,
            deletion_auc=del_auc,
            insertion_auc=ins_auc,
            randomization=checks[name],
            deletion_curve=deletion.mean(dim=0).tolist(),
            insertion_curve=insertion.mean(dim=0).tolist(),
            beats_random=del_auc < random_del_auc and ins_auc > random_ins_auc,
            seconds=seconds + shared,
        ))
    return FaithfulnessReport(
        rows=rank_rows(rows),
        random_deletion_auc=random_del_auc,
        random_insertion_auc=random_ins_auc,
        random_deletion_curve=random_deletion.mean(dim=0).tolist(),
        random_insertion_curve=random_insertion.mean(dim=0).tolist(),
        images=int(images.shape[0]),
        steps=steps,
        cascade_points=cascade_points,
        threshold=threshold,
        insertion_start=start,
        baseline=baseline,
        seed=seed,
        targets=t.tolist(),
        skipped=skipped,
    )


# ----------------------------------------------------------------------------------- writing


@dataclass
class FaithfulnessFiles:
    json: Path
    csv: Path
    curves: Path


CSV_COLUMNS = ("rank", "method", "layer", "deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc",
               "randomization_spearman", "randomization_ssim", "randomization_check", "beats_random")


def curves_figure(report: FaithfulnessReport, title: str = "") -> bytes:
    """Mean deletion and insertion curves of every method, with the random order dashed."""
    fig = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    x = torch.linspace(0, 1, report.steps + 1).tolist()
    palette = [f"C{i}" for i in range(10)]
    for panel, (mode, random_curve, random_value, better) in enumerate((
        ("deletion", report.random_deletion_curve, report.random_deletion_auc, "lower is better"),
        ("insertion", report.random_insertion_curve, report.random_insertion_auc, "higher is better"),
    )):
        ax = fig.add_subplot(1, 2, panel + 1)
        for i, row in enumerate(report.rows):
            curve = row.deletion_curve if mode == "deletion" else row.insertion_curve
            value = row.deletion_auc if mode == "deletion" else row.insertion_auc
            ax.plot(x, curve, color=palette[i % 10], linestyle="-" if row.passed else ":", linewidth=1.6,
                    label=f"{row.method} {value:.3f}" + ("" if row.passed else " (fails sanity)"))
        ax.plot(x, random_curve, color="black", linestyle="--", linewidth=1.2, label=f"random order {random_value:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"fraction of pixels {'deleted' if mode == 'deletion' else 'inserted'} (most important first)")
        ax.set_ylabel("target class probability (mean)")
        ax.set_title(f"{mode}: AUC, {better}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right" if mode == "deletion" else "lower right", framealpha=0.85)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return render.figure_to_png(fig)


def write_faithfulness(report: FaithfulnessReport, out_dir: str | Path, writer: Any = None, step: int = 0, title: str = "") -> FaithfulnessFiles:
    """``faithfulness.json`` (everything, curves and cascade steps included), ``faithfulness.csv``
    (the ranked table) and ``faithfulness_curves.png`` in ``out_dir``; with ``writer`` (a
    ``SummaryWriter``) the table as text and the curves as an image under ``evaluate/``."""
    out = Path(out_dir)
    json_path, csv_path = out / "faithfulness.json", out / "faithfulness.csv"
    png = curves_figure(report, title)
    curves_path = render.save_png(png, out / "faithfulness_curves.png")
    data = report.to_dict()
    try:
        json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
        with csv_path.open("w", newline="", encoding="utf-8") as fh:
            table = csv.writer(fh)
            table.writerow(CSV_COLUMNS)
            for r in report.rows:
                table.writerow([r.rank, r.method, r.layer or "", f"{r.deletion_auc:.6g}", f"{r.insertion_auc:.6g}",
                                f"{report.random_deletion_auc:.6g}", f"{report.random_insertion_auc:.6g}",
                                f"{r.randomization.spearman:.6g}", f"{r.randomization.ssim:.6g}",
                                "pass" if r.passed else "fail", "yes" if r.beats_random else "no"])
    except OSError as exc:
        raise DataError(f"cannot write the faithfulness table into {out}: {exc.strerror or exc}") from None
    if writer is not None:
        lines = ["| rank | method | deletion AUC ↓ | insertion AUC ↑ | randomization \\|ρ\\| ↓ | SSIM | check |",
                 "|---|---|---|---|---|---|---|"]
        for r in report.rows:
            lines.append(f"| {r.rank} | {r.method} | {r.deletion_auc:.3f} | {r.insertion_auc:.3f} | "
                         f"{r.randomization.spearman:.2f} | {r.randomization.ssim:.2f} | {'pass' if r.passed else 'FAIL'} |")
        lines.append(f"| | random order | {report.random_deletion_auc:.3f} | {report.random_insertion_auc:.3f} | | | |")
        writer.add_text("evaluate/faithfulness", "\n".join(lines), step)
        writer.add_image("evaluate/faithfulness_curves", render.figure_to_tensor(png), step, dataformats="CHW")
    return FaithfulnessFiles(json_path, csv_path, curves_path)
