"""The images ``cnnvis visualize`` explains: fixed images of the run's own data, or the user's files,
folders and globs preprocessed exactly like the model's evaluation images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from cnnvis.data.images import describe_skipped, find_images, load_rgb
from cnnvis.errors import DataError
from cnnvis.run import LoadedRun

DEFAULT_IMAGES = 8


@dataclass
class ImageBatch:
    """Normalised images as the model sees them, with where they came from."""

    images: Tensor  #: [N, C, H, W], normalised like evaluation
    labels: Tensor | None  #: [N] true classes, None for the user's own files
    sources: list[str]  #: "test #123" or a file path, one per image
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: unreadable files: (path, why)
    notes: list[str] = field(default_factory=list)  #: how many images each folder or glob gave


def dataset_images(run: LoadedRun, split: str = "test", count: int = DEFAULT_IMAGES) -> ImageBatch:
    """``count`` fixed images of the run's own data split (the same ones every call)."""
    bundle = run.data("cpu", hint="Visualize with the data the run was trained on, or explain image files of your own.")
    fixed = bundle.fixed_batch(split, count)
    return ImageBatch(fixed.images, fixed.labels, fixed.sources)


def file_images(run: LoadedRun, paths: Sequence[str | Path], crop: bool = True) -> ImageBatch:
    """The user's images (files, folders, globs: :func:`~cnnvis.data.images.find_images`),
    preprocessed as the model's own evaluation images (:attr:`LoadedRun.preprocessing`): the short
    side resized and the centre cropped, so the aspect is kept; ``crop=False`` resizes the whole
    picture to the model's size instead. Unreadable files are skipped and listed."""
    found, notes = find_images(paths)
    prepare = run.preprocessing.transform(crop=crop)
    tensors, sources, skipped = [], [], []
    for path in found:
        try:
            image = load_rgb(path)
        except DataError as exc:
            if len(found) == 1:
                raise  # the one image named: its own error, not a skip
            skipped.append((str(path), exc.message.removeprefix(f"{path}: ")))
            continue
        tensors.append(prepare(image.convert("L") if run.spec.in_channels == 1 else image))
        sources.append(str(path))
    if not tensors:
        raise DataError(f"none of the {len(found)} image file(s) could be read: "
                        + describe_skipped(skipped, 5))
    return ImageBatch(torch.stack(tensors), None, sources, skipped, notes)
