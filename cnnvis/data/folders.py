"""Photos from files: any image folder (one sub-folder per class) and Oxford Flowers-102, with a
seeded stratified split. Training either decodes every image once into memory and augments whole
batches on the device (:mod:`cnnvis.data.tensors`; ``data.in_memory``, by default when the
decoded images fit), or decodes and augments per image in a ``DataLoader``. In memory, training
crops come from the centre square of each image resized to the evaluation size (``resize``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2 as T

from cnnvis.config import Config, TransformConfig, data_root
from cnnvis.data.bundle import DataBundle, ImageSpec
from cnnvis.data.images import check_images, load_rgb
from cnnvis.data.tensors import DeviceBatches, NormalizedTensors
from cnnvis.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    photo_statistics,
    train_transform,
)
from cnnvis.errors import DataError

IN_MEMORY_LIMIT = 4 * 2**30  #: bytes of decoded images ``data.in_memory: auto`` keeps at most
#: Flowers-102 ships no class names that torchvision reads; the classes are numbered
FLOWERS102_CLASSES = tuple(f"flower {i}" for i in range(102))


def resolve_workers(num_workers: int | str) -> int:
    """``auto``: one loader process per core but one, at most 8."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


class FileImages(Dataset):
    """(path, label) pairs decoded with PIL, converted to RGB (or grayscale), then transformed."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: T.Compose, gray: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.gray = gray

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        image = load_rgb(path)
        return self.transform(image.convert("L") if self.gray else image), label


def stratified_split(labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Per-class seeded shuffle, then the first shares go to test and val: every class in every split."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_class):
        members = by_class[label]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        n_test = max(1, round(len(order) * test_fraction)) if len(order) >= 3 else 0
        n_val = max(1, round(len(order) * val_fraction)) if len(order) >= 3 else 0
        out["test"] += order[:n_test]
        out["val"] += order[n_test : n_test + n_val]
        out["train"] += order[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, device: torch.device, seed: int,
            rank: int = 0, world_size: int = 1) -> DataLoader:
    sampler = None
    if world_size > 1:  # batch_size is the global batch: each rank loads its share of it
        # Training: a seeded DistributedSampler (the trainer calls set_epoch); it pads the ranks to
        # equal shares, which only repeats a few images of an epoch. Evaluation: every image once.
        sampler = (DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed) if shuffle
                   else range(rank, len(dataset), world_size))
        batch_size, shuffle = batch_size // world_size if shuffle else batch_size, False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        # Not for training: persistent workers keep their random state across epochs, so a
        # resumed run (fresh workers) would augment differently from an uninterrupted one.
        persistent_workers=workers > 0 and not shuffle,
        # Every loader draws its worker seeds from its own generator, never from the global one
        # (which dropout uses and the checkpoint restores): resumed runs stay identical.
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    )


def _photo_bundle(
    config: Config,
    device: torch.device,
    samples: dict[str, list[tuple[str, int]]],
    class_names: list[str],
    skipped: list[tuple[str, str]],
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    data, t = config.data, config.data.transforms
    if data.subset and data.subset < len(samples["train"]):
        # A seeded random pick: the split is sorted by class, so its first N would be one class.
        keep = torch.randperm(len(samples["train"]), generator=torch.Generator().manual_seed(config.seed))[: data.subset]
        samples["train"] = [samples["train"][i] for i in sorted(keep.tolist())]
    mean, std, _ = photo_statistics(config)
    spec = photo_spec(class_names, t, mean, std)
    if in_memory(config, sum(len(v) for v in samples.values())):
        return _tensor_bundle(config, device, samples, spec, skipped, rank, world_size)
    evaluate = eval_transform(t, spec.mean, spec.std)
    sets = {
        "train": FileImages(samples["train"], train_transform(t, spec.mean, spec.std)),
        "val": FileImages(samples["val"], evaluate),
        "test": FileImages(samples["test"], evaluate),
    }
    workers = resolve_workers(data.num_workers)
    loaders = {
        split: _loader(ds, data.batch_size if split == "train" else data.eval_batch_size, split == "train", workers, device,
                       config.seed, rank, world_size)
        for split, ds in sets.items()
    }
    return DataBundle(
        train=loaders["train"],
        val=loaders["val"],
        test=loaders["test"],
        spec=spec,
        sizes={k: len(v) for k, v in sets.items()},
        eval_sets={"val": sets["val"], "test": sets["test"]},
        skipped=skipped,
        root=data_root(data),
        pipeline=f"decoded per batch, {workers} loader process(es)" if workers else "decoded per batch",
    )


def photo_spec(class_names: Sequence[str], t: TransformConfig, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> ImageSpec:
    """Photos are RGB at ``image_size``, normalised with the ImageNet statistics (what pretrained
    weights expect, and a fine default from scratch) unless the weights say otherwise
    (:func:`~cnnvis.data.transforms.photo_statistics`)."""
    return ImageSpec(tuple(class_names), tuple(mean), tuple(std), 3, t.image_size)


def stored_side(t: TransformConfig) -> int:
    """The side images are kept at in memory: what evaluation resizes to before its centre crop."""
    return max(t.resize or t.image_size, t.image_size)


def in_memory(config: Config, count: int) -> bool:
    """``data.in_memory``, with ``auto`` deciding by size: decoded images within a quarter of the
    machine's memory and at most :data:`IN_MEMORY_LIMIT` bytes."""
    choice = config.data.in_memory
    if choice != "auto":
        return bool(choice)
    side = stored_side(config.data.transforms)
    try:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # not every platform says
        budget = IN_MEMORY_LIMIT
    return count * 3 * side * side <= min(budget, IN_MEMORY_LIMIT)


def decode_all(paths: Sequence[str], side: int, workers: int = 4) -> Tensor:
    """Every image as uint8 ``[N, 3, side, side]``: shorter side resized to ``side``, centre crop
    (what :func:`~cnnvis.data.transforms.eval_transform` does before its own crop)."""
    prepare = T.Compose([T.ToImage(), T.Resize(side, antialias=True), T.CenterCrop(side)])
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and the resize release the GIL
        images = list(pool.map(lambda path: prepare(load_rgb(path)), paths))
    return torch.stack(images) if images else torch.zeros(0, 3, side, side, dtype=torch.uint8)


def _tensor_bundle(config: Config, device: torch.device, samples: dict[str, list[tuple[str, int]]],
                   spec: ImageSpec, skipped: list[tuple[str, str]], rank: int = 0, world_size: int = 1) -> DataBundle:
    """Every split decoded once into a uint8 tensor on ``device``; batches are augmented there."""
    data, t = config.data, config.data.transforms
    side = stored_side(t)
    sources = {}
    for split, items in samples.items():
        images = decode_all([p for p, _ in items], side)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        train = split == "train"
        sources[split] = DeviceBatches(images, labels, data.batch_size if train else data.eval_batch_size, spec.mean,
                                       spec.std, device, shuffle=train, augment=t if train else None, seed=config.seed,
                                       size=t.image_size, rank=rank, world_size=world_size)
    megabytes = sum(b.images.numel() for b in sources.values()) / 2**20
    return DataBundle(
        train=sources["train"], val=sources["val"], test=sources["test"], spec=spec,
        sizes={k: len(v) for k, v in samples.items()},
        eval_sets={"val": NormalizedTensors(sources["val"]), "test": NormalizedTensors(sources["test"])},
        skipped=skipped, root=data_root(data),
        pipeline=f"decoded once, {megabytes:.0f} MB of {side} px images on {device.type}, augmented in batches",
    )


def imagefolder_samples(config: Config) -> tuple[dict[str, list[tuple[str, int]]], list[str], list[tuple[str, str]]]:
    """Find, check and split the images of an image folder; returns (splits, class names, skipped)."""
    data = config.data
    folder, classes = folder_classes(config)
    candidates = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    good, skipped = check_images([p for p, _ in candidates])
    good_set = set(good)
    samples = [(p, label) for p, label in candidates if p in good_set]
    counts = {name: 0 for name in classes}
    for _, label in samples:
        counts[classes[label]] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataError(f"class folders with no readable images in {folder}: {', '.join(empty)}", "Remove them or add images.")
    split = stratified_split([label for _, label in samples], data.val_fraction, data.test_fraction, config.seed)
    return {k: [samples[i] for i in v] for k, v in split.items()}, classes, skipped


def build_imagefolder(config: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
    samples, classes, skipped = imagefolder_samples(config)
    return _photo_bundle(config, device, samples, classes, skipped, rank, world_size)


def build_flowers102(config: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
    data = config.data
    root = data_root(data)
    try:
        import scipy.io  # noqa: F401  (torchvision reads the label files with it)
    except ImportError:
        raise DataError("flowers102 needs scipy to read its .mat label files: pip install scipy") from None
    splits = {}
    for split in ("train", "val", "test"):
        try:
            ds = tv_datasets.Flowers102(str(root), split=split, download=data.download)
        except RuntimeError as exc:
            raise DataError(
                f"Flowers-102 not found in {root / 'flowers-102'} ({exc}).",
                "Place 102flowers.tgz (extracted as jpg/), imagelabels.mat and setid.mat there, or enable data.download with internet.",
            ) from None
        except Exception as exc:
            raise DataError(f"Flowers-102 download failed ({type(exc).__name__}: {exc}).",
                            f"Place the files in {root / 'flowers-102'} by hand.") from None
        splits[split] = [(str(p), int(label)) for p, label in zip(ds._image_files, ds._labels)]
    return _photo_bundle(config, device, splits, list(FLOWERS102_CLASSES), [], rank, world_size)


def folder_classes(config: Config) -> tuple[Path, list[str]]:
    """The image folder ``data.path`` (absolute, or under the data root) and its sorted class names."""
    data = config.data
    if not data.path:
        raise DataError("data.path is not set: imagefolder needs a folder of class sub-folders.")
    folder = Path(data.path).expanduser()
    if not folder.is_absolute():
        folder = data_root(data) / folder
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}", "Set data.path to a folder that holds one sub-folder per class.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class sub-folders", "Put each class's images in a sub-folder named after the class.")
    return folder, classes


def labelled_folder(folder: str | Path, spec: ImageSpec, transform: T.Compose, batch_size: int = 64,
                    aliases: Sequence[str] | None = None) -> DataBundle:
    """Every image of a labelled folder (one sub-folder per class) as the val and test split of a
    model that was not trained here (``spec``: its classes and channels; ``transform``: its
    preprocessing; ``aliases``: the full class names, when they list aliases). Sub-folders are matched to the model's ``class_names`` by name
    (case-insensitive, ``_`` as a space, any ImageNet alias); they may be a subset of them."""
    from cnnvis.classnames import match_class, numbered
    from cnnvis.errors import ConfigError

    class_names = list(aliases) if aliases is not None else spec.class_names
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}", "Give a folder that holds one sub-folder per class.")
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise DataError(f"{root} has no class sub-folders", "Put each class's images in a sub-folder named after the class.")
    labels, unknown = {}, []
    for name in subfolders:
        try:
            labels[name] = match_class(name, class_names, what="class folder")
        except ConfigError as exc:
            near = exc.hint.removeprefix("Nearest: ").rstrip(".") if exc.hint and exc.hint.startswith("Nearest") else ""
            unknown.append(f"{name} (nearest: {near})" if near else name)
    if unknown:
        # an error, not a skip: a silently dropped folder would make the accuracy look measured on all of them
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        fix = (f"The model's classes are numbered 0..{len(class_names) - 1} (no names known): pass --classes FILE "
               "(its class names, one a line, in output order), or name the sub-folders by class index."
               if numbered(class_names) else
               "Rename each such sub-folder after one of the model's classes, or pass --classes FILE if the "
               "model's classes have other names.")
        raise DataError(f"{root}: {len(unknown)} class folder(s) name no class of the model: "
                        f"{'; '.join(unknown[:5])}{more}", fix)
    candidates = [(str(p), labels[name]) for name in subfolders for p in sorted((root / name).rglob("*"))
                  if p.is_file() and not p.name.startswith(".")]
    good, skipped = check_images([p for p, _ in candidates])
    keep = set(good)
    samples = [(p, label) for p, label in candidates if p in keep]
    if not samples:
        raise DataError(f"{root} holds no readable images")
    images = FileImages(samples, transform, gray=spec.in_channels == 1)
    loader = _loader(images, batch_size, False, 0, torch.device("cpu"), 0)
    present = sorted(set(labels.values()))
    return DataBundle(train=loader, val=loader, test=loader, spec=spec, sizes={"train": 0, "val": len(images), "test": len(images)},
                      eval_sets={"val": images, "test": images}, skipped=skipped, root=root, pipeline="decoded per batch",
                      label_subset=present if len(present) < len(class_names) else None, folder=root,
                      files={split: [p for p, _ in samples] for split in ("val", "test")})
