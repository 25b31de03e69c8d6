"""Model summary: rows named like ``named_modules()``, mult-adds as counted by hand."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import VisionTransformer

from cnnvis.commands.summary import LayerRow, summarize, summarize_source
from cnnvis.errors import CnnvisError
from cnnvis.models import build_model, freeze_backbone
from cnnvis.vis.hooks import capture


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
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no hook left behind


# --------------------------------------------------------------------------- mult-adds
def _small_vit(num_layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=num_layers, num_heads=2, hidden_dim=16,
                             mlp_dim=32, num_classes=5)


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))


def test_vit_mult_adds_count_every_token_and_attention():
    summary = summarize(_small_vit(), (1, 3, 32, 32))
    tokens, dim, mlp, heads = 4 * 4 + 1, 16, 32, 2  # 16 patches and the class token
    # by hand: each Linear once per token; attention: q, k, v and out projections plus QK^T and AV
    assert summary["encoder.layers.encoder_layer_0.mlp.0"].mult_adds == tokens * dim * mlp
    attention = tokens * dim * 3 * dim + tokens * dim * dim + 2 * heads * tokens * tokens * (dim // heads)
    assert summary["encoder.layers.encoder_layer_0.self_attention"].mult_adds == attention
    block = attention + 2 * tokens * dim * mlp
    assert summary["encoder.layers.encoder_layer_1"].mult_adds == block
    patches = 16 * dim * 3 * 8 * 8
    assert summary["conv_proj"].mult_adds == patches
    assert summary.mult_adds == patches + 2 * block + dim * 5


def test_cnn_mult_adds_by_hand_and_resnet18_known_figure():
    summary = summarize(_small_cnn(), (2, 3, 8, 8))
    conv = 2 * 8 * 8 * 8 * 3 * 9  # per output value: 3 channels x 3x3 kernel, batch of 2
    assert summary["0"].mult_adds == conv and summary["5"].mult_adds == 2 * 8 * 5
    assert summary["1"].mult_adds == summary["2"].mult_adds == 0  # norms and activations are not counted
    assert summary.mult_adds == conv + 2 * 8 * 5
    resnet18 = torchvision.models.resnet18(weights=None)
    assert summarize(resnet18, (1, 3, 224, 224)).mult_adds == pytest.approx(1.814e9, rel=0.005)


def test_pt2_program_counts_like_its_model(tmp_path):
    model = _small_cnn().eval()
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "small.pt2"
    torch.export.save(program, path)
    summary, _ = summarize_source(path)
    eager = summarize(model, summary.input_size)
    assert summary.mult_adds == eager.mult_adds > 0
    assert summary["0"].mult_adds == eager["0"].mult_adds != summary["0"].num_params  # not its parameter count
    assert summary["0"].output_shape == eager["0"].output_shape


# --------------------------------------------------------------------------- what --layer takes
def test_only_layers_that_ran_and_return_a_tensor_are_offered():
    model = _small_vit()
    summary = summarize(model, (1, 3, 32, 32))
    tree = [n for n, _ in model.named_modules() if n]
    assert [r.name for r in summary] == tree  # every module, in tree order
    out_proj = summary["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert out_proj.calls == 0 and not out_proj.usable  # MultiheadAttention uses its weights, never calls it
    attention = summary["encoder.layers.encoder_layer_0.self_attention"]
    assert attention.output_type == "tuple" and not attention.usable
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" not in summary.names
    assert "encoder.layers.encoder_layer_0.self_attention" not in summary.names
    assert summary.names == [n for n in tree if n in summary.names]
    with capture(model, summary.names) as cap:  # every offered name works with --layer
        model(torch.randn(1, 3, 32, 32))
        assert all(cap.value(name).shape[0] == 1 for name in summary.names)


def test_layer_errors_name_a_usable_layer():
    model = _small_vit()
    with pytest.raises(CnnvisError, match=r"not a tensor.*'encoder\.layers\.encoder_layer_1'"):
        with capture(model, "encoder.layers.encoder_layer_1.self_attention"):
            model(torch.randn(1, 3, 32, 32))
    with capture(model, "encoder.layers.encoder_layer_1.self_attention.out_proj") as cap:
        model(torch.randn(1, 3, 32, 32))
        with pytest.raises(CnnvisError, match="did not run.*use its weights"):
            cap.value("encoder.layers.encoder_layer_1.self_attention.out_proj")
