"""Feature visualisation against torch-lucent (and kornia, which lucent renders with), piece by piece.

A whole render is not compared: lucent draws its jitter, scale and rotation from numpy's global
random state per step (and pads, rescales and upsamples to 224 px in between), we draw one affine warp
per step from a seeded torch generator, so the same seed gives different paths through the same
recipe. What must agree exactly is each deterministic piece: the same spectrum coefficients give the
same image, the same transformation gives the same warped picture, the same tensor gives the same
penalty.
"""

from __future__ import annotations

import math

import pytest
import torch

spatial = pytest.importorskip("lucent.optvis.param.spatial")
color = pytest.importorskip("lucent.optvis.param.color")
kornia = pytest.importorskip("kornia")

from cnnvis.vis import fourier, robustness  # noqa: E402
from cnnvis.vis.penalties import l2_distance, total_variation  # noqa: E402


@pytest.mark.parametrize(("h", "w"), [(16, 16), (12, 17), (15, 10)])
@pytest.mark.parametrize("decay_power", [1.0, 1.5])
def test_fourier_image_equals_lucents_fft_image_and_to_valid_rgb(h: int, w: int, decay_power: float) -> None:
    torch.manual_seed(0)
    params, image_f = spatial.fft_image((2, 3, h, w), sd=0.5, decay_power=decay_power)
    (coefficients,) = params
    # lucent keeps one extra column for odd widths that irfft ignores; the rest is the same layout
    ours_spectrum = coefficients.detach().cpu()[:, :, :, : w // 2 + 1]  # lucent uses CUDA when it sees one
    scale = fourier.spectrum_scale(h, w, decay_power)
    ours = fourier.spectrum_to_image(ours_spectrum, h, w, scale)
    torch.testing.assert_close(ours, image_f().detach().cpu(), rtol=1e-5, atol=1e-6)
    for decorrelate in (True, False):
        theirs = color.to_valid_rgb(image_f, decorrelate=decorrelate)().detach().cpu()
        torch.testing.assert_close(fourier.to_rgb(ours, decorrelate), theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fourier.to_rgb(ours, True), fourier.to_rgb(ours, False), atol=1e-3)


def test_color_matrix_is_lucents_normalised_correlation() -> None:
    torch.testing.assert_close(fourier.color_matrix(), torch.as_tensor(color.color_correlation_normalized))


def test_one_channel_images_skip_the_colour_decorrelation() -> None:
    x = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(fourier.to_rgb(x, decorrelate=True), torch.sigmoid(x))


def test_rotation_and_zoom_equal_kornias_warp_affine() -> None:
    """lucent's random_rotate is kornia.warp_affine with get_rotation_matrix2d about the centre."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 20, 20)
    angle, zoom = 8.0, 1.07
    center = torch.tensor([[9.5, 9.5]])
    m = kornia.get_rotation_matrix2d(center, torch.tensor([angle]), torch.tensor([[zoom, zoom]]))
    theirs = kornia.warp_affine(images, m.expand(2, 2, 3), dsize=(20, 20), align_corners=False)
    # kornia turns counter-clockwise on screen (y down) for a positive angle: our angle is the other way
    draws = torch.tensor([[0.0, 0.0, zoom, -math.radians(angle)]], dtype=torch.float64)
    matrix = robustness.affine_matrices(draws, (20, 20), (20, 20))[0]
    ours = robustness.warp(images, matrix, (20, 20), fill=0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_integer_jitter_with_padding_is_an_exact_shift_onto_a_grey_canvas() -> None:
    images = torch.rand(1, 3, 8, 10)
    draws = torch.tensor([[2.0, -1.0, 1.0, 0.0]], dtype=torch.float64)  # dy=2, dx=-1
    out = robustness.warp(images, robustness.affine_matrices(draws, (8, 10), (12, 14))[0], (12, 14), fill=0.5)
    expected = torch.full((1, 3, 12, 14), 0.5)
    expected[:, :, 2 + 2 : 10 + 2, 2 - 1 : 12 - 1] = images  # pad 2 each side, then moved down 2 and left 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_total_variation_equals_kornias_and_l2_equals_lucids_definition() -> None:
    """lucent 0.1.8 has no TV or L2 objective; Lucid's total_variation is tf.image.total_variation, which
    kornia.losses.total_variation (a lucent dependency) computes, and Lucid's L2 is
    sqrt(epsilon + sum((x - constant)^2)) over the image."""
    torch.manual_seed(0)
    images = torch.rand(3, 3, 9, 11)
    torch.testing.assert_close(total_variation(images), kornia.losses.total_variation(images))
    expected = torch.stack([torch.sqrt(1e-6 + ((im - 0.5) ** 2).sum()) for im in images])
    torch.testing.assert_close(l2_distance(images, 0.5), expected)
    assert float(total_variation(torch.full((1, 3, 9, 11), 0.3))) == 0.0
