"""Small seeded models and state-checking helpers for the visualisation-method tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters (eval != train)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


class TinyCNN(nn.Module):
    """Conv-BN-ReLU(inplace) x2, dropout, GAP, linear: the shape of mnist_cnn, a fraction of its cost."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(width, num_classes)
        randomize_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.avgpool(self.features(x)).flatten(1)))


class PlainNet(nn.Module):
    """Distinct, non-in-place ReLU modules and no BN: what Captum's module-hook methods need."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.relu3(self.conv3(x))
        return self.fc(self.avgpool(x).flatten(1))


class FailingNet(TinyCNN):
    """Raises inside forward (after the feature hooks ran) on the ``fail_on``-th call."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        feats = self.features(x)
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        return self.fc(self.dropout(self.avgpool(feats).flatten(1)))


def mixed_state(model: nn.Module) -> nn.Module:
    """Training mode with one submodule in eval and one parameter frozen: flags worth restoring."""
    model.train()
    model.features[1].eval()
    model.features[0].weight.requires_grad_(False)
    return model


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m), getattr(m, "inplace", None)) for name, m in model.named_modules()],
    }


def hooks_left(model: nn.Module) -> list[str]:
    found = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, attr, None):
                found.append(f"{name or '<root>'}.{attr}")
    return found


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    """No hooks left; every train/eval flag, requires_grad flag, buffer and weight as before."""
    assert hooks_left(model) == []
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


class LinearMapNet(nn.Module):
    """Hand-set weights: 1x1 conv (channels x and 2x), GAP, linear. Every map is known on paper."""

    def __init__(self, fc_weight: list[list[float]], fc_bias: list[float] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, len(fc_weight))
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor(fc_weight))
            self.fc.bias.copy_(torch.tensor(fc_bias or [0.0] * len(fc_weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.conv(x)).flatten(1))


class SignNet(nn.Module):
    """logit0 = mean(relu(x)) - mean(relu(-x)) = mean(x); logit1 = 0, with the ReLU applied in a chosen way.

    Plain gradient: 1/HW everywhere. Guided backprop: the negative upstream gradient into relu(-x)
    is dropped, so it is 1/HW where x > 0 and 0 elsewhere -- but only if *both* ReLU calls are guided.
    """

    def __init__(self, flavour: str) -> None:
        super().__init__()
        self.flavour = flavour
        self.act = nn.ReLU(inplace=flavour == "module_inplace")
        self.act2 = nn.ReLU(inplace=flavour == "module_inplace")

    def _relu(self, x: torch.Tensor, second: bool) -> torch.Tensor:
        f = self.flavour
        if f == "reused_module":
            return self.act(x)
        if f in ("module", "module_inplace"):
            return (self.act2 if second else self.act)(x)
        if f == "F.relu":
            return F.relu(x)
        if f == "F.relu_inplace":
            return F.relu(x, inplace=True)
        if f == "torch.relu":
            return torch.relu(x)
        if f == "tensor.relu":
            return x.relu()
        if f == "tensor.relu_":
            y = x.clone()
            y.relu_()  # side effect only: the return value is ignored on purpose
            return y
        raise ValueError(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self._relu(x * 1.0, second=False)
        neg = self._relu(-x, second=True)
        logit0 = (pos - neg).mean(dim=(1, 2, 3))
        return torch.stack([logit0, torch.zeros_like(logit0)], dim=1)


def scaled_plain_net() -> PlainNet:
    """A :class:`PlainNet` in eval mode with its weights tripled, so the logits and maps of the
    parity tests are far from zero (float tolerance then means something)."""
    model = PlainNet().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model
