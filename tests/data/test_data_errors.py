"""Missing and unreadable data: one clear line, and training goes on past odd files (docs/errors.md)."""

from __future__ import annotations

import errno
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import (
    PIL_DEFAULT_LIMIT,
    cli,
    make_images,
    only_run,
    weights_only,
    write_config,
)
from PIL import Image

from cnnvis.checkpoint import load_checkpoint, save_checkpoint
from cnnvis.config import build_config
from cnnvis.data import mnist as data_module
from cnnvis.data.folders import imagefolder_samples
from cnnvis.data.images import load_rgb
from cnnvis.errors import CheckpointError, DataError
from cnnvis.run import load_run


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
    # each file's reason is one clause after "path: ", nothing nested in parentheses
    assert f"{folder}/class_0/truncated.jpg: unreadable: image file is truncated (" in out and "))" not in out
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
    assert "(new: class_3). Resume needs the same classes: restore the class folders as they were, or start a new run." in out


def test_class_count_that_disagrees_with_the_weights_when_visualizing(run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    payload["meta"]["class_names"] = payload["meta"]["class_names"][:2]  # says 2, weights hold 3
    save_checkpoint(payload, last)
    with pytest.raises(CheckpointError, match=r"weight fc.weight has shape \(3, 64\) but the model needs \(2, 64\).*num_classes") as info:
        load_run(last)
    assert info.value.exit_code == 2
