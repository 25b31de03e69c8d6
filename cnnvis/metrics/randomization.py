"""The model randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", sec. 3.1,
cascading): does a map depend on the model at all?

A copy of the model has its layers re-initialised from the output layer down to the input, and
the maps for the same images and target classes are compared with the original ones (Spearman
rank correlation and SSIM). A map that barely changes when the weights it claims to explain are
random cannot be explaining the weights: the method *fails* when the mean absolute Spearman
correlation with the fully randomised model's maps stays above :data:`SANITY_THRESHOLD`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnnvis.errors import ConfigError, UnsupportedModelError
from cnnvis.metrics.similarity import spearman, ssim
from cnnvis.vis.hooks import Targets, check_images, model_state, resolve_targets

#: A method fails the randomization test when the mean |Spearman| between its maps for the trained
#: and the fully randomised model is above this. Adebayo et al. (fig. 2, 4) find methods that
#: ignore the weights (guided backprop, gradient x input on image edges) far above 0.5 while
#: gradients and Grad-CAM fall close to 0.
SANITY_THRESHOLD = 0.5
DEFAULT_CASCADE_POINTS = 3  #: randomization depths reported: the top layer only, about half, all
SEED = 0
#: explain(model, images [N,C,H,W], targets LongTensor[N]) -> importance maps [N, H, W]
ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


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
