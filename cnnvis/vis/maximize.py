"""Activation maximisation / feature visualisation: synthetic inputs that excite a class or a neuron.

Gradient ascent on the input, x* = argmax_x h(x) (Erhan et al. 2009, "Visualizing Higher-Layer
Features of a Deep Network", sec. 3.1), where ``h`` is a class logit, the mean activation of one
channel of a layer, or one neuron (the channel's centre position). Two recipes:

* ``param="fourier"`` (Olah et al. 2017, "Feature Visualization", Distill; Lucid / lucent's default
  ``render_vis``): the image is a 1/f-scaled spectrum with decorrelated colours squashed to ``[0, 1]``
  (:mod:`cnnvis.vis.fourier`), optimised with Adam while every step sees it through a random pad,
  jitter, scale and rotation (:mod:`cnnvis.vis.robustness`); optional total-variation and L2 priors
  (:mod:`cnnvis.vis.penalties`) enter the loss. What photo models need to draw objects, not noise.
* ``param="pixel"`` (Yosinski et al. 2015, "Understanding Neural Networks Through Deep
  Visualization", sec. 3): pixels in the model's input space, gradient steps normalised by their mean
  absolute value, L2 decay ``x <- (1 - l2) x``, roll jitter and a periodic Gaussian blur; a ``tv``
  weight takes a step down the total variation's gradient after each ascent step. Enough for digits.

``param="auto"`` picks Fourier for colour images of at least :data:`PHOTO_SIZE` pixels, pixels
otherwise; :func:`maximize_settings` says what every ``None`` parameter becomes. The seeded start
and transformations are shared by all targets, so an image does not depend on which other targets
were optimised in the same batch. Results are always in the model's input space (normalised).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cnnvis.errors import VisError
from cnnvis.vis import fourier, progress, robustness
from cnnvis.vis.hooks import capture
from cnnvis.vis.maps import gaussian_blur
from cnnvis.vis.penalties import l2_distance, total_variation

Param = Literal["auto", "pixel", "fourier"]
Objective = Literal["auto", "logit", "channel", "neuron"]
#: ``param="auto"`` uses the Fourier recipe for images with 3 channels and both sides at least this
PHOTO_SIZE = 64
#: what each recipe uses for the parameters left at None
RECIPES: dict[str, dict[str, Any]] = {
    "pixel": {"steps": 128, "lr": 0.05, "l2": 0.01, "tv": 0.0, "robust": False, "init_std": 0.1},
    "fourier": {"steps": 128, "lr": 0.05, "l2": 0.0, "tv": 0.0, "robust": True, "init_std": 0.01},
}


#: the Fourier recipe's start for a layer's units: a grey start (0.01) leaves many post-ReLU channels
#: off everywhere, so their gradient is zero and the image never moves (8 of the first 16 channels of
#: ``layer3`` of the flowers5 ResNet stayed grey); at 0.5 the start has enough contrast to wake them
UNIT_INIT_STD = 0.5


def maximize_settings(image_shape: Sequence[int], param: Param = "auto", layer: str | None = None,
                      **given: Any) -> dict[str, Any]:
    """The recipe ``maximize`` runs for ``image_shape`` = (C, H, W) (and ``layer``, if its units are
    the objective): ``param`` resolved and every parameter of :data:`RECIPES` that ``given`` leaves at
    None filled in (also the transformations)."""
    if param == "auto":
        c, h, w = image_shape
        param = "fourier" if c == 3 and min(h, w) >= PHOTO_SIZE else "pixel"
    if param not in RECIPES:
        raise VisError(f"param must be 'auto', 'pixel' or 'fourier', got {param!r}")
    settings = {"param": param, **{k: given.get(k) if given.get(k) is not None else v for k, v in RECIPES[param].items()}}
    if param == "fourier" and layer is not None and given.get("init_std") is None:
        settings["init_std"] = UNIT_INIT_STD
    if settings["robust"]:
        standard = robustness.Transforms.standard(*image_shape[1:])
        settings["transforms"] = {k: given[k] if given.get(k) is not None else getattr(standard, k)
                                  for k in ("pad", "jitter", "scale", "rotate")}
    else:  # Yosinski's roll jitter
        settings["jitter"] = given["jitter"] if given.get("jitter") is not None else 2
    return settings


def maximize(
    model: nn.Module,
    targets: int | Sequence[int] | Tensor,
    image_shape: tuple[int, int, int],
    *,
    layer: str | None = None,
    objective: Objective = "auto",
    param: Param = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    l2: float | None = None,
    tv: float | None = None,
    robust: bool | None = None,
    pad: int | None = None,
    jitter: int | None = None,
    scale: float | None = None,
    rotate: float | None = None,
    decorrelate: bool = True,
    decay_power: float = 1.0,
    blur_sigma: float = 0.5,
    blur_every: int = 4,
    init_std: float | None = None,
    clamp: tuple[float, float] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Images ``[K, C, H, W]`` (the model's normalised input space) that maximise each of the K ``targets``.

    Without ``layer`` a target is a class index and the objective its logit; with ``layer`` it is a
    channel of that layer, and ``objective`` ``"channel"`` (the default) maximises the channel's mean,
    ``"neuron"`` its centre position. ``mean``/``std``: the normalisation the model expects of
    ``[0, 1]`` pixels (the run's ``ImageSpec``); the Fourier image is made in ``[0, 1]`` and then
    normalised, the pixel image is made in the normalised space directly. ``lr``: Adam's step on the
    spectrum (Fourier) or the step per pixel relative to the mean gradient (pixel). ``l2``/``tv``:
    weights of the L2 and total-variation priors (the pixel recipe applies ``l2`` as a decay).
    ``robust``: pad/jitter/scale/rotate each step (``pad`` ... ``rotate``, see
    :class:`~cnnvis.vis.robustness.Transforms`); otherwise the pixel recipe rolls by up to ``jitter``
    (default 2) pixels. ``decorrelate``/``decay_power``: the Fourier image's colour decorrelation
    (3 channels only) and spectrum fall-off. ``blur_*``: the pixel recipe's periodic blur.
    ``clamp=(lo, hi)`` keeps pixel-recipe values in a valid normalised range if you know it.
    """
    t = torch.as_tensor(targets).long().reshape(-1)
    if t.numel() == 0 or len(image_shape) != 3:
        raise VisError("maximize needs at least one target and image_shape = (C, H, W)")
    if objective not in ("auto", "logit", "channel", "neuron"):
        raise VisError(f"objective must be 'auto', 'logit', 'channel' or 'neuron', got {objective!r}")
    if (layer is None and objective in ("channel", "neuron")) or (layer is not None and objective == "logit"):
        raise VisError(f"objective {objective!r} " + ("needs a layer" if layer is None else "takes no layer"))
    for name, stats in (("mean", mean), ("std", std)):
        if stats is not None and len(stats) not in (1, image_shape[0]):
            raise VisError(f"{name} has {len(stats)} values for images with {image_shape[0]} channels")
    s = maximize_settings(image_shape, param, layer, steps=steps, lr=lr, l2=l2, tv=tv, robust=robust, init_std=init_std,
                          pad=pad, jitter=jitter, scale=scale, rotate=rotate)
    if s["steps"] < 1:
        raise VisError(f"steps must be >= 1, got {s['steps']}")
    if device is None:
        weight = next(model.parameters(), None)
        device = weight.device if weight is not None else "cpu"
    score = _objective(layer, "channel" if objective == "auto" else objective)
    with capture(model, [] if layer is None else [layer], live=True) as cap:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        if s["param"] == "fourier":
            return _fourier(model, cap, score, t.to(device), image_shape, s, mean, std, decorrelate, decay_power,
                            gen, torch.device(device))
        return _pixel(model, cap, score, t.to(device), image_shape, s, mean, std, blur_sigma, blur_every,
                      clamp, gen, torch.device(device))


def _objective(layer: str | None, kind: str) -> Any:
    """``score(logits, cap, targets) -> [K]``: the value each image's optimisation raises."""
    def score(logits: Tensor, cap: Any, t: Tensor) -> Tensor:
        if layer is None:
            if t.max() >= logits.shape[1] or t.min() < 0:
                raise VisError(f"class index out of range; the model has {logits.shape[1]} classes")
            return logits.gather(1, t[:, None]).squeeze(1)
        act = cap.value(layer)
        if act.ndim < 2 or t.max() >= act.shape[1] or t.min() < 0:
            raise VisError(f"channel index out of range for layer {layer!r} with output {tuple(act.shape)}")
        chosen = act[torch.arange(len(t), device=act.device), t]
        if kind == "neuron":
            if chosen.ndim != 3:
                raise VisError(f"objective 'neuron' needs a spatial layer output [N, C, H, W], {layer!r} gives "
                               f"{tuple(act.shape)}")
            return chosen[:, chosen.shape[1] // 2, chosen.shape[2] // 2]
        return chosen.reshape(len(t), -1).mean(dim=1)
    return score


def warn_zero_gradient(grad: Tensor, method: str) -> None:
    """Warn once if some image's objective has no gradient at all (its optimisation cannot move)."""
    if bool((grad.flatten(1).abs().amax(dim=1) == 0).any()):
        warnings.warn(f"{method}: the objective has zero gradient for some targets (e.g. a channel "
                      "after a ReLU that is off everywhere); try the layer before the activation", stacklevel=4)


def _grey(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, device: torch.device) -> Tensor:
    """Mid-grey (0.5) in the model's input space, ``[1, C, 1, 1]``."""
    return fourier.normalize(torch.full((1, channels, 1, 1), 0.5, device=device), mean, std)


def _fourier(model: nn.Module, cap: Any, score: Any, t: Tensor, shape: tuple[int, int, int], s: dict[str, Any],
             mean: Sequence[float] | None, std: Sequence[float] | None, decorrelate: bool, decay_power: float,
             gen: torch.Generator, device: torch.device) -> Tensor:
    k, (c, h, w) = len(t), shape
    spectrum = fourier.random_spectrum(1, c, h, w, s["init_std"], gen).expand(k, -1, -1, -1, -1).to(device).clone()
    spectrum.requires_grad_(True)
    scale = fourier.spectrum_scale(h, w, decay_power, device)
    move = robustness.Transforms(**s["transforms"])
    size = (h + 2 * move.pad, w + 2 * move.pad)
    matrices = robustness.affine_matrices(robustness.sample(move, s["steps"], gen), (h, w), size).float().to(device)
    adam = _Adam(spectrum, s["lr"])

    def image() -> Tensor:
        return fourier.to_rgb(fourier.spectrum_to_image(spectrum, h, w, scale), decorrelate)

    for step in range(s["steps"]):
        rgb = image()
        seen = fourier.normalize(robustness.warp(rgb, matrices[step], size, fill=0.5), mean, std)
        gain = score(model(seen), cap, t)
        if s["l2"]:
            gain = gain - s["l2"] * l2_distance(rgb, 0.5)
        if s["tv"]:
            gain = gain - s["tv"] * total_variation(rgb)
        (grad,) = torch.autograd.grad(gain.sum(), spectrum)
        if step == 0:
            warn_zero_gradient(grad, "maximize")
        adam.ascend(grad)
        progress.advance(step + 1, s["steps"])
    with torch.no_grad():
        return fourier.normalize(image(), mean, std).detach()


class _Adam:
    """Adam (Kingma & Ba 2015) ascending one tensor in place, as ``torch.optim.Adam`` with its defaults
    would descend the negated objective; its own few lines because ``torch.optim`` imports
    ``torch._dynamo`` on first use (seconds on a busy CPU)."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps, self.t = param, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def ascend(self, grad: Tensor) -> None:
        (b1, b2), self.t = self.betas, self.t + 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denominator = (self.v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denominator, value=self.lr / (1 - b1**self.t))


def _pixel(model: nn.Module, cap: Any, score: Any, t: Tensor, shape: tuple[int, int, int], s: dict[str, Any],
           mean: Sequence[float] | None, std: Sequence[float] | None, blur_sigma: float,
           blur_every: int, clamp: tuple[float, float] | None, gen: torch.Generator, device: torch.device) -> Tensor:
    k, steps = len(t), s["steps"]
    x = (torch.randn((1, *shape), generator=gen) * s["init_std"]).expand(k, *shape).to(device).clone()
    if s["robust"]:
        move = robustness.Transforms(**s["transforms"])
        size = (shape[1] + 2 * move.pad, shape[2] + 2 * move.pad)
        matrices = robustness.affine_matrices(robustness.sample(move, steps, gen), shape[1:], size).float().to(device)
        grey = _grey(mean, std, shape[0], device)
    else:
        roll = s["jitter"]
        shifts = torch.randint(-roll, roll + 1, (steps, 2), generator=gen).tolist() if roll > 0 else [[0, 0]] * steps
    for step in range(steps):
        x.requires_grad_(True)
        seen = robustness.warp(x, matrices[step], size, grey) if s["robust"] else torch.roll(x, shifts[step], (2, 3))
        (grad,) = torch.autograd.grad(score(model(seen), cap, t).sum(), x)
        with torch.no_grad():
            if step == 0:
                warn_zero_gradient(grad, "maximize")
            scale = grad.abs().reshape(k, -1).mean(dim=1).view(k, 1, 1, 1)
            x = (1 - s["l2"]) * x.detach() + s["lr"] * grad / scale.clamp(min=1e-12)
            if s["tv"]:
                x = _tv_step(x, s["tv"])
            if blur_every > 0 and (step + 1) % blur_every == 0:
                x = gaussian_blur(x, blur_sigma, truncate=2.0)
            if clamp is not None:
                x = x.clamp(*clamp)
        progress.advance(step + 1, steps)
    return x.detach()


def _tv_step(x: Tensor, weight: float) -> Tensor:
    """One step of size ``weight`` down the total variation of each image (its gradient's sign pattern)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(total_variation(x).sum(), x)
    return x.detach() - weight * grad
