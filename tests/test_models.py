"""Model registry: every architecture builds with the right head, freezing, pretrained names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnvis.checkpoint import save_checkpoint
from cnnvis.errors import CheckpointError, ConfigError
from cnnvis.models import (
    ARCHITECTURES,
    MnistCNN,
    build_model,
    freeze_backbone,
    head_module,
    set_train_mode,
)

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def test_registry_lists_every_architecture():
    assert set(ARCHITECTURES) == {"mnist_cnn", "mnist_classic", "resnet_small", *RESNETS}


@pytest.mark.parametrize(
    "arch, num_classes, in_channels, size",
    [
        ("mnist_cnn", 10, 1, 28),
        ("mnist_cnn", 5, 3, 32),
        ("mnist_classic", 10, 1, 28),
        ("mnist_classic", 7, 3, 32),
        ("resnet18", 5, 3, 32),
        ("resnet18", 10, 1, 28),
        ("resnet_small", 5, 3, 96),
        ("resnet_small", 10, 1, 28),
    ],
)
def test_forward_gives_one_logit_per_class(arch, num_classes, in_channels, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes, in_channels=in_channels, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", RESNETS[1:])
def test_deeper_resnets_get_a_resized_head(arch):
    # Building is cheap; a forward pass of the deep ones would only slow the suite down.
    model = build_model(arch, 5, in_channels=3, image_size=64)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 5
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_resnet_reads_one_channel_digits():
    model = build_model("resnet34", 10, in_channels=1, image_size=28)
    assert model.conv1.in_channels == 1


def test_dropout_goes_in_front_of_the_head():
    model = build_model("resnet18", 4, in_channels=3, dropout=0.3)
    assert isinstance(model.fc, nn.Sequential)
    assert isinstance(model.fc[0], nn.Dropout) and model.fc[0].p == 0.3
    assert model.fc[1].out_features == 4
    assert build_model("mnist_cnn", 10, dropout=0.2).dropout.p == 0.2


def test_default_mnist_cnn_ends_in_global_average_pooling_and_one_linear_layer():
    """The precondition of the original CAM: logits = fc(mean over H, W of the last feature maps)."""
    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10).eval()
    assert isinstance(model, MnistCNN)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and isinstance(model.fc, nn.Linear)
    assert list(dict(model.named_children()))[-1] == "fc"
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        maps = model.features(x)
        by_hand = maps.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
        assert torch.allclose(model(x), by_hand, atol=1e-5)
    assert model.fc.in_features == maps.shape[1]


@pytest.mark.parametrize("arch, in_channels", [("mnist_cnn", 1), ("resnet18", 3)])
def test_freeze_backbone_leaves_only_the_head_trainable(arch, in_channels):
    model = build_model(arch, 5, in_channels=in_channels, freeze="backbone")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(frozen) > 2


def test_freeze_backbone_with_dropout_head():
    model = build_model("resnet18", 5, in_channels=3, freeze="backbone", dropout=0.5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.1.weight", "fc.1.bias"}


def test_freeze_backbone_classic_net_trains_its_classifier_only():
    model = build_model("mnist_classic", 10, freeze="backbone")
    assert all(not p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert head_module(model) is model.classifier


def test_freeze_none_trains_everything():
    model = build_model("mnist_cnn", 10)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_backbone_gets_no_gradient():
    model = build_model("mnist_cnn", 10, freeze="backbone")
    loss = model(torch.randn(4, 1, 28, 28)).sum()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))
    assert model.fc.weight.grad is not None


def test_freeze_backbone_on_a_model_without_head():
    with pytest.raises(CheckpointError, match="cannot find the classification head of Sequential"):
        freeze_backbone(nn.Sequential(nn.Conv2d(2, 2, 1)))


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        build_model("vgg16", 10)
    for name in ARCHITECTURES:
        assert name in str(info.value)


@pytest.mark.parametrize("arch", RESNETS)
def test_bad_pretrained_name_lists_valid_names(arch, no_network):
    with pytest.raises(ConfigError) as info:
        build_model(arch, 5, in_channels=3, pretrained="IMAGENET1K_V9")
    message = str(info.value)
    assert "'IMAGENET1K_V9'" in message
    assert "IMAGENET1K_V1" in message


def test_pretrained_name_on_a_digit_net_is_a_config_error(no_network):
    with pytest.raises(ConfigError, match="model.pretrained = 'IMAGENET1K_V1'"):
        build_model("mnist_cnn", 10, pretrained="IMAGENET1K_V1")


def test_weights_download_without_network_is_a_config_error(monkeypatch):
    import torchvision.models._api as api

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ConfigError, match="could not download the resnet18 weights 'IMAGENET1K_V1'"):
        build_model("resnet18", 5, in_channels=3, pretrained="IMAGENET1K_V1")


def test_pretrained_checkpoint_of_another_class_count_gives_the_backbone(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet18", 5, in_channels=3)
    path = tmp_path / "flowers.pt"
    save_checkpoint({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(1)
    model = build_model("resnet18", 102, in_channels=3, pretrained=str(path), freeze="backbone")
    assert model.fc.out_features == 102
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_mean, source.bn1.running_mean)


def test_pretrained_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "digits.pt"
    torch.save(build_model("mnist_cnn", 10).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model("resnet18", 5, in_channels=3, pretrained=str(path))


def test_pretrained_checkpoint_for_a_digit_net(tmp_path):
    torch.manual_seed(0)
    source = build_model("mnist_cnn", 10)
    path = tmp_path / "digits.pt"
    torch.save(source.state_dict(), path)
    model = build_model("mnist_cnn", 10, pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(CheckpointError, match="shape"):
        build_model("mnist_cnn", 5, pretrained=str(path))


def test_resnet_small_is_a_tenth_of_resnet18_with_its_layer_names_and_a_cam_head():
    from cnnvis.vis import cam, default_layer

    small, big = build_model("resnet_small", 5, 3, 96), build_model("resnet18", 5, 3, 96)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) == 1_231_525 and count(small) < count(big) / 9
    assert default_layer(small) == default_layer(big) == "layer4"
    small.eval()
    maps = cam(small, torch.randn(2, 3, 96, 96))  # global average pooling + one linear layer
    assert maps.shape == (2, 96, 96)
    blocks = [m for m in small.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 4 and all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in blocks)  # residuals start as identity


# ---------------------------------------------------------------------------- library models


@pytest.mark.parametrize("arch, trained", [
    ("torchvision:resnet18", {"fc.weight", "fc.bias"}),
    ("torchvision:vgg11", {"classifier.6.weight", "classifier.6.bias"}),
    ("torchvision:mobilenet_v3_small", {"classifier.3.weight", "classifier.3.bias"}),
    ("torchvision:densenet121", {"classifier.weight", "classifier.bias"}),
    ("torchvision:vit_b_16", {"heads.head.weight", "heads.head.bias"}),
    ("timm:resnet18", {"fc.weight", "fc.bias"}),
    ("timm:convnext_atto", {"head.fc.weight", "head.fc.bias"}),
])
def test_freeze_backbone_trains_the_head_found_in_any_library_model(arch, trained):
    with torch.device("meta"):  # the structure without the cost of initialising big weights
        model = build_model(arch, 5, in_channels=3, image_size=224, freeze="backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert [p.shape[0] for p in head_module(model).parameters()] == [5, 5]


def test_head_keeps_the_dropout_right_before_it():
    with torch.device("meta"):
        model = build_model("torchvision:mobilenet_v3_small", 5, in_channels=3, image_size=224)
    head = head_module(model)
    assert isinstance(head, nn.Sequential) and isinstance(head[0], nn.Dropout) and head[1] is model.classifier[3]


def test_frozen_backbone_trains_in_eval_mode():
    model = build_model("torchvision:mobilenet_v3_small", 5, in_channels=3, freeze="backbone")
    set_train_mode(model, "backbone")
    head = set(head_module(model).modules())
    assert all(m.training == (m in head) for m in model.modules())
    set_train_mode(model, "none")
    assert all(m.training for m in model.modules())


def test_grey_images_into_an_rgb_library_model():
    model = build_model("torchvision:mobilenet_v3_small", 10, in_channels=1).eval()
    assert model.features[0][0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["torchvision:vit_b_16", "timm:vit_tiny_patch16_224"])
def test_a_fixed_size_transformer_names_the_size_it_needs(arch):
    with torch.device("meta"), pytest.raises(ConfigError, match="reads 224 px images only.*image_size=224"):
        build_model(arch, 5, in_channels=3, image_size=128)
