"""Guided backprop and the deconvnet at every rectifier: ReLU6, clamps, LeakyReLU, PReLU -- as
modules, functions, in place or not, and through the fused copy -- and a word when they cannot apply."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2
from vis_helpers import assert_untouched, randomize_batchnorm, snapshot

from cnnvis.errors import UnsupportedModelError, VisWarning
from cnnvis.vis import deconvnet, guided_backprop, input_gradients, run_method, saliency
from cnnvis.vis.fused import gradient_copy
from cnnvis.vis.rectifier_rules import rectifier_rule

X = torch.tensor([-1.0, 1.0, 3.0, 7.0]).view(1, 1, 2, 2)


class PairNet(nn.Module):
    """logit0 = mean(f(x)) - mean(f(-x)): the upstream gradient is +1/4 into f(x) and -1/4 into f(-x).

    By hand, with f' the activation's derivative:
    plain ``(f'(x) + f'(-x)) / 4``; guided ``f'(x) / 4`` (the negative signal into f(-x) is dropped);
    deconvnet ``1/4`` everywhere (``relu(1/4)`` through f(x), nothing through f(-x), no forward gate).
    """

    def __init__(self, make: Callable[[], Callable[[torch.Tensor], torch.Tensor]]) -> None:
        super().__init__()
        self.act, self.act2 = make(), make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit0 = (self.act(x * 1.0) - self.act2(-x)).mean(dim=(1, 2, 3))
        return torch.stack([logit0, torch.zeros_like(logit0)], dim=1)


def _prelu() -> nn.PReLU:
    act = nn.PReLU()
    with torch.no_grad():
        act.weight.fill_(0.2)
    return act


def _window(lo: float, hi: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: ((x > lo) & (x < hi)).float()


def _slope(a: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.where(x > 0, 1.0, a)


RECTIFIERS = {  # name: (activation maker, the activation's derivative)
    "nn.ReLU6": (nn.ReLU6, _window(0, 6)),
    "nn.ReLU6(inplace)": (lambda: nn.ReLU6(inplace=True), _window(0, 6)),
    "F.relu6": (lambda: F.relu6, _window(0, 6)),
    "F.relu6(inplace)": (lambda: lambda x: F.relu6(x, inplace=True), _window(0, 6)),
    "torch._C._nn.relu6_": (lambda: torch._C._nn.relu6_, _window(0, 6)),
    "F.hardtanh(0, 6)": (lambda: lambda x: F.hardtanh(x, 0.0, 6.0), _window(0, 6)),
    "F.hardtanh_(0, 6)": (lambda: lambda x: F.hardtanh_(x, 0.0, 6.0), _window(0, 6)),
    "nn.Hardtanh(0.5, 4)": (lambda: nn.Hardtanh(0.5, 4.0), _window(0.5, 4)),
    "nn.LeakyReLU(0.1)": (lambda: nn.LeakyReLU(0.1), _slope(0.1)),
    "nn.LeakyReLU(0.1, inplace)": (lambda: nn.LeakyReLU(0.1, inplace=True), _slope(0.1)),
    "F.leaky_relu": (lambda: lambda x: F.leaky_relu(x, 0.1), _slope(0.1)),
    "F.leaky_relu_": (lambda: lambda x: F.leaky_relu_(x, 0.1), _slope(0.1)),
    "nn.PReLU(0.2)": (_prelu, _slope(0.2)),
}


@pytest.mark.parametrize("name", list(RECTIFIERS))
def test_guided_and_deconvnet_rules_by_hand_for_every_rectifier(name: str) -> None:
    make, derivative = RECTIFIERS[name]
    net = PairNet(make)
    before = snapshot(net)
    d_pos, d_neg = derivative(X[0, 0]), derivative(-X[0, 0])
    torch.testing.assert_close(guided_backprop(net, X, 0, reduce=None)[0, 0], d_pos / 4)
    torch.testing.assert_close(deconvnet(net, X, 0, reduce=None)[0, 0], torch.full((2, 2), 0.25))
    # the guided map is not the plain gradient here, and outside the call the model is plain again
    plain = saliency(net, X, 0, reduce=None)[0, 0]
    torch.testing.assert_close(plain, (d_pos + d_neg) / 4)
    assert not torch.allclose(plain, d_pos / 4)
    assert_untouched(net, before)


class MixedNet(nn.Module):
    """Conv-BN-ReLU6 module, then functional LeakyReLU, in-place clamp and ReLU, and GELU / SiLU."""

    def __init__(self, smooth: bool) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6()
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.smooth = nn.Sequential(nn.GELU(), nn.SiLU(), nn.GELU()) if smooth else nn.Identity()
        self.fc = nn.Linear(6, 3)
        randomize_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.act1(self.bn1(self.conv1(x))), 0.2)
        x = F.hardtanh_(self.bn2(self.conv2(x)), 0.0, 3.0)
        x = torch.relu(self.smooth(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_the_fused_copy_still_calls_the_rectifiers_the_rule_rewrites(rule: str) -> None:
    model = MixedNet(smooth=False).eval()
    images = torch.randn(3, 1, 9, 11)
    fast, laid_out = gradient_copy(model, images)
    assert fast is not model  # the BN-folded traced copy is what the methods run
    with rectifier_rule(rule) as on_copy:
        through_copy = input_gradients(fast, laid_out, [0, 1, 2])
    with rectifier_rule(rule) as on_model:  # under a mode no copy is made: the model itself
        direct = input_gradients(model, images, [0, 1, 2])
    assert on_copy.applied == on_model.applied == {"ReLU6": 1, "LeakyReLU": 1, "Hardtanh": 1, "ReLU": 1}
    torch.testing.assert_close(through_copy, direct, rtol=1e-4, atol=1e-6)
    method = guided_backprop if rule == "guided" else deconvnet
    torch.testing.assert_close(method(model, images, [0, 1, 2], reduce=None), direct, rtol=1e-4, atol=1e-6)


def test_mobilenet_v2_is_guided_at_all_35_relu6() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(mobilenet_v2(weights=None, num_classes=4)).eval()
    images = torch.randn(2, 3, 32, 32)
    fast, laid_out = gradient_copy(model, images)
    with rectifier_rule("guided") as mode:
        guided = input_gradients(fast, laid_out, [0, 3])
    assert mode.applied == {"ReLU6": 35} and not mode.plain
    plain = saliency(model, images, [0, 3], reduce=None)
    assert (guided - plain).abs().amax() > 0.1 * plain.abs().amax()  # Captum would return `plain` here
    torch.testing.assert_close(guided_backprop(model, images, [0, 3], reduce=None), guided)


@pytest.mark.parametrize("method", ["guided-backprop", "deconvnet", "guided-gradcam"])
def test_activations_without_a_rule_are_named_in_one_warning(method: str) -> None:
    model = MixedNet(smooth=True).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_method(method, model, torch.randn(2, 1, 8, 8), layer="conv2" if method == "guided-gradcam" else None)
    ours = [w for w in caught if issubclass(w.category, VisWarning)]
    assert len(ours) == 1
    title = "deconvnet" if method == "deconvnet" else "guided backprop"
    assert str(ours[0].message) == (f"{title} applied at 4 ReLU6/LeakyReLU/Hardtanh/ReLU calls; 2 GELU, 1 SiLU calls "
                                    f"pass the plain gradient (no {title} rule for them)")


def test_a_model_with_only_smooth_activations_is_refused_naming_them() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3), nn.ELU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 1, 8, 8))
    with pytest.raises(UnsupportedModelError, match=r"deconvnet found no ReLU call .*it calls 1 GELU, 1 ELU"):
        deconvnet(model, torch.randn(1, 1, 8, 8))


def test_hardtanh_around_zero_is_no_rectifier() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Hardtanh(-1.0, 1.0), nn.Flatten(), nn.Linear(36, 2))
    with pytest.raises(UnsupportedModelError, match="guided backprop found no ReLU"):
        guided_backprop(model, torch.randn(1, 1, 5, 5))
