"""The pieces behind the MODEL argument: class-name files and matching, preprocessing defaults and
overrides, the images ``--image`` names, and where outputs of a library model go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cnnvis.classnames import match_class, read_class_names
from cnnvis.data.images import find_images, load_rgb
from cnnvis.errors import ConfigError, DataError
from cnnvis.sources import output_dir, resolve_preprocessing
from cnnvis.zoo import Preprocessing

IMAGENET_LIKE = ["tench, Tinca tinca", "golden retriever", "crane", "crane", "goldfish, Carassius auratus"]


@pytest.mark.parametrize("text", ["a\nb\n\nc\n", json.dumps(["a", "b", "c"]), json.dumps({"2": "c", "0": "a", "1": "b"})])
def test_class_name_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "classes"
    path.write_text(text)
    assert read_class_names(path) == ["a", "b", "c"]


def test_class_name_file_with_a_gap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(ConfigError, match="none missing"):
        read_class_names(path)


def test_match_class_by_name_alias_and_folder_spelling() -> None:
    assert match_class("Golden Retriever", IMAGENET_LIKE) == 1
    assert match_class("golden_retriever", IMAGENET_LIKE) == 1
    assert match_class("tinca tinca", IMAGENET_LIKE) == 0
    with pytest.raises(ConfigError, match=r"ambiguous: classes 2 \(crane\), 3 \(crane\)"):
        match_class("crane", IMAGENET_LIKE)
    with pytest.raises(ConfigError, match="Nearest: tench, Tinca tinca"):
        match_class("tenhc", IMAGENET_LIKE)


def test_preprocessing_defaults_are_stated_and_options_override() -> None:
    chosen, line = resolve_preprocessing(None, 3)
    assert chosen.crop == (224, 224) and chosen.resize == 256 and chosen.mean == (0.485, 0.456, 0.406)
    assert "ImageNet defaults, the model does not say; pass --size/--mean/--std" in line
    known = Preprocessing((240, 240), 274, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "weights X")
    chosen, line = resolve_preprocessing(known, 3, size=120, std="0.2,0.3,0.4")
    assert chosen.crop == (120, 120) and chosen.resize == 137  # the weights' crop fraction is kept
    assert chosen.mean == (0.5, 0.5, 0.5) and chosen.std == (0.2, 0.3, 0.4) and chosen.interpolation == "bicubic"
    assert "from weights X; --size, --std given" in line
    gray, _ = resolve_preprocessing(None, 1, mean="0.5", std="0.5")
    assert gray.mean == (0.5,) and gray.std == (0.5,)
    with pytest.raises(ConfigError, match="2 values for a model with 3 input channels"):
        resolve_preprocessing(None, 3, mean="0.1,0.2")


def test_find_images_in_folders_and_globs(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "sub/c.png", "notes.txt", ".hidden/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found, notes = find_images([tmp_path])
    assert found == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "sub" / "c.png"] and notes == [f"{tmp_path}: 3 images"]
    found, notes = find_images([f"{tmp_path}/*.png", tmp_path / "b.png"])
    assert found == [tmp_path / "b.png"] and notes == [f"{tmp_path}/*.png: 1 file"]
    with pytest.raises(DataError, match="image not found"):
        find_images([tmp_path / "missing.png"])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    picture = Image.new("RGB", (40, 20))
    exif = picture.getexif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees to show it
    picture.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").size == (20, 40)


def test_output_directory_names() -> None:
    assert output_dir("torchvision:resnet50", "IMAGENET1K_V2") == Path("runs/torchvision-resnet50-IMAGENET1K_V2")
    assert output_dir("timm:convnext_tiny", "none", "out") == Path("out/timm-convnext_tiny-random")
    assert output_dir("torchvision:resnet18", "/w/my weights.pth").name == "torchvision-resnet18-my_weights"
    assert output_dir("models/net.pt2").name == "net-pt2"


def test_library_models_default_to_the_pretrained_weights() -> None:
    assert output_dir("torchvision:resnet50") == Path("runs/torchvision-resnet50-DEFAULT")
    assert output_dir("timm:convnext_tiny") == Path("runs/timm-convnext_tiny-pretrained")
