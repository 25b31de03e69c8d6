"""MNIST: the placed (or downloaded) files decoded once into uint8 tensors that stay on the
device, where batches are shuffled, augmented and normalised without per-sample Python.
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
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets as tv_datasets

from cnnvis.config import Config, data_root
from cnnvis.data.bundle import DataBundle, ImageSpec
from cnnvis.data.tensors import DeviceBatches, NormalizedTensors
from cnnvis.data.transforms import MNIST_MEAN, MNIST_STD
from cnnvis.errors import DataError

MNIST_SPEC = ImageSpec(tuple(str(i) for i in range(10)), MNIST_MEAN, MNIST_STD, 1, 28)
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


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
            # one temp file per process: the processes of a torchrun launch all decompress at once
            tmp = target.with_name(f"{name}.{os.getpid()}.part")
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


def split_indices(n: int, holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[holdout:], order[:holdout]


def build_mnist(config: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
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
        x, y, bs, MNIST_MEAN, MNIST_STD, device, shuffle=shuffle, augment=data.transforms if shuffle else None, seed=config.seed,
        rank=rank, world_size=world_size,
    )
    train = make(train_x[train_idx], train_y[train_idx], True, data.batch_size)
    val = make(train_x[val_idx], train_y[val_idx], False, data.eval_batch_size)
    test = make(test_x, test_y, False, data.eval_batch_size)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        spec=MNIST_SPEC,
        root=data_root(data),
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test_y)},
        eval_sets={"val": NormalizedTensors(val), "test": NormalizedTensors(test)},
    )
