"""Helpers for tests that drive the real ``cnnvis`` command on tiny image folders."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import cnnvis
from cnnvis.cli import app

PACKAGE = Path(cnnvis.__file__).resolve().parent
PIL_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's own Image.MAX_IMAGE_PIXELS


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


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread inside the block, the count restored after: tiny models on a shared
    2-core machine run up to 20x slower with two threads that wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
