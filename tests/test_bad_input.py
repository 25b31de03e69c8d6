"""Bad input gets one clear line, a non-zero exit status and no traceback (issue 5).

Every case goes through the real ``cnnvis`` command (``typer.testing.CliRunner``) where a command
exists, and through the library (``cnnvis.run.load_run`` ...) where ``visualize`` will call it.
Each test asserts the exit status, the key words of the message and that no traceback is shown.
The exact messages are listed in docs/errors.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import cnnvis
from cnnvis import checkpoint as ckpt
from cnnvis import data as data_module
from cnnvis.checkpoint import load_checkpoint, save_checkpoint
from cnnvis.cli import app
from cnnvis.config import build_config
from cnnvis.data import imagefolder_samples
from cnnvis.errors import CheckpointError, DataError
from cnnvis.images import load_rgb
from cnnvis.run import load_run
from cnnvis.train import Trainer

PACKAGE = Path(cnnvis.__file__).resolve().parent
PIL_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's own Image.MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------- helpers


def cli(*args: object, code: int) -> str:
    """Run ``cnnvis ARGS``; check the exit status and that no traceback leaked; return the
    output (stdout and stderr) with whitespace collapsed, for matching."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output
    assert "Traceback" not in output, output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{output}"
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}:\n{output}"
    if code:
        assert result.stderr.strip(), "an error must say something on stderr"
    return " ".join(output.split())


def make_images(root: Path, classes: int = 3, per_class: int = 10, size: int = 16) -> Path:
    """Class sub-folders of small PNGs whose bright band position encodes the class."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            pixels[label * 4 : label * 4 + 4, :, label % 3] = 230
            Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    return root


def write_config(path: Path, folder: Path, epochs: int = 1, **sections: dict) -> Path:
    """A config for a tiny image folder: 16x16 RGB into ``mnist_cnn``, 4 images a batch."""
    config = {
        "name": "tiny",
        "data": {"dataset": "imagefolder", "path": str(folder), "num_workers": 0, "batch_size": 4,
                 "eval_batch_size": 64, "transforms": {"image_size": 16}},
        "model": {"arch": "mnist_cnn"},
        "train": {"epochs": epochs, "log_every": 1},
        "log": {"tensorboard": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def weights_only(path: Path) -> dict:
    """The checkpoint as a stranger would load it: plain torch.load with weights_only=True."""
    return torch.load(path, map_location="cpu", weights_only=True)


def finite(payload: dict) -> bool:
    return all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("images") / "folder")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """One finished 1-epoch run; tests copy it before changing anything."""
    base = tmp_path_factory.mktemp("trained")
    config = write_config(base / "tiny.yaml", images)
    cli("train", config, "--runs-dir", base / "runs", code=0)
    return only_run(base / "runs")


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / trained.name))


@pytest.fixture
def config(tmp_path: Path, images: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", images)


# --------------------------------------------------------------------------- config file


def test_config_file_missing(tmp_path):
    out = cli("train", tmp_path / "nope.yaml", code=2)
    assert "config file not found" in out and "nope.yaml" in out


def test_config_not_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: mnist\n    batch_size: 4\n")
    out = cli("train", bad, code=2)
    assert "not valid YAML at line 3, column" in out and "bad.yaml" in out


def test_config_empty(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    out = cli("train", empty, code=2)
    assert "the config is empty" in out


def test_config_top_level_list(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- model\n")
    out = cli("train", listed, code=2)
    assert "top level must be a mapping" in out and "not a list" in out


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("optimzer:\n  lr: 0.1\n", "'optimzer'", "did you mean 'optimizer'?"),
        ("train:\n  epoch: 3\n", "'train.epoch'", "did you mean 'epochs'?"),
        ("data:\n  transforms:\n    imge_size: 28\n", "'data.transforms.imge_size'", "did you mean 'image_size'?"),
    ],
)
def test_unknown_key_at_any_depth_suggests_the_closest(tmp_path, text, key, suggestion):
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    out = cli("train", path, code=2)
    assert f"unknown key {key}" in out and suggestion in out and "valid keys here" in out


def test_wrong_type(tmp_path):
    path = tmp_path / "type.yaml"
    path.write_text("train:\n  epochs: many\n")
    out = cli("train", path, code=2)
    assert "train.epochs = 'many'" in out and "valid integer" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optimizer:\n  lr: -1\n", "optimizer.lr = -1: Input should be greater than 0"),
        ("data:\n  batch_size: 0\n", "data.batch_size = 0: Input should be greater than or equal to 1"),
        ("train:\n  epochs: 0\n", "train.epochs = 0: Input should be greater than or equal to 1"),
    ],
)
def test_out_of_range(tmp_path, text, expected):
    path = tmp_path / "range.yaml"
    path.write_text(text)
    assert expected in cli("train", path, code=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data:\n  dataset: mnst\n", "data.dataset = 'mnst': must be one of 'mnist', 'flowers102', 'imagefolder' (did you mean 'mnist'?)"),
        ("model:\n  arch: resnet19\n", "model.arch = 'resnet19': unknown architecture (did you mean 'resnet18'?); choose one of: mnist_cnn, mnist_classic, resnet18"),
        ("optimizer:\n  name: adamm\n", "optimizer.name = 'adamm': must be one of 'sgd', 'adam', 'adamw', 'adadelta'"),
        ("scheduler:\n  name: cosin\n", "scheduler.name = 'cosin': must be one of 'onecycle', 'cosine', 'step', 'none' (did you mean 'cosine'?)"),
    ],
)
def test_unknown_name_lists_the_valid_names(tmp_path, text, expected):
    path = tmp_path / "names.yaml"
    path.write_text(text)
    assert expected in cli("train", path, code=2)


def test_unknown_visualization_method_lists_the_valid_names():
    # library level until `cnnvis visualize` exists: the command takes its choices from this registry
    from cnnvis.vis.errors import VisError
    from cnnvis.vis.registry import get_method, method_names

    with pytest.raises(VisError, match="unknown visualisation method 'gradcamm'; choose one of: ") as info:
        get_method("gradcamm")
    assert all(name in str(info.value) for name in method_names())
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- --set, --device, --resume


def test_set_without_equals(config):
    out = cli("train", config, "--set", "train.epochs", code=2)
    assert "--set 'train.epochs': expected key.path=value" in out


def test_set_unknown_path(config):
    out = cli("train", config, "--set", "optimzer.lr=0.1", code=2)
    assert "--set optimzer.lr: unknown key 'optimzer'" in out and "did you mean 'optimizer'?" in out


def test_set_value_of_the_wrong_type(config):
    out = cli("train", config, "--set", "train.epochs=many", code=2)
    assert "train.epochs = 'many' (from --set)" in out and "valid integer" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(config, tmp_path):
    out = cli("train", config, "--device", "cuda", "--runs-dir", tmp_path / "runs", code=2)
    assert "--device cuda: CUDA is not available on this machine. Use --device cpu or auto." in out
    assert not (tmp_path / "runs").exists(), "nothing is created for a command that cannot run"


def test_resume_of_a_path_that_does_not_exist(tmp_path):
    out = cli("train", "--resume", tmp_path / "runs" / "gone", code=2)
    assert "no such run or checkpoint" in out and "gone" in out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    out = cli("train", "--resume", tmp_path, code=2)
    assert "is not a cnnvis run (no config.yaml or checkpoints/)" in out


def test_resume_of_a_run_without_checkpoint(run_copy):
    for path in (run_copy / "checkpoints").iterdir():
        path.unlink()
    out = cli("train", "--resume", run_copy, code=2)
    assert "has no checkpoint yet: it stopped before training began. Start a new run instead." in out


# --------------------------------------------------------------------------- data


def test_missing_mnist_offline_names_the_four_files_and_the_folder(tmp_path, monkeypatch):
    """No network here: the download is not retried mirror after mirror; the answer is immediate."""
    def offline(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "mnist", "root": str(tmp_path / "data")}, "log": {"tensorboard": False}}))
    start = time.monotonic()
    out = cli("train", path, "--runs-dir", tmp_path / "runs", code=2)
    assert time.monotonic() - start < 5
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert f"MNIST files missing in {raw}" in out and "no download mirror answers (no network?)" in out
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in out
    assert "CNNVIS_DATA" in out


def test_missing_mnist_on_a_network_that_drops_packets_does_not_hang(tmp_path, monkeypatch):
    """A firewall that drops packets makes connects (and DNS) hang: the probe gives up on time and
    the download, whose URL opener has no timeout, is never started."""
    def black_hole(*args, **kwargs):
        time.sleep(30)

    def no_download(*args, **kwargs):
        raise AssertionError("the download was attempted")

    monkeypatch.setattr(socket, "create_connection", black_hole)
    monkeypatch.setattr(data_module, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(data_module.tv_datasets.MNIST, "download", no_download)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"no download mirror answers \(no network\?\)"):
        data_module.load_mnist_tensors(tmp_path / "data", download=True)
    assert time.monotonic() - start < 3


def test_missing_mnist_with_download_off(tmp_path):
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "mnist", "root": str(tmp_path), "download": False}}))
    out = cli("data", "check", path, code=2)
    assert "download is off" in out and "t10k-labels-idx1-ubyte" in out


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def odd_folder(tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Two good classes plus every kind of odd file: (folder, {bad file: reason}, odd-but-fine files)."""
    folder = make_images(tmp_path / "odd", classes=2, per_class=8)
    rng = np.random.default_rng(1)
    odd = folder / "class_0"
    rgb = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    fine = {
        "gray.png": Image.fromarray(rgb[..., 0]),  # L
        "alpha.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),  # RGBA
        "palette.png": Image.fromarray(rgb).convert("P"),  # P
        "palette_transparent.gif": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),  # CMYK
        "sixteen.png": Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)),  # I;16
    }
    for name, image in fine.items():
        image.save(odd / name, **({"transparency": 0} if name.endswith(".gif") else {}))
    assert Image.open(odd / "sixteen.png").mode == "I;16"
    assert Image.open(odd / "cmyk.jpg").mode == "CMYK"
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo, quality=90)
    (odd / "truncated.jpg").write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    (odd / "zero.jpg").write_bytes(b"")
    (odd / "notes.jpg").write_text("this is not a picture\n")
    (odd / "bomb.png").write_bytes(_png_header(30_000, 30_000))  # 900 Mpx: PIL refuses to open it
    (odd / "nearly_bomb.png").write_bytes(_png_header(10_000, 10_000))  # 100 Mpx: PIL only warns
    bad = {
        str(odd / "truncated.jpg"): "truncated",
        str(odd / "zero.jpg"): "empty file",
        str(odd / "notes.jpg"): "not an image",
        str(odd / "bomb.png"): "image too large (decompression bomb limit)",
        str(odd / "nearly_bomb.png"): "image too large (decompression bomb limit)",
    }
    return folder, bad, [str(odd / name) for name in fine]


def test_image_folder_odd_files_are_skipped_and_listed_and_training_goes_on(tmp_path, odd_folder):
    folder, bad, fine = odd_folder
    config = write_config(tmp_path / "odd.yaml", folder)
    out = cli("data", "check", config, code=0)
    assert f"{len(bad)} unreadable file(s), skipped" in out
    for path, reason in bad.items():
        assert f"{path}: " in out and reason in out.split(f"{path}: ")[1][:80]
    for path in fine:
        assert path not in out, f"{path} decodes and must not be listed"

    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=0)
    assert f"warning: skipped {len(bad)} unreadable image(s)" in out
    assert all(path in out for path in bad)
    splits, _, skipped = imagefolder_samples(build_config(yaml.safe_load(config.read_text())))
    used = {p for split in splits.values() for p, _ in split}
    assert set(fine) <= used and not used & set(bad)
    assert sum(len(s) for s in splits.values()) == 16 + len(fine)
    assert weights_only(only_run(tmp_path / "runs") / "checkpoints" / "last.pt")["epoch"] == 1
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_LIMIT, "PIL's decompression-bomb limit must stay on"


def test_every_odd_mode_becomes_rgb(odd_folder):
    _, _, fine = odd_folder
    for path in fine:
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (16, 16), path


def test_empty_class_folder_is_named(tmp_path, images):
    folder = Path(shutil.copytree(images, tmp_path / "folder"))
    (folder / "orchid").mkdir()
    (folder / "tulip").mkdir()
    (folder / "tulip" / "broken.jpg").write_bytes(b"")
    out = cli("train", write_config(tmp_path / "c.yaml", folder), "--runs-dir", tmp_path / "runs", code=2)
    assert f"class folders with no readable images in {folder}: orchid, tulip" in out and "Remove them or add images" in out


def test_no_class_folders(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "loose.png")
    out = cli("train", write_config(tmp_path / "c.yaml", folder), code=2)
    assert f"{folder} has no class sub-folders" in out and "sub-folder named after the class" in out


def test_image_folder_not_found(tmp_path):
    out = cli("train", write_config(tmp_path / "c.yaml", tmp_path / "nowhere"), code=2)
    assert "image folder not found" in out and "nowhere" in out


def test_class_count_changed_since_the_checkpoint_on_resume(tmp_path, images):
    folder = Path(shutil.copytree(images, tmp_path / "folder"))
    cli("train", write_config(tmp_path / "c.yaml", folder), "--runs-dir", tmp_path / "runs", code=0)
    run = only_run(tmp_path / "runs")
    shutil.copytree(folder / "class_0", folder / "class_3")  # a class added after training
    out = cli("train", "--resume", run, code=2)
    assert f"the data now has 4 classes but {run / 'checkpoints' / 'last.pt'} was trained on 3 (new: class_3)" in out
    assert "resume needs the same classes. Restore the class folders as they were, or start a new run." in out


def test_class_count_that_disagrees_with_the_weights_when_visualizing(run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    payload["meta"]["class_names"] = payload["meta"]["class_names"][:2]  # says 2, weights hold 3
    save_checkpoint(payload, last)
    with pytest.raises(CheckpointError, match=r"weight fc.weight has shape \(3, 64\) but the model needs \(2, 64\).*num_classes") as info:
        load_run(last)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- checkpoints and runs


def test_truncated_checkpoint(run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    out = cli("train", "--resume", run_copy, code=2)
    assert f"{last}: not a readable checkpoint (truncated, or another format" in out
    (run_copy / "checkpoints" / "best.pt").write_bytes(b"")
    out = cli("summary", run_copy, code=2)
    assert "best.pt: not a readable checkpoint (truncated, or another format: the file is empty)" in out


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", os.urandom(4096), b"PK\x03\x04 not really a zip"])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    out = cli("train", "--resume", path, code=2)
    assert f"{path}: not a readable checkpoint" in out


def test_pytorch_file_that_is_not_a_cnnvis_checkpoint(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    out = cli("summary", path, code=2)
    assert "not a cnnvis checkpoint (no model state or format marker)" in out


def test_checkpoint_of_another_architecture(run_copy, tmp_path, config):
    out = cli("train", "--resume", run_copy, "--set", "model.arch=mnist_classic", code=2)
    assert "holds a mnist_cnn model; a resumed run cannot switch to model.arch = mnist_classic" in out
    last = run_copy / "checkpoints" / "last.pt"
    out = cli("train", config, "--set", "model.arch=mnist_classic", "--set", f"model.pretrained={last}",
              "--runs-dir", tmp_path / "runs", code=2)
    assert "was saved from a different architecture" in out


def _as_if_saved_on_cuda(path: Path) -> None:
    """Rewrite the storage locations recorded in the archive from 'cpu' to 'cuda:0', which is
    what a checkpoint written on a GPU holds."""
    import zipfile

    original = path.read_bytes()
    tmp = path.with_suffix(".cuda")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            content = src.read(item)
            if item.filename.endswith("data.pkl"):
                content = content.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert b"cpu" not in content
            dst.writestr(item, content)
    os.replace(tmp, path)
    assert path.read_bytes() != original


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_checkpoint_saved_on_cuda_loads_on_cpu(run_copy):
    for name in ("last.pt", "best.pt"):
        _as_if_saved_on_cuda(run_copy / "checkpoints" / name)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(run_copy / "checkpoints" / "last.pt", weights_only=True)  # the trap map_location avoids
    run = load_run(run_copy)
    assert next(run.model.parameters()).device.type == "cpu"
    out = cli("train", "--resume", run_copy, "--set", "train.epochs=1", code=0)
    assert "test accuracy" in out


def test_checkpoint_that_needs_code_execution_is_refused(tmp_path, images):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": {}, "x": Exploit()}, path)
    out = cli("train", "--resume", path, code=2)
    assert f"{path}: refused to load: it needs" in out and "system" in out and "could run code" in out
    assert "weights_only=True" in out
    config = write_config(tmp_path / "c.yaml", images, model={"pretrained": str(path)})
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=2)
    assert "refused to load" in out
    assert not marker.exists(), "loading the file ran its code"


# --------------------------------------------------------------------------- visualize (library level)


def test_visualize_a_run_with_no_checkpoint_yet(run_copy):
    shutil.rmtree(run_copy / "checkpoints")
    (run_copy / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="has no checkpoint yet. Train it first") as info:
        load_run(run_copy)
    assert info.value.exit_code == 2


def test_visualize_unknown_layer_lists_the_layer_names(trained):
    from cnnvis.vis.errors import LayerNotFoundError
    from cnnvis.vis.hooks import get_layer

    model = load_run(trained).model
    with pytest.raises(LayerNotFoundError, match="no layer 'features.99' in MnistCNN; valid layer names: features, features.0,") as info:
        get_layer(model, "features.99")
    assert "features.13" in str(info.value) and "fc" in str(info.value)


@pytest.mark.parametrize(("content", "reason"), [(b"not a picture", "not an image"), (b"", "empty file")])
def test_visualize_image_that_is_not_an_image(tmp_path, content, reason):
    path = tmp_path / "cat.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"cat.jpg: {reason}. Give a PNG, JPEG") as info:
        load_rgb(path)
    assert info.value.exit_code == 2
    with pytest.raises(DataError, match="image not found"):
        load_rgb(tmp_path / "dog.jpg")


# --------------------------------------------------------------------------- training faults


def test_nan_loss_from_a_huge_learning_rate(tmp_path, config):
    out = cli("train", config, "--set", "optimizer.lr=1e30", "--set", "train.epochs=2", "--runs-dir", tmp_path / "runs", code=1)
    assert re.search(r"error: the (validation )?loss became nan (in|after) epoch 1, step \d", out), out
    assert "training stopped" in out and "Try a lower learning rate (optimizer.lr is 1e+30)" in out
    run = only_run(tmp_path / "runs")
    assert f"The last good checkpoint is kept in {run / 'checkpoints'}" in out
    last = weights_only(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 0 and finite(last)
    assert not (run / "checkpoints" / "best.pt").exists()


def test_nan_loss_mid_epoch_names_epoch_and_step(tmp_path, config, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"train": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if "label_smoothing" in kwargs:  # training steps only
            calls["train"] += 1
            if calls["train"] == 7:  # 18 training images, 4 a batch: 5 steps an epoch
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    out = cli("train", config, "--set", "train.epochs=3", "--runs-dir", tmp_path / "runs", code=1)
    assert "error: the loss became nan in epoch 2, step 2; training stopped." in out
    last = weights_only(only_run(tmp_path / "runs") / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and finite(last)


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, config, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_one_epoch", oom)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=1)
    assert "out of memory on cpu in epoch 1 (data.batch_size = 4)" in out
    assert "Try a smaller batch size, e.g. --set data.batch_size=2" in out


def test_out_of_memory_while_testing_names_the_eval_batch_size(tmp_path, config, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(Trainer, "test", oom)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=1)
    assert "out of memory on cpu while testing (data.eval_batch_size = 64)" in out
    assert "--set data.eval_batch_size=32" in out


def test_ctrl_c_mid_epoch_in_process(tmp_path, config, monkeypatch):
    """The real signal is sent in test_crash_safety; this checks the message and exit status."""
    real = Trainer.train_one_epoch
    calls = []

    def interrupted_in_epoch_2(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted_in_epoch_2)
    out = cli("train", config, "--set", "train.epochs=3", "--runs-dir", tmp_path / "runs", code=130)
    run = only_run(tmp_path / "runs")
    assert f"interrupted in epoch 2; checkpoints/last.pt holds epoch 1. resume with: cnnvis train --resume {run}" in out
    assert weights_only(run / "checkpoints" / "last.pt")["epoch"] == 1


def test_ctrl_c_before_the_first_checkpoint(tmp_path, config, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=130)
    assert "interrupted in epoch 1, before the first checkpoint was written." in out and "resume" not in out
    monkeypatch.setattr("cnnvis.train.build_data", interrupted)  # still loading the data
    out = cli("train", config, "--runs-dir", tmp_path / "other", code=130)
    assert out == "interrupted"
    assert not (tmp_path / "other").exists()


class FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_disk_full_while_writing_a_checkpoint(tmp_path, config, monkeypatch):
    real_fdopen = os.fdopen
    opened = []

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        if ".pt." not in os.readlink(f"/proc/self/fd/{fd}"):  # config.yaml and others use os.fdopen too
            return handle
        opened.append(fd)
        # 1: last.pt before training; the end of epoch 1: 2 best.pt, then 3 last.pt (the resume point)
        return FullDisk(handle, room=4096) if len(opened) == 3 else handle

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    out = cli("train", config, "--set", "train.epochs=2", "--runs-dir", tmp_path / "runs", code=1)
    run = only_run(tmp_path / "runs")
    assert f"error: could not write checkpoint {run / 'checkpoints' / 'last.pt'}: No space left on device." in out
    assert "Free disk space or choose a writable --runs-dir; the previous checkpoint is intact." in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"], "a half-written file was left"
    last = weights_only(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 0 and finite(last)
    assert weights_only(run / "checkpoints" / "best.pt")["epoch"] == 1


def test_disk_full_while_writing_metrics(tmp_path, config, monkeypatch):
    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr("cnnvis.train.open", full_open, raising=False)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=1)
    run = only_run(tmp_path / "runs")
    assert f"could not write {run / 'metrics.jsonl'}: No space left on device" in out
    assert weights_only(run / "checkpoints" / "last.pt")["epoch"] == 0


def test_run_dir_made_read_only_during_training(tmp_path, config, monkeypatch):
    # Simulated (tests may run as root): the run's folder refuses new files after the first checkpoint.
    runs = tmp_path / "runs"
    real_mkstemp = tempfile.mkstemp
    made = []

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")).name == "checkpoints" and runs in Path(kwargs["dir"]).parents:
            made.append(kwargs["dir"])
            if len(made) > 1:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = cli("train", config, "--set", "train.epochs=2", "--runs-dir", runs, code=1)
    run = only_run(runs)
    assert f"error: could not write checkpoint {run / 'checkpoints' / 'best.pt'}: Permission denied." in out
    assert "Free disk space or choose a writable --runs-dir; the previous checkpoint is intact." in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert weights_only(run / "checkpoints" / "last.pt")["epoch"] == 0


def test_runs_dir_not_writable(tmp_path, config, monkeypatch):
    # Tests may run as root, for whom chmod does not block writes: the refusal is simulated.
    runs = tmp_path / "readonly"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if runs in (self, *self.parents):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = cli("train", config, "--runs-dir", runs, code=2)
    assert f"cannot create a run directory in {runs}: Read-only file system" in out


def test_runs_dir_inside_a_file(tmp_path, config):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    out = cli("train", config, "--runs-dir", blocker / "sub", code=2)
    assert f"cannot create a run directory in {blocker / 'sub'}: Not a directory" in out


def test_run_dir_not_writable_when_the_config_is_saved(tmp_path, config, monkeypatch):
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".config.yaml."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=2)
    assert "config.yaml: Permission denied" in out and "cannot write" in out
    assert not list((tmp_path / "runs").rglob("*.tmp"))


# --------------------------------------------------------------------------- security


def _package_sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")}


def _calls(source: str, name: str) -> list[str]:
    """The full text of every call ``name(...)`` (balanced parentheses, over several lines)."""
    found = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        found.append(source[match.start() : i])
    return found


def test_every_torch_load_is_weights_only():
    loads = {path: _calls(text, "torch.load") for path, text in _package_sources().items()}
    assert any(loads.values()), "the scan found no torch.load at all: is it looking at the package?"
    for path, calls in loads.items():
        for call in calls:
            assert re.search(r"weights_only\s*=\s*True", call), f"{path}: {call}"


@pytest.mark.parametrize(
    "pattern",
    [r"(?<![\w.])yaml\.(load|unsafe_load|full_load|load_all)\(", r"yaml\.(Unsafe|Full)?Loader\b",
     r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"\bpickle\.loads?\(", r"\bos\.system\(", r"\bos\.popen\(",
     r"shell\s*=\s*True", r"MAX_IMAGE_PIXELS\s*="],
)
def test_no_unsafe_loading_or_code_execution(pattern):
    hits = [f"{path.relative_to(PACKAGE.parent)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0)}"
            for path, text in _package_sources().items() for m in re.finditer(pattern, text)]
    assert not hits, hits


def test_yaml_is_read_with_safe_load_only():
    sources = _package_sources()
    assert any("yaml.safe_load(" in text for text in sources.values())
