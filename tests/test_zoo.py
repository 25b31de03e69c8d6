"""``cnnvis.zoo``: library models by name, their weights files, preprocessing and heads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from cli_helpers import single_thread
from PIL import Image
from torchvision.transforms import InterpolationMode

from cnnvis.errors import CheckpointError, ConfigError
from cnnvis.zoo import (
    Preprocessing,
    build_zoo_model,
    default_class_names,
    find_head,
    parse_source,
    preprocessing_from_torchvision,
    replace_head,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_parse_source() -> None:
    assert parse_source("torchvision:resnet50") == ("torchvision", "resnet50")
    assert parse_source("timm:convnext_tiny.fb_in1k") == ("timm", "convnext_tiny.fb_in1k")
    assert parse_source("runs/flowers5-1") is None and parse_source("C:/models/x.pt2") is None
    with pytest.raises(ConfigError, match="names no model"):
        parse_source("timm:")


@pytest.mark.parametrize(("name", "head"), [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                            ("efficientnet_b0", "classifier.1")])
def test_find_and_replace_head(name: str, head: str) -> None:
    model = torchvision.models.get_model(name)
    assert find_head(model)[0] == head
    replace_head(model, 7)
    assert find_head(model)[1].out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_a_model_without_a_linear_head_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="cannot find the classification head"):
        find_head(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_weights_file_decides_the_class_count_or_keeps_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "five.pth"
    torch.save(saved.state_dict(), path)
    zoo = build_zoo_model("torchvision:resnet18", str(path))
    assert zoo.model.fc.out_features == 5 and torch.equal(zoo.model.fc.weight, saved.fc.weight)
    assert zoo.class_names is None and zoo.preprocessing is None and not zoo.random
    tuned = build_zoo_model("torchvision:resnet18", str(path), num_classes=3)  # fine-tuning: a fresh head
    assert tuned.model.fc.out_features == 3 and torch.equal(tuned.model.conv1.weight, saved.conv1.weight)


def test_random_weights_are_said_and_unknown_names_get_suggestions() -> None:
    zoo = build_zoo_model("torchvision:resnet18", "none")
    assert zoo.random and any("random weights" in note for note in zoo.notes)
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        build_zoo_model("torchvision:resnet81", "none")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_zoo_model("torchvision:resnet18", "IMAGENET1K_V7")


def test_preprocessing_and_names_of_a_weights_like_object(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = SimpleNamespace(crop_size=[48], resize_size=[56], mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1],
                             interpolation=InterpolationMode.BICUBIC)
    weights = SimpleNamespace(name="W", meta={"categories": ["a", "b"]}, transforms=lambda: preset)
    found = preprocessing_from_torchvision(weights)
    assert found == Preprocessing((48, 48), 56, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "bicubic", "torchvision weights W")
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: {"W": weights})
    zoo = build_zoo_model("torchvision:resnet18", "W")
    assert zoo.class_names == ["a", "b"] and zoo.model.fc.out_features == 2 and zoo.preprocessing == found


def test_transform_crops_the_centre_or_resizes_the_whole_picture() -> None:
    picture = Image.new("RGB", (100, 50), (255, 0, 0))
    picture.paste((0, 0, 255), (0, 0, 20, 50))  # a blue band on the left edge: only the whole picture keeps it
    p = Preprocessing((32, 32), 36, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    cropped, whole = p.transform()(picture), p.transform(crop=False)(picture)
    assert cropped.shape == whole.shape == (3, 32, 32)
    assert cropped[2].max() < 0.1 and whole[2, :, 0].min() > 0.9


def test_default_weights_name_the_classes_of_an_architecture_offline() -> None:
    """The names come from the library's tables (torchvision's weights metadata, timm's ImageNet
    info): nothing is downloaded, so random weights and weights files can have them."""
    names, source = default_class_names("torchvision", "resnet18")
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"] and "daisy" in names
    assert source == "ImageNet-1k's, from torchvision's resnet18 weights metadata"
    assert default_class_names("torchvision", "no_such_model") is None
    pytest.importorskip("timm")
    names, source = default_class_names("timm", "test_resnet")
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    assert source == "ImageNet-1k's, from timm's test_resnet pretrained config"
