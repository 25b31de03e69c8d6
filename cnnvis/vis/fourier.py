"""Decorrelated Fourier-space image parameterisation (Olah et al. 2017, "Feature Visualization",
Distill, section "Preconditioning and Parameterization"; Lucid's ``param.fft_image`` and
``color.to_valid_rgb(decorrelate=True)``).

Feature visualisation optimises an image. Gradient steps on raw pixels are dominated by high
frequencies (the gradient of a CNN is), so pictures drift into checkerboard noise. Optimising the
image's 2-D spectrum instead, with each coefficient scaled by ``1 / frequency`` (the spectrum of
natural images), gives every frequency an equal say: a step moves low frequencies as much as
high ones, which whitens the gradient. Colours are handled the same way: the three channels of
photos are strongly correlated, so the optimised channels are mapped through the square root of
ImageNet's colour covariance before a sigmoid squashes them into valid ``[0, 1]`` pixels.

The pieces are separate functions so that a caller (and a test) can see each step:
``spectrum = random_spectrum(...)`` -> :func:`spectrum_to_image` -> :func:`to_rgb` -> the
model's normalisation ``(rgb - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Square root of ImageNet's 3 x 3 RGB colour covariance (Olah et al. 2017; the constants of Lucid's
#: ``color_correlation_svd_sqrt``): column j is how one unit of decorrelated channel j moves R, G, B.
#: The first column (all positive) is brightness, the others colour-opponent axes.
COLOR_CORRELATION_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
#: Lucid divides the spectrum image by this ("increasing it reduces saturation"); kept so that the
#: same coefficients give the same picture as Lucid / lucent
SPECTRUM_DIVISOR = 4.0


def color_matrix(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``COLOR_CORRELATION_SQRT`` scaled so that its largest column has unit length (Lucid's
    ``color_correlation_normalized``): decorrelated values of a given size keep about the same range."""
    m = torch.tensor(COLOR_CORRELATION_SQRT, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    return m.to(device=device, dtype=dtype)


def spectrum_frequencies(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """``[H, W // 2 + 1]`` radial frequency (cycles per pixel) of each coefficient of a real 2-D FFT."""
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, device=device, dtype=torch.float64)[None, :]
    return (fx * fx + fy * fy).sqrt()


def spectrum_scale(height: int, width: int, decay_power: float = 1.0,
                   device: torch.device | str | None = None) -> Tensor:
    """``[H, W // 2 + 1]`` float32 ``1 / max(f, 1 / max(H, W)) ** decay_power``: the 1/f amplitude of
    natural images; the floor keeps the constant (f = 0) term finite at the lowest frequency's weight."""
    freqs = spectrum_frequencies(height, width, device)
    return (1.0 / freqs.clamp(min=1.0 / max(height, width)) ** decay_power).float()


def random_spectrum(count: int, channels: int, height: int, width: int, sd: float = 0.01,
                    generator: torch.Generator | None = None) -> Tensor:
    """``[count, channels, H, W // 2 + 1, 2]`` Gaussian (real, imaginary) coefficients, on the CPU
    (the generator's device), drawn the same for every image of the batch when ``count`` images share
    one draw: callers expand a ``count=1`` draw to keep batches independent of their size."""
    return torch.randn((count, channels, height, width // 2 + 1, 2), generator=generator) * sd


def spectrum_to_image(spectrum: Tensor, height: int, width: int, scale: Tensor) -> Tensor:
    """The ``[N, C, H, W]`` image of ``spectrum`` (``[N, C, H, W // 2 + 1, 2]``, see
    :func:`random_spectrum`) after scaling each coefficient by ``scale`` (:func:`spectrum_scale`):
    an orthonormal inverse real FFT, divided by :data:`SPECTRUM_DIVISOR`."""
    scaled = torch.view_as_complex((spectrum * scale[..., None]).contiguous())
    return torch.fft.irfftn(scaled, s=(height, width), norm="ortho") / SPECTRUM_DIVISOR


def to_rgb(image: Tensor, decorrelate: bool = True) -> Tensor:
    """Unconstrained ``[N, C, H, W]`` values to valid pixels in ``[0, 1]``: for 3 channels with
    ``decorrelate``, first mixed by :func:`color_matrix` (each pixel ``c = M @ c``), then a sigmoid.

    One- and two-channel images (digits, depth) have no colour correlation to undo: only the sigmoid.
    """
    if decorrelate and image.shape[1] == 3:
        image = torch.einsum("ij,njhw->nihw", color_matrix(image.device, image.dtype), image)
    return torch.sigmoid(image)


def normalize(rgb: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """``(rgb - mean) / std`` per channel: ``[0, 1]`` pixels to what the model reads. ``None`` means
    the model reads ``[0, 1]`` pixels as they are."""
    channels = rgb.shape[1]
    if mean is not None:
        rgb = rgb - torch.as_tensor(mean, dtype=rgb.dtype, device=rgb.device).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    if std is not None:
        rgb = rgb / torch.as_tensor(std, dtype=rgb.dtype, device=rgb.device).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    return rgb
