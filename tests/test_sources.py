"""The pieces behind the MODEL argument: class-name files and matching, preprocessing defaults and
overrides, the images ``--image`` names, and where outputs of a library model go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from cnnvis.classnames import match_class, read_class_names
from cnnvis.data.images import check_images, describe_skipped, find_images, load_rgb
from cnnvis.errors import ConfigError, DataError
from cnnvis.sources import load_source, output_dir, resolve_preprocessing
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


def test_unknown_class_name_lists_classes_without_stray_dots_and_numbered_ones_point_at_classes() -> None:
    with pytest.raises(ConfigError) as caught:
        match_class("daisy", [str(i) for i in range(1000)])
    assert caught.value.hint == ("The model's classes are numbered 0..999 (no names known): give a class index, "
                                 "or name them with --classes FILE.")
    names = [f"class{chr(97 + i)}" for i in range(12)]
    with pytest.raises(ConfigError) as caught:
        match_class("zzz", names)
    assert caught.value.hint == f"Classes: {', '.join(names[:10])} and 2 more."
    assert "...." not in str(caught.value)


def test_a_library_model_keeping_the_default_class_count_gets_its_imagenet_names(tmp_path: Path) -> None:
    run = load_source("torchvision:resnet18", weights="none", size=32)
    assert len(run.spec.class_names) == 1000 and run.spec.class_names[985] == "daisy"
    assert "class names: ImageNet-1k's, from torchvision's resnet18 weights metadata; --classes FILE to change" in run.notes
    assert run.origin.class_names_from == "ImageNet-1k's, from torchvision's resnet18 weights metadata"
    five = tmp_path / "five.pth"  # a fine-tuned head of another size: its classes are not ImageNet's
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), five)
    run = load_source("torchvision:resnet18", weights=str(five), size=32)
    assert run.spec.class_names == ("0", "1", "2", "3", "4")
    assert any("class names: numbers 0..4" in note for note in run.notes)
    classes = tmp_path / "names.txt"
    classes.write_text("\n".join(f"c{i}" for i in range(1000)))
    run = load_source("torchvision:resnet18", weights="none", size=32, classes=classes)
    assert run.spec.class_names[0] == "c0" and not any("class names" in note for note in run.notes)


def test_a_library_model_from_timm_gets_its_imagenet_names_too() -> None:
    pytest.importorskip("timm")
    run = load_source("timm:test_resnet", weights="none", size=32)
    assert run.spec.class_names[0] == "tench" and run.class_aliases[0] == "tench, Tinca tinca"
    assert "class names: ImageNet-1k's, from timm's test_resnet pretrained config; --classes FILE to change" in run.notes


def test_a_truncated_image_is_one_clean_clause(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    pixels = torch.randint(0, 255, (64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(photo, quality=90)  # noise: the cut falls inside the image data
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    (tmp_path / "notes.png").write_text("not a picture")
    good, bad = check_images([str(photo), str(cut), str(tmp_path / "notes.png")])
    assert good == [str(photo)]
    reasons = dict(bad)
    assert reasons[str(cut)].startswith("unreadable: image file is truncated (")
    assert reasons[str(cut)].count("(") == 1  # PIL's own parenthesis, nothing nested around it
    assert describe_skipped(bad) == f"{cut}: {reasons[str(cut)]}; {tmp_path / 'notes.png'}: not an image"
    assert describe_skipped(bad, limit=1).endswith(" and 1 more")
    with pytest.raises(DataError) as caught:
        load_rgb(cut)
    assert caught.value.message == f"{cut}: {reasons[str(cut)]}"
