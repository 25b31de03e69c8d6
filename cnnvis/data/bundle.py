"""What a data set hands to training and to every later command: batches and one :class:`ImageSpec`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cnnvis.errors import CheckpointError, ConfigError

EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class ImageSpec:
    """What a model's input images are: travels from the data to the checkpoint to every later command.

    ``mean``/``std`` are the per-channel statistics the images are normalised with.
    """

    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as checkpoints store them (``meta`` of a cnnvis checkpoint)."""
        return {"class_names": list(self.class_names), "mean": list(self.mean), "std": list(self.std),
                "in_channels": self.in_channels, "image_size": self.image_size}

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> ImageSpec:
        return cls(tuple(meta["class_names"]), tuple(meta["mean"]), tuple(meta["std"]),
                   int(meta["in_channels"]), int(meta["image_size"]))


class BatchSource(Protocol):
    """What the trainer iterates: batches of (normalised images, labels)."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass
class FixedImages:
    """The same evaluation images every call, with where each came from (``"test #123"``)."""

    images: Tensor  #: [N, C, H, W] normalised, on the CPU
    labels: Tensor  #: [N]
    sources: list[str]


@dataclass
class DataBundle:
    train: BatchSource
    val: BatchSource
    test: BatchSource
    spec: ImageSpec
    sizes: dict[str, int]
    eval_sets: dict[str, Dataset] = field(repr=False, default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    root: Path | None = None  #: the data root the files were read from
    pipeline: str = "on the device"  #: how batches are made, for the run's header line
    #: the model classes the data has, when it has only some of them (a labelled folder of a few
    #: ImageNet classes): evaluation tables show these and "other"
    label_subset: list[int] | None = None
    #: a labelled folder given as ``--data``: its path (what outputs name the images by, not "test")
    #: and each evaluation split's image files, in the split's order
    folder: Path | None = None
    files: dict[str, list[str]] = field(repr=False, default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def split(self, split: str) -> BatchSource:
        """The batches of an evaluation split (``val`` or ``test``)."""
        check_split(split)
        return self.val if split == "val" else self.test

    def source(self, split: str, index: int) -> str:
        """Where image ``index`` of ``split`` came from: its file where the bundle lists them (a
        labelled folder), else ``"test #index"``."""
        files = self.files.get(split)
        return files[index] if files is not None else f"{split} #{index}"

    def fixed_batch(self, split: str, count: int) -> FixedImages:
        """``count`` evaluation images spread evenly over the split: the same ones every call."""
        check_split(split)
        if count < 1:
            raise ConfigError(f"images {count}: give at least 1", parameter="images")
        dataset = self.eval_sets[split]
        count = min(count, len(dataset))
        step = max(len(dataset) // count, 1)
        items = [dataset[i * step] for i in range(count)]
        return FixedImages(torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items]),
                           [self.source(split, i * step) for i in range(count)])

    def check_fits(self, class_names: Sequence[str], checkpoint: object,
                   hint: str = "Use the data the run was trained on.") -> None:
        """Raise unless the data has exactly the classes ``checkpoint`` was trained on, in its order."""
        trained = [str(c) for c in class_names]
        if list(self.spec.class_names) == trained:
            return
        added = [c for c in self.spec.class_names if c not in trained]
        gone = [c for c in trained if c not in self.spec.class_names]
        changes = "; ".join(part for part in (
            f"new: {', '.join(added)}" if added else "", f"missing: {', '.join(gone)}" if gone else "") if part)
        raise CheckpointError(f"the data now has {self.num_classes} classes but {checkpoint} was trained on "
                              f"{len(trained)} ({changes or 'another order'})", hint)


def check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split {split!r}: choose val or test", parameter="split")
