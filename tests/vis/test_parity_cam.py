"""The CAM family against pytorch-grad-cam: same model, same inputs, same targets.

pytorch-grad-cam returns ReLU'd maps, min-max scaled per image and resized to the input with
OpenCV (``scale_cam_image``), and scaled again after averaging layers. Where it exposes the raw
layer-resolution map (``get_cam_image``) that is compared first; the final maps are compared
after applying exactly that pipeline to our raw layer-resolution map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from vis_helpers import randomize_batchnorm, scaled_plain_net  # noqa: E402

from cnnvis.models import SmallResNet  # noqa: E402
from cnnvis.vis import (  # noqa: E402
    ablationcam,
    eigencam,
    fullgrad,
    gradcam,
    gradcampp,
    hirescam,
    layercam,
    scorecam,
    xgradcam,
)

GRADIENT = [(xgradcam, "XGradCAM"), (layercam, "LayerCAM"), (hirescam, "HiResCAM")]
SIZE = (40, 48)  # (width, height), OpenCV's order


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    """torchvision's ResNet layout (residual adds, in-place ReLUs, BN) at 8..64 channels."""
    torch.manual_seed(1)
    return randomize_batchnorm(SmallResNet(6, width=8)).eval()


@pytest.fixture(scope="module")
def plain() -> torch.nn.Module:
    torch.manual_seed(2)
    return scaled_plain_net()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[int]]:
    torch.manual_seed(3)
    return torch.randn(2, 3, 48, 40), [3, 0]


def models(request: pytest.FixtureRequest, which: str) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    model = request.getfixturevalue(which)
    return (model, model.layer4, "layer4") if which == "resnet" else (model, model.relu3, "relu3")


def their_pipeline(raw: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's post-processing of one layer's raw map: ReLU, scale + resize, scale."""
    return scale_cam_image(scale_cam_image(np.maximum(raw.numpy(), 0), SIZE))


def run_theirs(cls: str, model, layer, images, t, **attrs):
    with getattr(pytorch_grad_cam, cls)(model=model, target_layers=[layer], **attrs) as method:
        final = method(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in t])
        acts = method.activations_and_grads.activations[0].numpy()
        grads = method.activations_and_grads.gradients[0].numpy() if method.activations_and_grads.gradients else None
        raw = method.get_cam_image(images, layer, None, acts, grads, False) if cls not in ("ScoreCAM", "AblationCAM") else None
    return final, raw


@pytest.mark.parametrize("which", ["plain", "resnet"])
@pytest.mark.parametrize("ours, theirs", GRADIENT)
def test_gradient_cams_match_pytorch_grad_cam(request, batch, which: str, ours, theirs: str) -> None:
    model, module, name = models(request, which)
    images, t = batch
    final, their_raw = run_theirs(theirs, model, module, images, t)
    raw = ours(model, images, t, name, relu=False, upsample=False)
    np.testing.assert_allclose(raw.numpy(), their_raw, rtol=1e-4, atol=1e-5 * float(np.abs(their_raw).max()))
    np.testing.assert_allclose(their_pipeline(raw), final, atol=1e-4)


@pytest.mark.parametrize("which", ["plain", "resnet"])
def test_eigencam_matches_pytorch_grad_cam_up_to_the_components_sign(request, batch, which: str) -> None:
    model, module, name = models(request, which)
    images, t = batch
    final, their_raw = run_theirs("EigenCAM", model, module, images, t)
    raw = eigencam(model, images, t, name, relu=False, upsample=False).numpy()
    # a singular vector's sign is arbitrary: we orient it, NumPy does not; the magnitudes agree
    sign = np.sign((raw * their_raw).sum(axis=(1, 2)))[:, None, None]
    np.testing.assert_allclose(raw * sign, their_raw, rtol=1e-3, atol=1e-4 * float(np.abs(their_raw).max()))
    np.testing.assert_allclose(their_pipeline(torch.from_numpy(raw * sign)), final, atol=1e-3)
    assert (raw.reshape(len(raw), -1).sum(axis=1) != 0).all()


@pytest.mark.parametrize("which", ["plain", "resnet"])
def test_scorecam_matches_pytorch_grad_cam(request, batch, which: str) -> None:
    model, module, name = models(request, which)
    images, t = batch
    with pytorch_grad_cam.ScoreCAM(model=model, target_layers=[module]) as method:
        method.batch_size = 64
        final = method(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in t])
    raw = scorecam(model, images, t, name, relu=False, upsample=False, batch_size=5)  # other chunking
    np.testing.assert_allclose(their_pipeline(raw), final, atol=1e-4)


@pytest.mark.parametrize("which", ["plain", "resnet"])
def test_ablationcam_matches_pytorch_grad_cam(request, batch, which: str) -> None:
    model, module, name = models(request, which)
    images, t = batch
    final, _ = run_theirs("AblationCAM", model, module, images, t, batch_size=16)
    raw = ablationcam(model, images, t, name, relu=False, upsample=False, batch_size=7)
    np.testing.assert_allclose(their_pipeline(raw), final, atol=1e-4)


@pytest.mark.parametrize("which", ["plain", "resnet"])
def test_fullgrad_matches_pytorch_grad_cam(request, batch, which: str) -> None:
    model = request.getfixturevalue(which)
    images, t = batch
    with pytorch_grad_cam.FullGrad(model=model, target_layers=[]) as method:
        final = method(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in t])
    ours = fullgrad(model, images, t)
    np.testing.assert_allclose(scale_cam_image(ours.numpy()), final, atol=1e-4)


@pytest.mark.parametrize("ours, theirs", [(gradcam, "GradCAM"), (gradcampp, "GradCAMPlusPlus"),
                                          (layercam, "LayerCAM"), (scorecam, "ScoreCAM")])
def test_aug_smooth_matches_pytorch_grad_cam(plain, ours, theirs: str) -> None:
    images, t = torch.randn(2, 3, 10, 14), [1, 4]
    # a full-resolution layer: OpenCV's resize is then the identity and the pipelines coincide exactly
    with getattr(pytorch_grad_cam, theirs)(model=plain, target_layers=[plain.relu1]) as method:
        final = method(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in t], aug_smooth=True)
    smoothed = ours(plain, images, t, "relu1", aug_smooth=True)
    np.testing.assert_allclose(smoothed.numpy(), final, atol=1e-4)
    assert not np.allclose(ours(plain, images, t, "relu1").numpy(), final, atol=1e-2)
