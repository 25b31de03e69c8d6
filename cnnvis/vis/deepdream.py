"""DeepDream (Mordvintsev, Olah & Tyka 2015, "Inceptionism: Going Deeper into Neural Networks",
Google Research blog; the reference ``deepdream.ipynb``): start from a real image and change it so
that a layer's activations grow, which paints whatever that layer detects into the picture.

Gradient ascent on the image of the layer's mean squared activation (half its squared L2 norm,
per element), each step normalised by the gradient's mean absolute value, with a random roll
(jitter) before each step so that the painted patterns do not lock to the pixel grid. Multi-octave:
the image is processed from its smallest scale up (each octave ``octave_scale`` times larger);
the detail added at one octave is upsampled and carried into the next, so large structures form at
coarse scales and get refined at fine ones. Each image of the batch is optimised independently
(the jitter draws are shared), so a batch gives the same pictures as one image at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnvis.errors import VisError
from cnnvis.vis import progress
from cnnvis.vis.activations import stage_layers
from cnnvis.vis.hooks import as_input, capture, check_images
from cnnvis.vis.maximize import warn_zero_gradient

#: octaves whose shorter side would fall below this many pixels are left out (ResNets at stride 32
#: have nothing left to dream on)
MIN_OCTAVE_SIDE = 32


def dream_layer(model: nn.Module, images: Tensor | None = None) -> str:
    """The default layer: two thirds of the way through the network's stages
    (:func:`~cnnvis.vis.activations.stage_layers`): ``layer3`` of a ResNet, the third of four convs of
    ``mnist_cnn``. DeepDream's classic layer is also past the middle (Inception's ``mixed4c``): early
    layers only add edges and colour (on the flowers5 ResNet ``layer2`` mostly saturates colours),
    the last stage's maps are a few pixels wide; ``layer3`` paints flower parts (sunflower heads,
    petals) into the picture. ``images`` are what the model will see (its default layer is found by a
    probing pass on them; without, on a blank image of the size the model declares)."""
    stages = stage_layers(model, images=images)
    return stages[(2 * len(stages)) // 3]


def octave_sizes(height: int, width: int, octaves: int, octave_scale: float) -> list[tuple[int, int]]:
    """The (H, W) of each octave, full size first; octaves under :data:`MIN_OCTAVE_SIDE` are left out."""
    smaller = [(round(height / octave_scale**i), round(width / octave_scale**i)) for i in range(1, octaves)]
    return [(height, width)] + [s for s in smaller if min(s) >= MIN_OCTAVE_SIDE]


def mean_square(model: nn.Module, images: Tensor, layer: str) -> Tensor:
    """``[N]`` mean squared activation of ``layer`` for each image: what :func:`deepdream` raises."""
    with capture(model, layer) as cap:
        model(as_input(images, requires_grad=False))
        return cap.value(layer).flatten(1).pow(2).mean(dim=1)


def deepdream(
    model: nn.Module,
    images: Tensor,
    layer: str | None = None,
    *,
    octaves: int = 3,
    octave_scale: float = 1.4,
    steps: int = 20,
    lr: float = 0.02,
    jitter: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> Tensor:
    """``images`` ``[N, C, H, W]`` (normalised input space) with ``layer``'s activations amplified;
    same shape, device and space. ``layer=None``: :func:`dream_layer`.

    ``octaves``: how many scales (fewer when the smallest would drop under :data:`MIN_OCTAVE_SIDE`
    pixels); ``steps`` per octave; ``lr``: step per pixel relative to the gradient's mean absolute
    value, in normalised units; ``jitter``: largest roll in pixels (default 1/12 of the shorter
    side). ``mean``/``std``: the model's normalisation of ``[0, 1]`` pixels; with them the result
    is kept in the valid pixel range.
    """
    check_images(model, images)
    if octaves < 1 or steps < 1 or octave_scale < 1:
        raise VisError(f"deepdream needs octaves >= 1, steps >= 1 and octave_scale >= 1, got {octaves}, {steps}, "
                       f"{octave_scale}")
    layer = dream_layer(model, images[:1]) if layer is None else layer
    n, c, h, w = images.shape
    sizes = octave_sizes(h, w, octaves, octave_scale)
    roll = max(1, min(h, w) // 12) if jitter is None else jitter
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    shifts = torch.randint(-roll, roll + 1, (len(sizes) * steps, 2), generator=gen).tolist() if roll > 0 else None
    low, high = _valid_range(c, mean, std, images)
    with capture(model, layer, live=True) as cap:
        base = as_input(images, requires_grad=False)
        pyramid = [base] + [F.interpolate(base, size=s, mode="bilinear", align_corners=False, antialias=True)
                            for s in sizes[1:]]
        detail = torch.zeros_like(pyramid[-1])
        done, total = 0, len(sizes) * steps
        for octave in reversed(pyramid):
            if detail.shape != octave.shape:
                detail = F.interpolate(detail, size=octave.shape[2:], mode="bilinear", align_corners=False)
            x = octave + detail
            for _ in range(steps):
                dy, dx = shifts[done] if shifts is not None else (0, 0)
                x = torch.roll(x, (dy, dx), (2, 3)).requires_grad_(True)
                model(x)
                act = cap.value(layer)
                (grad,) = torch.autograd.grad(act.flatten(1).pow(2).mean(dim=1).sum(), x)
                with torch.no_grad():
                    if done == 0:
                        warn_zero_gradient(grad, "deepdream")
                    scale = grad.abs().flatten(1).mean(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
                    x = torch.roll(x.detach() + lr * grad / scale, (-dy, -dx), (2, 3))
                    if low is not None:
                        x = torch.maximum(torch.minimum(x, high), low)
                done += 1
                progress.advance(done, total)
            detail = x - octave
    return x.detach()


def _valid_range(channels: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                 like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``[1, C, 1, 1]`` normalised values of pixels 0 and 1, or (None, None) without a normalisation."""
    if mean is None and std is None:
        return None, None
    for name, stats in (("mean", mean), ("std", std)):
        if stats is not None and len(stats) not in (1, channels):
            raise VisError(f"{name} has {len(stats)} values for images with {channels} channels")
    m = torch.as_tensor(mean if mean is not None else [0.0], dtype=like.dtype, device=like.device)
    s = torch.as_tensor(std if std is not None else [1.0], dtype=like.dtype, device=like.device)
    m, s = m.reshape(1, -1, 1, 1).expand(1, channels, 1, 1), s.reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    return (0 - m) / s, (1 - m) / s
