"""What a user sees: maps land where the evidence is, models stay intact, odd models are handled."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from vis_helpers import (
    SignNet,
    TinyCNN,
    assert_untouched,
    randomize_batchnorm,
    snapshot,
)

from cnnvis.models import build_model
from cnnvis.vis import (
    UnsupportedModelError,
    cam,
    gradcam,
    guided_backprop,
    normalize_maps,
    occlusion,
    occlusion_maps,
    run_method,
    saliency,
)


class LeftHalfNet(nn.Module):
    """Only the left half of the image reaches the convolutions (no biases, so the right half stays 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(x)
        keep[..., : x.shape[-1] // 2] = 1
        return self.fc(self.avgpool(self.features(x * keep)).flatten(1))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "occlusion", "saliency", "integrated-gradients",
                                    "smoothgrad", "guided-backprop", "guided-gradcam", "cam",
                                    "deconvnet", "input-x-gradient", "smoothgrad-sq", "vargrad",
                                    "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam"])
def test_maps_put_their_mass_on_the_half_the_model_reads(method: str) -> None:
    model = LeftHalfNet().eval()
    images = torch.rand(3, 1, 12, 20)  # wide image: a height/width mix-up would show
    maps = run_method(method, model, images, "pred")
    mass = maps.abs().sum(dim=1)  # [N, W]
    left, right = mass[:, :10].sum(dim=1), mass[:, 10:].sum(dim=1)
    assert (left > 0).all()
    # two 3x3 convs see 2 px across the border (cols 10, 11); beyond that there is nothing
    assert (right <= 0.2 * left).all() and (mass[:, 12:].sum(dim=1) <= 1e-6 * left).all()


@pytest.mark.parametrize("flavour", ["module", "module_inplace", "reused_module", "F.relu", "F.relu_inplace",
                                     "torch.relu", "tensor.relu", "tensor.relu_"])
def test_guided_backprop_reaches_every_kind_of_relu_call(flavour: str) -> None:
    net = SignNet(flavour)
    before = snapshot(net)
    x = torch.tensor([[0.5, -1.0], [2.0, -0.25]]).view(1, 1, 2, 2)
    # only correct if *both* ReLU calls are guided: the second one gets a negative gradient
    expected = (x[0, 0] > 0).float() * 0.25
    torch.testing.assert_close(guided_backprop(net, x, 0, reduce=None)[0, 0], expected)
    assert_untouched(net, before)  # same modules, same inplace flags, no hooks
    # and outside the call the model computes plain ReLUs again
    torch.testing.assert_close(saliency(net, x, 0, reduce=None)[0, 0], torch.full((2, 2), 0.25))


def test_guided_backprop_leaves_resnet_intact() -> None:
    model = randomize_batchnorm(resnet18(weights=None, num_classes=4))
    model.train()
    before = snapshot(model)
    reference = copy.deepcopy(model).eval()
    images = torch.randn(2, 3, 32, 32)
    guided = guided_backprop(model, images, [0, 1])
    assert guided.shape == (2, 32, 32)
    assert_untouched(model, before)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    model.eval()
    torch.testing.assert_close(model(images), reference(images))


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam", "deconvnet"])
def test_guided_methods_refuse_a_model_without_relu(method: str) -> None:
    model = build_model("mnist_classic", 10)  # tanh everywhere
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="no ReLU"):
        run_method(method, model, torch.randn(1, 1, 28, 28))
    assert_untouched(model, before)


def test_cam_refuses_a_model_without_gap_and_linear_head() -> None:
    with pytest.raises(UnsupportedModelError, match="global average pooling.*gradcam"):
        cam(build_model("mnist_classic", 10), torch.randn(1, 1, 28, 28))


def _reference_gradcam(model: nn.Module, images: torch.Tensor, target: int, layer: str) -> torch.Tensor:
    """Grad-CAM computed the slow, obvious way: the hook hands a copy downstream, so in-place ops
    after the layer cannot touch the tensor we differentiate against."""
    store = {}

    def hook(_m, _i, out):
        store["a"] = out
        return out.clone()

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        model.eval()
        logits = model(images)
        (g,) = torch.autograd.grad(logits[:, target].sum(), store["a"])
    finally:
        handle.remove()
    a = store["a"].detach()
    return (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1).clamp(min=0)


@pytest.mark.parametrize("arch, layer", [
    ("resnet18", "layer4.1.bn2"),  # its output is then modified by `out += identity` and ReLU(inplace)
    ("resnet18", "layer3"),
    ("resnet18", "layer2.0.relu"),  # a ReLU module reused twice per block: the last call counts
    ("mnist_cnn", "features.12"),  # BatchNorm followed by ReLU(inplace=True)
    ("mnist_cnn", "features.13"),  # the in-place ReLU itself (the default layer)
])
def test_gradcam_with_inplace_relu_and_residual_adds(arch: str, layer: str) -> None:
    model = randomize_batchnorm(build_model(arch, 5, in_channels=3 if arch == "resnet18" else 1))
    images = torch.randn(2, 3 if arch == "resnet18" else 1, 32, 24)
    with pytest.warns(UserWarning, match="ran 2 times") if layer.endswith("relu") else _nothing():
        ours = gradcam(model, images, 3, layer, upsample=False)
    torch.testing.assert_close(ours, _reference_gradcam(model, images, 3, layer), rtol=1e-4, atol=1e-6)
    if layer.endswith("bn2"):
        assert (ours > 0).any()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_an_untrained_zero_head_gives_zero_gradcam_and_normalises_without_nan() -> None:
    model = TinyCNN()
    with torch.no_grad():
        model.fc.weight.zero_()
    maps = gradcam(model, torch.randn(2, 1, 12, 12))
    assert torch.equal(maps, torch.zeros_like(maps))
    with pytest.warns(RuntimeWarning, match="constant"):
        assert torch.equal(normalize_maps(maps), torch.zeros_like(maps))


def test_occlusion_reports_the_class_predicted_at_each_window() -> None:
    # class 0 reads the top-left 4x4 block, class 1 is a constant 0.5
    class Blocky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x)[:, 0, :4, :4].mean(dim=(1, 2))
            return torch.stack([a, torch.full_like(a, 0.5)], dim=1)

    model = Blocky()
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
        model.conv.bias.zero_()
    maps = occlusion_maps(model, torch.ones(1, 1, 8, 8), 0, window=4, stride=4, score="prob")
    assert maps.predicted[0].tolist() == [[1, 0], [0, 0]]  # covering the block flips the decision
    assert maps.heatmap[0, :4, :4].min() > 0 and maps.heatmap[0, 4:, :].abs().max() == 0
    assert maps.targets.tolist() == [0] and torch.all(maps.base_score > 0.6)


def test_no_tensor_survives_a_call() -> None:
    model = TinyCNN()
    seen = []
    handle = model.features[4].register_forward_hook(lambda _m, _i, out: seen.append(weakref.ref(out)))
    try:
        for method in ("gradcam", "saliency", "activations", "occlusion", "guided-gradcam"):
            run_method(method, model, torch.randn(2, 1, 12, 12))
    finally:
        handle.remove()
    gc.collect()
    assert seen and all(ref() is None for ref in seen)


def test_occlusion_probability_drop_defaults() -> None:
    model = TinyCNN()
    images = torch.randn(2, 1, 28, 28)
    maps = occlusion_maps(model, images)
    assert maps.window == (4, 4) and maps.stride == (2, 2) and maps.drop.shape == (2, 13, 13)
    assert (maps.base_score <= 1).all() and (maps.score <= 1).all()  # probabilities
    torch.testing.assert_close(occlusion(model, images), maps.heatmap)
