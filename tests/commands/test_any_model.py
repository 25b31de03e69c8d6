"""Any model in the explain commands: ``torchvision:NAME`` / ``timm:NAME`` with ``--weights``, ``.pt2``
and TorchScript files; preprocessing and class names from the weights or the options; ``--image``
folders and globs; outputs in a run-like directory that ``report`` reads."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import yaml
from cli_helpers import cli, single_thread
from PIL import Image
from torchvision.transforms import InterpolationMode

SIZE = 32
CATEGORIES = ["tench", "golden retriever", "crane", "crane", "goldfish, Carassius auratus"]


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _picture(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two readable photos of different shapes and one broken file."""
    root = tmp_path_factory.mktemp("photos")
    _picture(root / "wide.png", 96, 48)
    _picture(root / "tall.jpg", 40, 80, seed=1)
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-class resnet18 state dict, as a user's fine-tuned weights file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-5.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    return path


class Tiny(torch.nn.Module):
    """A small CNN for the program formats (exporting or scripting a ResNet takes seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _sidecar(png: Path) -> dict:
    return json.loads(png.with_suffix(".json").read_text())


def test_torchvision_random_weights_say_so_and_write_a_run_like_directory(tmp_path: Path, photos: Path) -> None:
    out = cli("visualize", "torchvision:resnet18", "--weights", "none", "--size", SIZE, "--image", photos / "wide.png",
              "-m", "saliency", "--runs-dir", tmp_path, code=0)
    assert "random weights" in out and "UNTRAINED" in out
    assert "ImageNet defaults, the model does not say; pass --mean/--std" in out  # the defaults are stated
    run = tmp_path / "torchvision-resnet18-random"
    source = yaml.safe_load((run / "source.yaml").read_text())
    assert source["model"] == "torchvision:resnet18" and source["weights"] == "random" and source["classes"] == 1000
    assert source["preprocessing"]["crop"] == [SIZE, SIZE]
    meta = _sidecar(run / "visualizations" / "saliency" / "saliency.png")
    assert meta["architecture"] == "torchvision:resnet18" and meta["untrained"] is True
    assert list(run.glob("events.out.tfevents.*")), "the pictures also go to TensorBoard"
    # report reads the run-like directory by the same MODEL and --weights
    out = cli("report", "torchvision:resnet18", "--weights", "none", "--runs-dir", tmp_path, code=0)
    html = (run / "report.html").read_text()
    assert "torchvision:resnet18" in html and "saliency" in html
    # the hints name the --runs-dir the outputs are in: following them fills this report
    assert f"cnnvis evaluate torchvision:resnet18 --weights none --runs-dir {tmp_path} --data FOLDER" in out
    assert f"cnnvis evaluate torchvision:resnet18 --weights none --runs-dir {tmp_path} --data FOLDER --explanations" in out
    assert f"--runs-dir {tmp_path} --data FOLDER" in html


def test_weights_file_names_the_classes_and_explains_them_by_name(tmp_path: Path, photos: Path, resnet_file: Path) -> None:
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({str(i): name for i, name in enumerate(CATEGORIES)}))
    cli("visualize", "torchvision:resnet18", "--weights", resnet_file, "--classes", classes, "--size", SIZE,
        "--mean", "0.5", "--std", "0.25", "--image", photos / "tall.jpg", "-m", "saliency",
        "--target", "Golden Retriever", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    meta = _sidecar(tmp_path / "torchvision-resnet18-resnet18-5" / "visualizations" / "saliency" / "saliency.png")
    assert meta["targets"] == ["golden retriever"] and meta["untrained"] is False
    assert meta["checkpoint"] == str(resnet_file)
    source = yaml.safe_load((tmp_path / "torchvision-resnet18-resnet18-5" / "source.yaml").read_text())
    assert source["preprocessing"]["mean"] == [0.5] * 3 and source["preprocessing"]["std"] == [0.25] * 3
    # an alias shared by two classes is ambiguous; a typo gets the nearest names
    out = cli("visualize", "torchvision:resnet18", "--weights", resnet_file, "--classes", classes, "--size", SIZE,
              "--image", photos / "tall.jpg", "-m", "saliency", "--target", "crane", "--runs-dir", tmp_path, code=2)
    assert "ambiguous" in out and "2 (crane), 3 (crane)" in out
    out = cli("visualize", "torchvision:resnet18", "--weights", resnet_file, "--classes", classes, "--size", SIZE,
              "--image", photos / "tall.jpg", "-m", "saliency", "--target", "goldfsh", "--runs-dir", tmp_path, code=2)
    assert "Nearest: goldfish, Carassius auratus" in out
    # any alias names the class; pictures and sidecars show its first name
    cli("visualize", "torchvision:resnet18", "--weights", resnet_file, "--classes", classes, "--size", SIZE,
        "--image", photos / "tall.jpg", "-m", "saliency", "--target", "carassius AURATUS", "--runs-dir", tmp_path,
        "--no-tensorboard", code=0)
    meta = _sidecar(tmp_path / "torchvision-resnet18-resnet18-5" / "visualizations" / "saliency" / "saliency.png")
    assert meta["targets"] == ["goldfish"]


def _fake_weights(state: dict) -> SimpleNamespace:
    """An object shaped like a torchvision weights enum member."""
    preset = SimpleNamespace(crop_size=[SIZE], resize_size=[80], mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4],
                             interpolation=InterpolationMode.BICUBIC)
    return SimpleNamespace(name="TEST_V1", meta={"categories": CATEGORIES}, transforms=lambda: preset,
                           get_state_dict=lambda progress=False: state)


def test_preprocessing_and_class_names_come_from_the_weights(tmp_path: Path, photos: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    state = torchvision.models.resnet18(num_classes=5).state_dict()
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: {"TEST_V1": _fake_weights(state)})
    out = cli("visualize", "torchvision:resnet18", "--weights", "TEST_V1", "--image", photos / "wide.png",
              "-m", "saliency", "--target", "tench", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    assert "from torchvision weights TEST_V1" in out
    run = tmp_path / "torchvision-resnet18-TEST_V1"
    source = yaml.safe_load((run / "source.yaml").read_text())
    assert source["preprocessing"] == {"crop": [SIZE, SIZE], "resize": 80, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4],
                                       "interpolation": "bicubic", "source": "torchvision weights TEST_V1"}
    assert source["class_names_from"] == "the torchvision:resnet18 weights"
    meta = _sidecar(run / "visualizations" / "saliency" / "saliency.png")
    assert meta["targets"] == ["tench"] and meta["predicted"][0] in CATEGORIES
    # an option given explicitly overrides the weights' number, the rest stay
    cli("visualize", "torchvision:resnet18", "--weights", "TEST_V1", "--image", photos / "wide.png", "--size", 32,
        "-m", "saliency", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    source = yaml.safe_load((run / "source.yaml").read_text())
    assert source["preprocessing"]["crop"] == [32, 32] and source["preprocessing"]["mean"] == [0.4, 0.5, 0.6]


def test_folder_and_glob_intake_skip_the_unreadable_file(tmp_path: Path, photos: Path) -> None:
    out = cli("visualize", "torchvision:resnet18", "--weights", "none", "--size", SIZE, "--image", photos,
              "-m", "saliency", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    assert "3 images" in out and "skipped 1 unreadable image(s)" in out and "broken.png: not an image" in out
    meta = _sidecar(tmp_path / "torchvision-resnet18-random" / "visualizations" / "saliency" / "saliency.png")
    assert meta["images"] == [str(photos / "tall.jpg"), str(photos / "wide.png")]  # sorted, the broken one left out
    out = cli("visualize", "torchvision:resnet18", "--weights", "none", "--size", SIZE, "--image", f"{photos}/*.png",
              "-m", "saliency", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    meta = _sidecar(tmp_path / "torchvision-resnet18-random" / "visualizations" / "saliency" / "saliency.png")
    assert meta["images"] == [str(photos / "wide.png")]
    cli("visualize", "torchvision:resnet18", "--weights", "none", "--image", f"{photos}/*.gif", code=2)


def test_non_square_image_keeps_its_aspect_unless_no_crop(photos: Path) -> None:
    from cnnvis.commands.visualize import file_images
    from cnnvis.sources import load_source

    run = load_source("torchvision:resnet18", weights="none", size=SIZE)
    wide = photos / "wide.png"  # 96x48: left half random, right half another random
    cropped = file_images(run, [wide]).images
    whole = file_images(run, [wide], crop=False).images
    assert cropped.shape == whole.shape == (1, 3, SIZE, SIZE)
    # the crop is the centre square of the picture resized by its short side: compare with doing it by hand
    pixels = torch.from_numpy(np.array(Image.open(wide))).permute(2, 0, 1).float()[None] / 255
    side = round(SIZE / 0.875)
    short = torch.nn.functional.interpolate(pixels, size=(side, side * 2), mode="bilinear", antialias=True)
    mean, std = torch.tensor(run.spec.mean)[:, None, None], torch.tensor(run.spec.std)[:, None, None]
    top, left = round((side - SIZE) / 2), round((2 * side - SIZE) / 2)
    by_hand = (short[..., top : top + SIZE, left : left + SIZE] - mean) / std
    assert torch.allclose(cropped, by_hand, atol=0.05)
    assert not torch.allclose(cropped, whole, atol=0.1)


def test_timm_model_uses_its_architecture_config(tmp_path: Path, photos: Path) -> None:
    pytest.importorskip("timm")
    cli("visualize", "timm:test_resnet", "--weights", "none", "--size", SIZE, "--image", photos / "wide.png",
        "-m", "saliency", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    source = yaml.safe_load((tmp_path / "timm-test_resnet-random" / "source.yaml").read_text())
    assert source["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and source["preprocessing"]["source"] == "timm pretrained data config"
    import timm

    weights = tmp_path / "tuned.pth"  # a fine-tuned timm model: its file's head sets the classes
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    cli("visualize", "timm:test_resnet", "--weights", weights, "--size", SIZE, "--image", photos / "wide.png",
        "-m", "saliency", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    meta = _sidecar(tmp_path / "timm-test_resnet-tuned" / "visualizations" / "saliency" / "saliency.png")
    assert meta["predicted"][0] in ("0", "1", "2") and meta["untrained"] is False


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 3, SIZE, SIZE),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("export") / "tiny.pt2"
    torch.export.save(program, path)
    return path


def test_pt2_program_runs_layer_methods_and_skips_the_others(tmp_path: Path, photos: Path, exported: Path) -> None:
    out = cli("visualize", exported, "--image", photos / "wide.png", "-m", "gradcam", "-m", "filters",
              "--layer", "features.3", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    assert "skipped filters: a torch.export program" in out
    assert f"preprocessing: {SIZE}x{SIZE} px" in out and "the program's input shape" in out  # its size came with it
    meta = _sidecar(tmp_path / "tiny-pt2" / "visualizations" / "gradcam" / "features.3.png")
    assert meta["architecture"] == str(exported) and meta["predicted"][0] in list("01234")
    assert "class names: numbers 0..4" in out
    out = cli("summary", exported, code=0)
    assert "features.3" in out and "fc" in out


def test_pt2_activations_show_every_stage_though_the_program_lost_its_module_types(tmp_path: Path) -> None:
    from cnnvis.sources import load_source
    from cnnvis.vis.activations import stage_layers

    nn = torch.nn
    staged = nn.Sequential()
    staged.add_module("stem", nn.Conv2d(3, 4, 3, padding=1))
    staged.add_module("stage1", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))
    staged.add_module("stage2", nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()))
    staged.add_module("pool", nn.AdaptiveAvgPool2d(1))
    staged.add_module("flat", nn.Flatten())
    staged.add_module("fc", nn.Linear(8, 3))
    images = torch.randn(2, 3, SIZE, SIZE)
    path = tmp_path / "staged.pt2"
    torch.export.save(torch.export.export(staged.eval(), (images,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    program = load_source(path).model
    assert stage_layers(program, images=images) == ["stem", "stage1", "stage2"]  # not only the default layer


def _export(path: Path, size: int, height: object = None, width: object = None) -> Path:
    dims = {0: torch.export.Dim("batch"), **({2: height, 3: width} if height is not None else {})}
    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(2, 3, size, size),), dynamic_shapes=(dims,)), path)
    return path


@pytest.mark.parametrize("kind", ["static", "bounded"])
def test_pt2_without_room_for_other_sizes_skips_maximize_and_deepdream_with_one_line(
        tmp_path: Path, photos: Path, kind: str) -> None:
    # at 64 px maximize renders on a padded canvas and deepdream adds 46 and 33 px octaves: sizes a static program
    # refuses; bounds of 16..64 px refuse the canvas only
    height = width = None if kind == "static" else torch.export.Dim("side", min=16, max=64)
    program = _export(tmp_path / f"{kind}.pt2", 64, height, width)
    out = cli("visualize", program, "--image", photos / "wide.png", "--size", 64, "-m", "maximize", "-m", "deepdream",
              "-m", "gradcam", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    folder = tmp_path / f"{kind}-pt2" / "visualizations"
    assert list((folder / "gradcam").glob("*.png"))  # the other methods still run
    if kind == "static":
        assert ("skipped maximize: the program was exported for 64x64 images only, and maximize renders on a padded "
                "canvas larger than the images (an input of height ") in out
        assert ("skipped deepdream: the program was exported for 64x64 images only, and deepdream runs its octaves on "
                "smaller copies of the images (an input of height 33)") in out
    else:
        assert "skipped maximize: the program refuses an input of height 72 (it must be <= 64), and maximize " in out
        assert "skipped deepdream" not in out and list((folder / "deepdream").glob("*.png"))  # its octaves fit
    assert 'export it with a dynamic height and width' in out and "torch.export.Dim.AUTO" in out
    assert not (folder / "maximize").exists()
    # asked for alone, a method the program refuses is an error, not an empty result
    out = cli("visualize", program, "--image", photos / "wide.png", "--size", 64, "-m", "maximize",
              "--runs-dir", tmp_path, "--no-tensorboard", code=2)
    assert "error:" in out and "maximize renders on a padded canvas" in out


def test_pt2_with_dynamic_height_and_width_runs_maximize_and_deepdream(tmp_path: Path, photos: Path) -> None:
    program = _export(tmp_path / "dynamic.pt2", 64, torch.export.Dim.AUTO, torch.export.Dim.AUTO)
    out = cli("visualize", program, "--image", photos / "wide.png", "--size", 64, "-m", "maximize", "-m", "deepdream",
              "-p", "steps=2", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    assert "skipped" not in out
    folder = tmp_path / "dynamic-pt2" / "visualizations"
    dream = _sidecar(next((folder / "deepdream").glob("*.png")))
    assert dream["octave_sizes"] == [[64, 64], [46, 46], [33, 33]]  # each octave ran on the program
    drawn = _sidecar(next((folder / "maximize").glob("*.png")))
    assert drawn["parameters"]["recipe"]["param"] == "fourier"  # 64 px: the padded, transformed recipe


def test_only_a_programs_refused_input_is_a_skip_other_errors_surface(tmp_path: Path, photos: Path, exported: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnvis.commands import visualize as visualize_module

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x8 and 9x5)")  # a bug, not a refused size

    monkeypatch.setattr(visualize_module, "run_method", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        visualize_module.visualize_command(exported, methods=["gradcam"], files=[photos / "wide.png"],
                                           model_options={"runs_dir": tmp_path})


def test_torchscript_file_is_loaded_with_a_deprecation_warning(tmp_path: Path, photos: Path) -> None:
    path = tmp_path / "resnet.ts"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(Tiny().eval()).save(str(path))
    except Exception as exc:  # noqa: BLE001 - a torch without TorchScript
        pytest.skip(f"this torch cannot save TorchScript: {exc}")
    out = cli("visualize", path, "--image", photos / "wide.png", "--size", SIZE, "-m", "saliency", "-m", "gradcam",
              "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    assert "warning: TorchScript is deprecated" in out and "skipped gradcam: a TorchScript program cannot be hooked" in out
    assert (tmp_path / "resnet-ts" / "visualizations" / "saliency" / "saliency.png").is_file()
    out = cli("summary", path, code=2)
    assert "TorchScript program cannot be hooked" in out


def test_evaluate_a_library_model_on_a_labelled_folder(tmp_path: Path, resnet_file: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CATEGORIES[:2] + ["heron", "stork", "goldfish"]) + "\n")
    data = tmp_path / "labelled"
    for name in ("golden_retriever", "Tench"):  # a subset, named loosely
        (data / name).mkdir(parents=True)
        for i in range(2):
            _picture(data / name / f"{i}.png", 50, 40, seed=i)
    out = cli("evaluate", "torchvision:resnet18", "--weights", resnet_file, "--classes", classes, "--size", 32,
              "--data", data, "--runs-dir", tmp_path, "--wrong", 0, "--no-tensorboard", code=0)
    metrics = json.loads((tmp_path / "torchvision-resnet18-resnet18-5" / "evaluation" / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["class_names"] == ["tench", "golden retriever", "other"]
    assert "metrics.json" in out
    (data / "zebra").mkdir()
    _picture(data / "zebra" / "0.png", 20, 20)
    out = cli("evaluate", "torchvision:resnet18", "--weights", resnet_file, "--classes", classes, "--size", 32,
              "--data", data, "--runs-dir", tmp_path, code=2)
    assert "zebra" in out
    out = cli("evaluate", "torchvision:resnet18", "--weights", resnet_file, "--runs-dir", tmp_path, code=2)
    assert "--data FOLDER" in out


def test_weights_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as handle:
        pickle.dump({"fc.weight": SimpleNamespace()}, handle, protocol=2)
    out = cli("visualize", "torchvision:resnet18", "--weights", bad, "--image", bad, code=2)
    assert "refused to load" in out


def test_run_options_are_refused_for_a_run_and_names_are_checked(tmp_path: Path) -> None:
    out = cli("summary", "torchvision:resnet181", "--weights", "none", code=2)
    assert "did you mean" in out and "resnet18" in out
    out = cli("visualize", "torchvision:resnet18", "--weights", "IMAGENET1K_V9", "--image", tmp_path, code=2)
    assert "IMAGENET1K_V1" in out
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    out = cli("visualize", tmp_path / "run", "--weights", "none", code=2)
    assert "a run knows its own" in out


def test_summary_of_a_vision_transformer_lists_names_that_layer_accepts() -> None:
    pytest.importorskip("timm")
    out = cli("summary", "timm:test_vit", "--weights", "none", code=0)
    assert "blocks.0.attn.qkv" in out and "head" in out


def test_named_weights_placed_in_the_hub_cache_work_offline(tmp_path: Path, photos: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The real IMAGENET1K_V1 entry (its transforms and 1000 ImageNet names), its file placed by hand."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    out = cli("visualize", "torchvision:resnet18", "--weights", "IMAGENET1K_V1", "--size", SIZE, "--image",
              photos / "wide.png", "-m", "saliency", "--target", "Golden Retriever", "--runs-dir", tmp_path,
              "--no-tensorboard", code=0)
    assert "from torchvision weights IMAGENET1K_V1; --size given" in out
    meta = _sidecar(tmp_path / "torchvision-resnet18-IMAGENET1K_V1" / "visualizations" / "saliency" / "saliency.png")
    assert meta["targets"] == ["golden retriever"] and meta["checkpoint"] == "IMAGENET1K_V1"
    source = yaml.safe_load((tmp_path / "torchvision-resnet18-IMAGENET1K_V1" / "source.yaml").read_text())
    assert source["classes"] == 1000 and source["preprocessing"]["resize"] == round(SIZE * 256 / 224)


def test_maximize_draws_the_explained_classes_of_a_many_class_model(tmp_path: Path, photos: Path) -> None:
    """1000 classes are too many to draw each: the class the image is explained for is drawn."""
    cli("visualize", "torchvision:resnet18", "--weights", "none", "--size", SIZE, "--image", photos / "wide.png",
        "-m", "saliency", "-m", "maximize", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    pictures = tmp_path / "torchvision-resnet18-random" / "visualizations"
    predicted = _sidecar(pictures / "saliency" / "saliency.png")["predicted"]
    assert _sidecar(pictures / "maximize" / "classes.png")["classes"] == predicted


def test_a_run_takes_folders_and_no_crop_through_the_same_image_path(run_copy: Path, photos: Path) -> None:
    from cnnvis.commands.visualize import file_images
    from cnnvis.run import load_run

    out = cli("visualize", run_copy, "--image", photos, "-m", "saliency", "--no-tensorboard", code=0)
    assert "skipped 1 unreadable image(s)" in out
    meta = _sidecar(run_copy / "visualizations" / "saliency" / "saliency.png")
    assert meta["images"] == [str(photos / "tall.jpg"), str(photos / "wide.png")]
    run = load_run(run_copy)
    cropped, whole = file_images(run, [photos / "wide.png"]).images, file_images(run, [photos / "wide.png"], crop=False).images
    assert cropped.shape == whole.shape == (1, 3, run.spec.image_size, run.spec.image_size)
    assert not torch.allclose(cropped, whole, atol=0.1)


def test_a_weights_file_with_the_imagenet_head_is_explained_by_imagenet_names(tmp_path: Path, photos: Path,
                                                                             resnet_file: Path) -> None:
    weights = tmp_path / "r18.pth"  # random, but with the 1000 outputs of the default weights
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = cli("visualize", "torchvision:resnet18", "--weights", weights, "--size", SIZE, "--image", photos / "wide.png",
              "-m", "saliency", "--target", "daisy", "--runs-dir", tmp_path, "--no-tensorboard", code=0)
    assert "note: class names: ImageNet-1k's, from torchvision's resnet18 weights metadata; --classes FILE to change" in out
    meta = _sidecar(tmp_path / "torchvision-resnet18-r18" / "visualizations" / "saliency" / "saliency.png")
    assert meta["targets"] == ["daisy"]
    # a fine-tuned head of 5 classes is not ImageNet's: numbered, and the error says how to name them
    out = cli("visualize", "torchvision:resnet18", "--weights", resnet_file, "--size", SIZE, "--image", photos / "wide.png",
              "-m", "saliency", "--target", "daisy", "--runs-dir", tmp_path, code=2)
    assert out.endswith("error: --target 'daisy': not pred, true, a class index or a class name. The model's classes "
                        "are numbered 0..4 (no names known): give a class index, or name them with --classes FILE.")


def _biased_weights(path: Path, favourite: int) -> Path:
    """A 5-class resnet18 that predicts ``favourite`` for every image (zero head weights, one bias)."""
    model = torchvision.models.resnet18(num_classes=5)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(favourite), 5).float() * 10)
    torch.save(model.state_dict(), path)
    return path


def test_evaluate_on_a_folder_names_the_wrong_files_and_what_was_predicted(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("tench\ngolden retriever\nheron\nstork\ngoldfish\n")
    weights = _biased_weights(tmp_path / "stork.pth", favourite=3)  # "stork": not a class of the folder
    data = tmp_path / "labelled"
    for name in ("golden_retriever", "Tench"):
        (data / name).mkdir(parents=True)
        for i in range(2):
            _picture(data / name / f"{i}.png", 50, 40, seed=i)
    (data / "Tench" / "broken.png").write_bytes(b"not an image")
    out = cli("evaluate", "torchvision:resnet18", "--weights", weights, "--classes", classes, "--size", SIZE,
              "--data", data, "--runs-dir", tmp_path, "--wrong", 2, "--no-tensorboard", code=0)
    assert "broken.png: not an image" in out  # the unreadable file is said, not silently dropped
    assert "labelled: accuracy 0.00% (0/4)" in out and "(tench → stork 100%)" in out and "→ other" not in out
    evaluation = tmp_path / "torchvision-resnet18-stork" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["data"] == str(data) and metrics["class_names"] == ["tench", "golden retriever", "other"]
    # the per-class table counts the prediction as other; the wrong images name the file and the class
    assert [c["predicted"] for c in metrics["per_class"]] == [0, 0, 4]
    assert metrics["confidently_wrong"] == [
        {"image": str(data / "Tench" / f"{i}.png"), "index": i, "true": "tench", "predicted": "stork",
         "probability": pytest.approx(1.0, abs=1e-3)} for i in range(2)]
    assert _sidecar(evaluation / "confidently_wrong.png")["images"][0]["image"] == str(data / "Tench" / "0.png")
    # the report shows the folder, not a "test" split, and its hints repeat --weights, --classes and --runs-dir
    out = cli("report", "torchvision:resnet18", "--weights", weights, "--runs-dir", tmp_path, code=0)
    html = (tmp_path / "torchvision-resnet18-stork" / "report.html").read_text()
    assert f"folder {data}, 4 images" in html and "labelled images evaluated" in html
    assert (f"cnnvis evaluate torchvision:resnet18 --weights {weights} --classes {classes} --runs-dir {tmp_path} "
            f"--data {data} --explanations") in out


def test_folders_that_name_no_class_say_how_to_fix_them(tmp_path: Path, resnet_file: Path) -> None:
    data = tmp_path / "labelled"
    for name in ("daisy", "stupas"):
        (data / name).mkdir(parents=True)
        _picture(data / name / "0.png", 40, 40)
    out = cli("evaluate", "torchvision:resnet18", "--weights", "none", "--size", SIZE, "--data", data,
              "--runs-dir", tmp_path, code=2)
    assert out.endswith(f"error: {data}: 1 class folder(s) name no class of the model: stupas (nearest: stupa). "
                        "Rename each such sub-folder after one of the model's classes, or pass --classes FILE if "
                        "the model's classes have other names.")
    out = cli("evaluate", "torchvision:resnet18", "--weights", resnet_file, "--size", SIZE, "--data", data,
              "--runs-dir", tmp_path, code=2)
    assert "2 class folder(s) name no class of the model: daisy; stupas" in out
    assert "The model's classes are numbered 0..4 (no names known): pass --classes FILE" in out
