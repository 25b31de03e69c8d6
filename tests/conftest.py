"""Shared fixtures: the project's shared data folder, tiny image folders, private MNIST copies, and
one tiny trained run (trained once per session; tests copy it before changing anything)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from cli_helpers import cli, make_images, only_run, single_thread, write_config
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST_GZ = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (MNIST/raw/*.gz and flowers5/)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found: {SHARED_DATA}")
    return SHARED_DATA


def _copy_mnist_gz(shared: Path, root: Path) -> Path:
    source = shared / "MNIST" / "raw"
    missing = [name for name in MNIST_GZ if not (source / name).is_file()]
    if missing:
        pytest.skip(f"MNIST .gz files not found in {source}: {', '.join(missing)}")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_GZ:
        shutil.copyfile(source / name, raw / name)
    return root


@pytest.fixture(scope="session")
def mnist_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding only the four gzipped MNIST files (decompressed by the first loader
    that uses it). Shared by the session, so tests must not modify it."""
    return _copy_mnist_gz(shared_data, tmp_path_factory.mktemp("mnist-root"))


@pytest.fixture
def fresh_mnist_root(shared_data: Path, tmp_path: Path) -> Path:
    """A private data root with only the gzipped files, for tests of the decompression itself."""
    return _copy_mnist_gz(shared_data, tmp_path / "data")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _pattern_image(label: int, index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A class-dependent picture (a bright band whose position encodes the class) plus noise."""
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    band = size // 5
    start = (label * band) % max(size - band, 1)
    pixels[start : start + band, :, label % 3] = 230
    pixels[:, (index * 3) % size, :] = 128
    return Image.fromarray(pixels)


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_imagefolder(classes=3, per_class=8, size=16, fmt="png")`` -> folder of
    class sub-folders with small generated images (seeded, so every call is identical)."""

    def make(
        classes: int | list[str] = 3,
        per_class: int = 8,
        size: int = 16,
        fmt: str = "png",
        name: str = "folder",
    ) -> Path:
        names = classes if isinstance(classes, list) else [f"class_{i}" for i in range(classes)]
        root = tmp_path / name
        rng = np.random.default_rng(0)
        for label, class_name in enumerate(names):
            (root / class_name).mkdir(parents=True)
            for i in range(per_class):
                _pattern_image(label, i, size, rng).save(root / class_name / f"img_{i:03d}.{fmt}")
        return root

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test seeded and with one intra-op thread (see ``cli_helpers.single_thread``)."""
    torch.manual_seed(0)
    with single_thread():
        yield


# --------------------------------------------------------------------------- one tiny trained run


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("images") / "folder")


@pytest.fixture(scope="session")
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
