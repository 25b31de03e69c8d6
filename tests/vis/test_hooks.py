"""The shared helper: layer lookup and defaults, target normalisation, clean-up guarantees."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from vis_helpers import TinyCNN, assert_untouched, mixed_state, snapshot

from cnnvis.errors import UnsupportedModelError
from cnnvis.models import build_model
from cnnvis.vis import (
    LayerNotFoundError,
    VisError,
    activations,
    capture,
    default_layer,
    get_layer,
    resolve_targets,
)


@pytest.mark.parametrize("arch, size, expected", [
    ("mnist_cnn", 28, "features.13"), ("mnist_classic", 28, "features.6"), ("resnet18", 64, "layer4"),
    ("resnet50", 64, "layer4"), ("resnet_small", 64, "layer4"),
])
def test_default_layer_is_the_last_conv_stage(arch: str, size: int, expected: str) -> None:
    channels = 3 if arch.startswith("resnet") else 1
    model = build_model(arch, 10, in_channels=channels)
    assert default_layer(model, torch.randn(2, channels, size, size)) == expected
    assert default_layer(model) == expected  # no images: a sample of the size the model declares, else 224 px
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_default_layer_for_a_plain_sequential_and_errors() -> None:
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    assert default_layer(seq, torch.randn(1, 1, 12, 12)) == "4"  # the last ReLU, not the pooled maps after it
    with pytest.raises(UnsupportedModelError, match="no spatial feature map"):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), torch.randn(1, 1, 4, 4))
    with pytest.raises(UnsupportedModelError, match="no nn.Conv2d layer to tell its input; pass images"):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)))


def test_the_probe_leaves_the_model_as_it_was() -> None:
    model = mixed_state(TinyCNN())
    before = snapshot(model)
    with torch.inference_mode():
        assert default_layer(model, torch.randn(3, 1, 8, 8)) == "features.6"
    assert_untouched(model, before)  # hooks gone, train/eval per submodule, requires_grad, BN statistics


def test_default_layer_follows_execution_order_not_registration_order() -> None:
    class Backwards(nn.Module):  # registers its head first and its stem last
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.deep = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.deep(self.stem(x)).mean(dim=(2, 3)))

    model = Backwards()
    assert default_layer(model, torch.randn(1, 1, 8, 8)) == "deep.1"
    # the answer is cached per input shape, and a changed model is probed again
    model.deep = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    assert default_layer(model, torch.randn(1, 1, 8, 8)) == "deep.1"
    model.deep.append(nn.Conv2d(4, 4, 1))
    assert default_layer(model, torch.randn(1, 1, 8, 8)) == "deep.3"


def test_a_transformer_calling_its_attention_by_keyword_gets_the_norm_before_it() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(x)
            return x + self.attn(query=y, key=y, value=y, need_weights=False)[0]

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patches = nn.Conv2d(3, 8, 4, stride=4)
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.blocks(self.patches(x).flatten(2).transpose(1, 2))
            return self.head(tokens.mean(dim=1))

    model = Tiny()
    assert default_layer(model, torch.randn(1, 3, 16, 16)) == "blocks.1.norm"  # not the patch embedding


def test_unknown_layer_names_the_nearest_ones_first() -> None:
    model = build_model("mnist_cnn", 10)
    with pytest.raises(LayerNotFoundError) as info:
        get_layer(model, "features.99")
    message = str(info.value)
    assert message.startswith("no layer 'features.99' in MnistCNN; did you mean features.9")
    assert "features.13" in message and "avgpool" in message and "fc" in message  # a small model: every name
    assert get_layer(model, "features.0") is model.features[0]
    big = build_model("resnet50", 10, in_channels=3)
    with pytest.raises(LayerNotFoundError) as info:
        get_layer(big, "layer5")
    message = str(info.value)
    guesses, rest = message.split("?", 1)
    assert "did you mean" in guesses and "layer4" in guesses  # the near names, not 150 of them
    assert "layer4.2.conv3" not in message and "150 layer names in all" in rest and "\n" not in message


def test_targets_are_normalised_once() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]])
    assert resolve_targets("pred", logits).tolist() == [1, 0]
    assert resolve_targets(2, logits).tolist() == [2, 2]
    assert resolve_targets([2, 0], logits).tolist() == [2, 0]
    assert resolve_targets(torch.tensor([1, 2]), logits).dtype == torch.long
    for bad, msg in [(3, "out of range.*3 classes"), ([0, 1, 2], "3 targets for 2 images"), ("best", "'pred'"),
                     (torch.tensor([0.5, 1.0]), "integer"), (True, "'pred'")]:
        with pytest.raises(VisError, match=msg):
            resolve_targets(bad, logits)


def test_capture_restores_every_flag_when_the_body_raises() -> None:
    model = mixed_state(TinyCNN())
    before = snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with capture(model, ["features.2", "features.5"], grads=True) as cap:
            assert not model.training and not model.features[1].training
            assert not any(p.requires_grad for p in model.parameters())
            model(torch.randn(1, 1, 8, 8, requires_grad=True))
            assert set(cap.values) == {"features.2", "features.5"}
            1 / 0
    assert_untouched(model, before)
    assert cap.values == {}  # nothing kept after the call


def test_snapshots_are_taken_before_later_inplace_ops() -> None:
    model = TinyCNN().eval()
    images = torch.randn(2, 1, 8, 8)
    out = activations(model, images, ["features.1", "features.2"])  # BatchNorm, then ReLU(inplace=True)
    assert (out["features.1"] < 0).any()  # the BN output as it was, not rectified afterwards
    torch.testing.assert_close(out["features.2"], out["features.1"].clamp(min=0))
    expected = model.features[1](model.features[0](images)).detach()
    torch.testing.assert_close(out["features.1"], expected)


def test_mismatched_devices_and_bad_images_are_reported() -> None:
    model = TinyCNN()
    with pytest.raises(VisError, match=r"\[N, C, H, W\]"):
        activations(model, torch.randn(1, 8, 8))
    with pytest.raises(VisError, match="empty"):
        activations(model, torch.randn(0, 1, 8, 8))
