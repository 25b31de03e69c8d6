"""Model summary: torchinfo rows named like ``named_modules()``."""

from __future__ import annotations

import pytest
import torch

from cnnvis.commands.summary import LayerRow, summarize
from cnnvis.errors import CnnvisError
from cnnvis.models import build_model, freeze_backbone


@pytest.fixture(scope="module")
def resnet():
    return build_model("resnet18", num_classes=5, in_channels=3)


def _param_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("arch", ["mnist_cnn", "mnist_classic"])
def test_names_match_named_modules(arch):
    model = build_model(arch, num_classes=10)
    summary = summarize(model, (1, 1, 28, 28))
    names = [row.name for row in summary]
    assert set(names) == {n for n, _ in model.named_modules() if n}
    assert len(names) == len(set(names))
    for row in summary:
        module = model.get_submodule(row.name)
        assert row.type == type(module).__name__
        assert row.calls == 1 and row.output_shape is not None
        assert row.depth == row.name.count(".") + 1
    assert summary["fc" if arch == "mnist_cnn" else "classifier.4"].output_shape == (1, 10)
    assert summary.total_params == _param_count(model)
    assert summary.trainable_params == _param_count(model) and summary.frozen_params == 0
    assert summary.mult_adds == sum(r.mult_adds for r in summary if r.is_leaf) > 0


def test_resnet_names_shapes_and_reused_modules(resnet):
    summary = summarize(resnet, (2, 3, 32, 32))
    for row in summary:
        resnet.get_submodule(row.name)  # every name is a valid --layer
    assert {r.name for r in summary} == {n for n, _ in resnet.named_modules() if n}
    assert summary["layer4.1.conv2"].output_shape == (2, 512, 1, 1)
    assert summary["layer2.0.downsample.0"].type == "Conv2d"
    assert summary["layer1.0.relu"].calls == 2  # BasicBlock calls its relu twice
    assert summary["layer1"].num_params == _param_count(resnet.layer1)
    leaves = [r for r in summary if r.name.startswith("layer1.") and r.is_leaf]
    assert summary["layer1"].mult_adds == sum(r.mult_adds for r in leaves) > 0
    assert summary.total_params == _param_count(resnet)
    assert "layer3.1" in summary and "layer9" not in summary


def test_frozen_and_partially_frozen_layers():
    model = build_model("mnist_cnn", num_classes=10)
    freeze_backbone(model)
    summary = summarize(model)
    assert summary["features"].trainable == "frozen"
    assert summary["features.0"].trainable == "frozen"
    assert summary["fc"].trainable == "trainable"
    assert summary["features.2"].trainable == "-"  # ReLU: no parameters
    assert summary.trainable_params == _param_count(model, trainable_only=True) == _param_count(model.fc)
    assert summary.frozen_params == _param_count(model.features)
    model.features[0].weight.requires_grad_(True)
    summary = summarize(model)
    assert summary["features"].trainable == "partial"
    assert summary["features"].trainable_params == model.features[0].weight.numel()


def test_modes_batchnorm_stats_and_grads_are_untouched():
    model = build_model("mnist_cnn", num_classes=10)
    model.train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    modes = {n: m.training for n, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    summarize(model, (4, 1, 28, 28))
    assert {n: m.training for n, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    summarize(model)
    assert not any(m.training for m in model.modules())


def test_input_size_without_batch_and_bad_input():
    model = build_model("mnist_cnn", num_classes=10)
    summary = summarize(model, (1, 28, 28))
    assert summary.input_size == (1, 1, 28, 28)
    assert isinstance(summary[0], LayerRow) and len(summary[:3]) == 3
    with pytest.raises(CnnvisError, match=r"input of size \[1, 3, 28, 28\]"):
        summarize(model, (1, 3, 28, 28))
    assert model.training  # restored after the failure too
