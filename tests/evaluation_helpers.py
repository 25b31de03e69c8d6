"""A tiny trained run for the evaluate / faithfulness / report tests (about two seconds on one core).

Three classes told apart by where a bright vertical bar stands. Two images per class carry the
bar of the next class (label noise), so a well-trained model still makes a few confident
mistakes: the "confidently wrong" grid has something to show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnnvis.config import build_config
from cnnvis.training.trainer import Trainer

CLASSES = ["left", "middle", "right"]
SIZE = 20


def bars_folder(root: Path, per_class: int = 16, noisy: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 50, (SIZE, SIZE, 3), dtype=np.uint8)
            shown = (label + 1) % len(CLASSES) if i < noisy else label
            x = 2 + shown * 6 + i % 2
            pixels[:, x : x + 3, :] = 220
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def train_tiny_run(base: Path, epochs: int = 8) -> Path:
    """Train ``mnist_cnn`` on the bars; returns the run directory (test accuracy 11/12)."""
    folder = bars_folder(base / "bars")
    config = build_config({
        "name": "bars",
        "data": {"dataset": "imagefolder", "path": str(folder), "num_workers": 0, "batch_size": 8,
                 "val_fraction": 0.25, "test_fraction": 0.25, "transforms": {"image_size": SIZE}},
        "model": {"arch": "mnist_cnn"},
        "optimizer": {"name": "adam", "lr": 0.01},
        "scheduler": {"name": "none"},
        "train": {"epochs": epochs},
        "log": {"tensorboard": False},
    })
    trainer = Trainer(config, runs_dir=base / "runs", device="cpu")
    trainer.fit()
    trainer.close()
    return trainer.run_dir
