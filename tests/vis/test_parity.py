"""Same model, same inputs: cnnvis agrees with Captum and pytorch-grad-cam up to float tolerance.

Each test states what is compared: raw attributions where the references return them raw, and
pytorch-grad-cam's output after applying its own normalisation (``scale_cam_image``: min-max per
image + OpenCV resize) to our raw layer-resolution map.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

captum_attr = pytest.importorskip("captum.attr")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from vis_helpers import PlainNet, randomize_batchnorm, scaled_plain_net  # noqa: E402

from cnnvis.vis import (  # noqa: E402
    gradcam,
    gradcampp,
    guided_backprop,
    integrated_gradients,
    occlusion_maps,
    saliency,
)

TARGETS = torch.tensor([0, 3, 1])
# Captum's notes about setting requires_grad and ReLU hooks are expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")


@pytest.fixture
def plain() -> PlainNet:
    return scaled_plain_net()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 10, 14)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(1)
    return randomize_batchnorm(resnet18(weights=None, num_classes=6)).eval()


def close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    theirs = torch.as_tensor(theirs, dtype=ours.dtype).detach()
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol * max(1.0, float(theirs.abs().max())))


def test_saliency_matches_captum_saliency_abs(plain, images) -> None:
    ref = captum_attr.Saliency(plain).attribute(images, target=TARGETS, abs=True)
    close(saliency(plain, images, TARGETS, reduce=None).abs(), ref)  # raw per-channel |gradient|
    close(saliency(plain, images, TARGETS), ref.amax(dim=1))  # our default: max over channels


def test_guided_backprop_matches_captum(plain, images) -> None:
    ref = captum_attr.GuidedBackprop(plain).attribute(images, target=TARGETS)
    close(guided_backprop(plain, images, TARGETS, reduce=None), ref)  # raw signed gradients
    assert not torch.allclose(ref, captum_attr.Saliency(plain).attribute(images, target=TARGETS, abs=False))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_matches_captum(plain, images, method: str) -> None:
    baseline = torch.full((1, 3, 1, 1), -0.5)
    ref = captum_attr.IntegratedGradients(plain).attribute(
        images, baselines=baseline.expand_as(images), target=TARGETS, n_steps=20, method=method, internal_batch_size=7)
    ours = integrated_gradients(plain, images, TARGETS, baseline=baseline, steps=20, method=method,
                                batch_size=11, reduce=None)  # raw attributions, different chunking
    close(ours, ref, atol=1e-5)


@pytest.mark.parametrize("score, optimize", [("logit", True), ("prob", True), ("logit", False)])
def test_occlusion_matches_captum(plain, images, score: str, optimize: bool) -> None:
    forward = plain if score == "logit" else (lambda x: plain(x).softmax(dim=1))
    ref = captum_attr.Occlusion(forward).attribute(
        images, sliding_window_shapes=(3, 4, 3), strides=(3, 2, 3), baselines=0.25, target=TARGETS,
        perturbations_per_eval=4)
    maps = occlusion_maps(plain, images, TARGETS, window=(4, 3), stride=(2, 3), baseline=0.25, score=score,
                          batch_size=10, optimize=optimize)
    for c in range(3):  # Captum attributes per channel; our window covers all channels, so they agree
        close(maps.heatmap, ref[:, c], atol=1e-5)


def test_occlusion_matches_captum_on_resnet18(resnet) -> None:
    images = torch.randn(2, 3, 24, 20)
    t = torch.tensor([2, 5])
    ref = captum_attr.Occlusion(resnet).attribute(images, sliding_window_shapes=(3, 6, 6), strides=(3, 4, 4),
                                                  target=t, perturbations_per_eval=8)
    # the default fast path runs a conv-BN-fused copy of the model; residual adds and in-place ReLUs included
    close(occlusion_maps(resnet, images, t, window=6, stride=4, score="logit").heatmap, ref[:, 0], atol=1e-4)


@pytest.mark.parametrize("layer", ["conv2", "relu3"])
def test_gradcam_matches_captum_layer_gradcam(plain, images, layer: str) -> None:
    lgc = captum_attr.LayerGradCam(plain, plain.get_submodule(layer))
    ref = lgc.attribute(images, target=TARGETS)  # [N,1,h,w], no ReLU by default
    close(gradcam(plain, images, TARGETS, layer, relu=False, upsample=False), ref[:, 0])
    ref_up = captum_attr.LayerAttribution.interpolate(lgc.attribute(images, target=TARGETS, relu_attributions=True),
                                                      (10, 14), interpolate_mode="bilinear")
    close(gradcam(plain, images, TARGETS, layer), ref_up[:, 0])


def test_gradcam_matches_captum_on_resnet_layer4(resnet) -> None:
    images = torch.randn(2, 3, 40, 32)
    t = torch.tensor([4, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.LayerGradCam(resnet, resnet.layer4).attribute(images, target=t)
    close(gradcam(resnet, images, t, "layer4", relu=False, upsample=False), ref[:, 0])


@pytest.mark.parametrize("ours, theirs", [(gradcam, "GradCAM"), (gradcampp, "GradCAMPlusPlus")])
def test_cam_methods_match_pytorch_grad_cam_on_resnet18(resnet, ours, theirs: str) -> None:
    images = torch.randn(2, 3, 48, 40)
    t = [3, 0]
    raw = ours(resnet, images, t, "layer4", relu=False, upsample=False)
    with getattr(pytorch_grad_cam, theirs)(model=resnet, target_layers=[resnet.layer4]) as method:
        final = method(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in t])
        acts = method.activations_and_grads.activations[0].numpy()
        grads = method.activations_and_grads.gradients[0].numpy()
        their_raw = method.get_cam_image(images, resnet.layer4, None, acts, grads)
    close(raw, their_raw, rtol=1e-4, atol=1e-5)  # raw layer-resolution map, before ReLU
    # their pipeline on our map: ReLU, min-max + cv2 resize to the input, then min-max again
    ours_final = scale_cam_image(scale_cam_image(np.maximum(raw.numpy(), 0), (40, 48)))
    np.testing.assert_allclose(ours_final, final, atol=1e-4)
