"""Tiny models with hand-set weights, where every map is known on paper: a wrong formula fails here."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18
from vis_helpers import LinearMapNet, PlainNet, SignNet, randomize_batchnorm

from cnnvis.vis import (
    cam,
    gradcam,
    gradcampp,
    guided_backprop,
    integrated_gradients,
    occlusion_maps,
    saliency,
    smoothgrad,
)

# LinearMapNet: A^0 = x, A^1 = 2x (1x1 conv), logits = W @ mean(A) + b
W = [[1.0, 0.5], [-1.0, 2.0], [0.0, -3.0]]
B = [0.1, -0.2, 0.3]
X = torch.tensor([[1.0, 2.0, -1.0], [3.0, 4.0, 0.5]]).view(1, 1, 2, 3)  # H=2, W=3: non-square
HW = 6


@pytest.fixture
def net() -> LinearMapNet:
    return LinearMapNet(W, B).eval()


@pytest.mark.parametrize("c", [0, 1, 2])
def test_cam_is_the_weighted_sum_of_feature_maps(net, c: int) -> None:
    expected = W[c][0] * X[0, 0] + W[c][1] * 2 * X[0, 0]  # Zhou et al. eq. 2
    torch.testing.assert_close(cam(net, X, c)[0], expected)
    torch.testing.assert_close(cam(net, X, c, relu=True)[0], expected.clamp(min=0))


def test_cam_averages_to_the_logit_on_resnet18() -> None:
    model = randomize_batchnorm(resnet18(weights=None, num_classes=7)).eval()
    images = torch.randn(2, 3, 40, 56)
    maps = cam(model, images, [2, 6], upsample=False)  # [N, 2, 2]: layer4 resolution
    logits = model(images).detach()
    torch.testing.assert_close(maps.mean(dim=(1, 2)) + model.fc.bias.detach()[[2, 6]], logits[[0, 1], [2, 6]],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", [0, 1, 2])
def test_gradcam_on_gap_linear_is_cam_over_hw(net, c: int) -> None:
    # dY^c/dA^k_ij = W[c,k] / HW for every pixel, so alpha_k = W[c,k] / HW and Grad-CAM = CAM / HW
    expected = (W[c][0] * X[0, 0] + W[c][1] * 2 * X[0, 0]) / HW
    torch.testing.assert_close(gradcam(net, X, c, "conv", relu=False)[0], expected)
    torch.testing.assert_close(gradcam(net, X, c, "conv")[0], expected.clamp(min=0))


@pytest.mark.parametrize("c", [0, 1, 2])
def test_gradcampp_weights_by_hand(net, c: int) -> None:
    weights = []
    for k, scale in enumerate([1.0, 2.0]):  # A^k = scale * x
        g = W[c][k] / HW  # constant gradient over the map
        s = scale * float(X.sum())  # sum_ab A^k_ab
        alpha = g * g / (2 * g * g + s * g**3 + 1e-6) if g != 0 else 0.0  # Chattopadhay et al. eq. 19
        weights.append(HW * max(g, 0.0) * alpha)  # eq. 7: sum_ij alpha_ij * ReLU(g)
    expected = weights[0] * X[0, 0] + weights[1] * 2 * X[0, 0]
    torch.testing.assert_close(gradcampp(net, X, c, "conv", relu=False)[0], expected)


@pytest.mark.parametrize("c", [0, 1, 2])
def test_saliency_of_a_linear_model_is_its_weight(net, c: int) -> None:
    grad = (W[c][0] + 2 * W[c][1]) / HW  # d logit_c / d x_ij, the same for every pixel
    torch.testing.assert_close(saliency(net, X, c)[0], torch.full((2, 3), abs(grad)))
    torch.testing.assert_close(saliency(net, X, c, reduce=None)[0, 0], torch.full((2, 3), grad))


def test_smoothgrad_without_noise_is_saliency() -> None:
    model = PlainNet().eval()
    images = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(smoothgrad(model, images, [1, 2], noise=0.0, samples=3), saliency(model, images, [1, 2]))


@pytest.mark.parametrize("c", [0, 1])
def test_integrated_gradients_of_a_linear_model_is_input_times_weight(net, c: int) -> None:
    grad = (W[c][0] + 2 * W[c][1]) / HW
    baseline = torch.full_like(X, 0.5)
    ig = integrated_gradients(net, X, c, baseline=baseline, steps=3, reduce=None)
    torch.testing.assert_close(ig, (X - baseline) * grad)


def test_integrated_gradients_completeness_on_a_relu_net() -> None:
    # Sundararajan et al., Prop. 1: attributions sum to F(x) - F(baseline)
    model = PlainNet().eval()
    images = torch.randn(2, 3, 8, 8)
    ig = integrated_gradients(model, images, [0, 4], steps=300, reduce=None)
    with torch.no_grad():
        delta = model(images)[[0, 1], [0, 4]] - model(torch.zeros_like(images))[[0, 1], [0, 4]]
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), delta, rtol=2e-2, atol=2e-3)


def test_guided_backprop_drops_negative_gradients_by_hand() -> None:
    x = torch.tensor([[0.5, -1.0], [2.0, -0.25]]).view(1, 1, 2, 2)
    net = SignNet("module")
    torch.testing.assert_close(saliency(net, x, 0, reduce=None)[0, 0], torch.full((2, 2), 0.25))
    torch.testing.assert_close(guided_backprop(net, x, 0, reduce=None)[0, 0], (x[0, 0] > 0).float() * 0.25)


def test_occlusion_drops_and_average_by_hand(net) -> None:
    # logit_0 = (W00 + 2 W01) * mean(x) + b0 = 2 * mean(x) + 0.1; a window with baseline 0 removes its pixels
    x = torch.arange(1.0, 13.0).view(1, 1, 3, 4)
    maps = occlusion_maps(net, x, 0, window=2, stride=2, score="logit")
    # windows at rows {0, 2}, cols {0, 2}; the bottom row's windows are cut off at the border
    expected_drop = torch.tensor([[1 + 2 + 5 + 6, 3 + 4 + 7 + 8], [9 + 10, 11 + 12]]) * 2 / 12
    torch.testing.assert_close(maps.drop[0], expected_drop)
    # every pixel is covered by exactly one window, so the heatmap is that window's drop
    torch.testing.assert_close(maps.heatmap[0], expected_drop.repeat_interleave(2, 0)[:3].repeat_interleave(2, 1))
    overlapping = occlusion_maps(net, x, 0, window=2, stride=1, score="logit")
    pixel = sum(float(overlapping.drop[0, i, j]) for i in (0, 1) for j in (0, 1)) / 4  # pixel (1, 1): 4 windows
    assert float(overlapping.heatmap[0, 1, 1]) == pytest.approx(pixel)
