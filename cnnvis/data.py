"""Datasets and loaders: MNIST (decoded once, batched and augmented on the device),
Flowers-102 and any image folder (torchvision datasets through a DataLoader).
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2 as T

from cnnvis.config import Config, DataConfig, TransformConfig
from cnnvis.errors import DataError
from cnnvis.images import check_images, load_rgb

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class BatchSource(Protocol):
    """What the trainer iterates: batches of (normalised images, labels)."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass
class DataBundle:
    train: BatchSource
    val: BatchSource
    test: BatchSource
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    sizes: dict[str, int]
    eval_sets: dict[str, Dataset] = field(repr=False, default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fixed_batch(self, split: str, count: int) -> tuple[Tensor, Tensor]:
        """The same ``count`` evaluation images every call: spread evenly over the split."""
        dataset = self.eval_sets[split]
        count = min(count, len(dataset))
        step = max(len(dataset) // count, 1)
        items = [dataset[i * step] for i in range(count)]
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def data_root(config: DataConfig) -> Path:
    return Path(os.environ.get("CNNVIS_DATA") or config.root).expanduser()


def resolve_workers(num_workers: int | str) -> int:
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


# ---------------------------------------------------------------- MNIST, on the device


def _place_mnist_files(root: Path, download: bool) -> Path:
    """Make ``root/MNIST/raw`` hold the four uncompressed files, decompressing hand-placed ``.gz``.

    The ``.gz`` copies users place often differ byte-wise from the official archives, so their
    checksums are not trusted to decide anything: only the decompressed files are read.
    Returns the root to read from: ``root``, or a copy in the user's cache when ``root`` is read-only.
    """
    raw = root / "MNIST" / "raw"
    packed_only = [n for n in MNIST_FILES if not (raw / n).exists() and (raw / f"{n}.gz").exists()]
    if packed_only and not os.access(raw, os.W_OK):
        # A read-only data folder (shared lab storage): decompress into the user's cache instead.
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnvis"
        (cache / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        for name in MNIST_FILES:
            for suffix in ("", ".gz"):
                source, copy = raw / f"{name}{suffix}", cache / "MNIST" / "raw" / f"{name}{suffix}"
                if source.exists() and not copy.exists():
                    shutil.copyfile(source, copy)
        return _place_mnist_files(cache, download)
    for name in MNIST_FILES:
        target, packed = raw / name, raw / f"{name}.gz"
        if not target.exists() and packed.exists():
            tmp = target.with_suffix(".part")
            try:
                with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError, zlib.error) as exc:  # a truncated or damaged hand-placed copy
                tmp.unlink(missing_ok=True)
                raise DataError(
                    f"cannot decompress {packed}: {exc}",
                    f"Replace it with a complete copy, or place the uncompressed {name} beside it.",
                ) from None
            os.replace(tmp, target)
    missing = [name for name in MNIST_FILES if not (raw / name).exists()]
    if not missing:
        return root
    if download and not _any_reachable(tv_datasets.MNIST.mirrors, PROBE_TIMEOUT_S):
        reason = "no download mirror answers (no network?)"
    elif download:
        # torchvision opens its URLs without a timeout: a network that drops packets would hang it.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            tv_datasets.MNIST(str(root), train=True, download=True)
            tv_datasets.MNIST(str(root), train=False, download=True)
            return root
        except Exception as exc:  # network errors come in many types
            reason = f"download failed ({type(exc).__name__})"
        finally:
            socket.setdefaulttimeout(previous)
    else:
        reason = "download is off"
    raise DataError(
        f"MNIST files missing in {raw} and {reason}.",
        f"Place {', '.join(f + '[.gz]' for f in MNIST_FILES)} in {raw} "
        "(or set data.root / CNNVIS_DATA to the folder that holds MNIST/raw).",
    )


PROBE_TIMEOUT_S = 5.0  # one quick look for a mirror before any download starts
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation while downloading


def _any_reachable(urls: Sequence[str], timeout: float) -> bool:
    """Whether a TCP connection to any of these hosts opens within ``timeout`` seconds in all.

    Probed from daemon threads so that a hanging DNS lookup (which no socket timeout covers)
    cannot hold the caller: offline, this answers False within ``timeout``.
    """
    answered = threading.Event()

    def probe(url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            answered.set()
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            pass

    threads = [threading.Thread(target=probe, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    # Done at the first answer, once every probe has failed (offline: at once), or at the deadline.
    while time.monotonic() < deadline and any(thread.is_alive() for thread in threads):
        if answered.wait(0.05):
            return True
    return answered.is_set()


def load_mnist_tensors(root: Path, download: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """Decode MNIST once: ``{"train": (uint8[60000,28,28], int64[60000]), "test": ...}``."""
    root = _place_mnist_files(root, download)
    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = tv_datasets.MNIST(str(root), train=train, download=False)
        out[split] = (ds.data, ds.targets)
    return out


class DeviceBatches:
    """Batches from uint8 images that live on the device; augmentation runs there, batched."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        shuffle: bool = False,
        augment: TransformConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.images = images.to(device).unsqueeze(1)  # uint8 [N,1,H,W]: a quarter of float32
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.shuffle = shuffle
        self.augment = augment if augment and (augment.rotation or augment.translate) else None
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        device = self.labels.device
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(device)
        else:
            order = torch.arange(n, device=device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx].float().div_(255)
            if self.augment is not None:
                x = self._random_affine(x)
            yield (x - self.mean) / self.std, self.labels[idx]

    def _random_affine(self, x: Tensor) -> Tensor:
        """Per-image random rotation and shift in one batched ``grid_sample``."""
        n = x.shape[0]
        params = torch.rand(n, 3, generator=self.generator).to(x.device) * 2 - 1
        angle = params[:, 0] * (self.augment.rotation * torch.pi / 180)
        shift = params[:, 1:] * (2 * self.augment.translate)  # grid units span 2 per side
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class _NormalizedTensors(Dataset):
    """Index access to device-resident uint8 images as normalised float tensors (for fixed batches)."""

    def __init__(self, batches: DeviceBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.batches.images[i].float().div(255)
        return ((x - self.batches.mean[0]) / self.batches.std[0]).cpu(), self.batches.labels[i].cpu()


def split_indices(n: int, holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[holdout:], order[:holdout]


def build_mnist(config: Config, device: torch.device) -> DataBundle:
    data = config.data
    tensors = load_mnist_tensors(data_root(data), data.download)
    train_x, train_y = tensors["train"]
    test_x, test_y = tensors["test"]
    if data.val_size >= len(train_y):
        raise DataError(f"data.val_size = {data.val_size}: must be smaller than the {len(train_y)} training digits")
    train_idx, val_idx = split_indices(len(train_y), data.val_size, config.seed)
    if data.subset:
        train_idx = train_idx[: data.subset]
    make = lambda x, y, shuffle, bs: DeviceBatches(  # noqa: E731
        x, y, bs, MNIST_MEAN, MNIST_STD, device, shuffle=shuffle, augment=data.transforms if shuffle else None, seed=config.seed
    )
    train = make(train_x[train_idx], train_y[train_idx], True, data.batch_size)
    val = make(train_x[val_idx], train_y[val_idx], False, data.eval_batch_size)
    test = make(test_x, test_y, False, data.eval_batch_size)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        class_names=[str(i) for i in range(10)],
        mean=MNIST_MEAN,
        std=MNIST_STD,
        in_channels=1,
        image_size=28,
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test_y)},
        eval_sets={"val": _NormalizedTensors(val), "test": _NormalizedTensors(test)},
    )


# ---------------------------------------------------------------- photos, through a DataLoader


def eval_transform(t: TransformConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The preprocessing every evaluated image gets (also the user's own files in ``visualize``)."""
    resize = t.resize or t.image_size
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(resize, antialias=True),
            T.CenterCrop(t.image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean), list(std)),
        ]
    )


def train_transform(t: TransformConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    steps: list = [T.ToImage()]
    if t.random_crop:
        steps.append(T.RandomResizedCrop(t.image_size, scale=(0.35, 1.0), antialias=True))
    else:
        steps += [T.Resize(t.resize or t.image_size, antialias=True), T.CenterCrop(t.image_size)]
    if t.flip:
        steps.append(T.RandomHorizontalFlip())
    if t.rotation or t.translate:
        steps.append(T.RandomAffine(degrees=t.rotation, translate=(t.translate, t.translate) if t.translate else None))
    if t.color_jitter:
        j = t.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


class FileImages(Dataset):
    """(path, label) pairs decoded with PIL, converted to RGB, then transformed."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: T.Compose) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label


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


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, device: torch.device, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
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
) -> DataBundle:
    data, t = config.data, config.data.transforms
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # photos: ImageNet statistics suit any natural images
    if data.subset and data.subset < len(samples["train"]):
        # A seeded random pick: the split is sorted by class, so its first N would be one class.
        keep = torch.randperm(len(samples["train"]), generator=torch.Generator().manual_seed(config.seed))[: data.subset]
        samples["train"] = [samples["train"][i] for i in sorted(keep.tolist())]
    evaluate = eval_transform(t, mean, std)
    sets = {
        "train": FileImages(samples["train"], train_transform(t, mean, std)),
        "val": FileImages(samples["val"], evaluate),
        "test": FileImages(samples["test"], evaluate),
    }
    workers = resolve_workers(data.num_workers)
    loaders = {
        split: _loader(ds, data.batch_size if split == "train" else data.eval_batch_size, split == "train", workers, device, config.seed)
        for split, ds in sets.items()
    }
    return DataBundle(
        train=loaders["train"],
        val=loaders["val"],
        test=loaders["test"],
        class_names=class_names,
        mean=mean,
        std=std,
        in_channels=3,
        image_size=t.image_size,
        sizes={k: len(v) for k, v in sets.items()},
        eval_sets={"val": sets["val"], "test": sets["test"]},
        skipped=skipped,
    )


def imagefolder_samples(config: Config) -> tuple[dict[str, list[tuple[str, int]]], list[str], list[tuple[str, str]]]:
    """Find, check and split the images of an image folder; returns (splits, class names, skipped)."""
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


def build_imagefolder(config: Config, device: torch.device) -> DataBundle:
    samples, classes, skipped = imagefolder_samples(config)
    return _photo_bundle(config, device, samples, classes, skipped)


def build_flowers102(config: Config, device: torch.device) -> DataBundle:
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
    class_names = [f"flower {i}" for i in range(102)]
    return _photo_bundle(config, device, splits, class_names, [])


def build_data(config: Config, device: torch.device | str = "cpu") -> DataBundle:
    """Build the train/val/test batch sources described by ``config.data``."""
    device = torch.device(device)
    builders = {"mnist": build_mnist, "imagefolder": build_imagefolder, "flowers102": build_flowers102}
    return builders[config.data.dataset](config, device)


def subset(dataset: Dataset, count: int) -> Subset:
    return Subset(dataset, list(range(min(count, len(dataset)))))


def dataset_shape(config: Config) -> tuple[int, int, int]:
    """``(num_classes, in_channels, image_size)`` without reading any image (for summaries)."""
    data = config.data
    if data.dataset == "mnist":
        return 10, 1, 28
    if data.dataset == "flowers102":
        return 102, 3, data.transforms.image_size
    folder = Path(data.path or ".").expanduser()
    if not folder.is_absolute():
        folder = data_root(data) / folder
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    classes = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return max(len(classes), 1), 3, data.transforms.image_size
