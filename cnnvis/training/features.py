"""Frozen backbone, fast path: with ``model.freeze: backbone`` the backbone's output for an image
never changes, so unless something random changes the images it is computed once, and the head
trains on it every epoch.

It is on when all of these hold (:func:`fast_path_blocker` names every one that does not):

* ``model.freeze: backbone`` and ``train.cache_features`` (the default);
* nothing random in the training images: none of ``data.transforms.random_crop``, ``flip``,
  ``rotation``, ``translate``, ``color_jitter`` and neither ``train.mixup`` nor ``train.cutmix``
  (each would give the backbone other pixels every epoch);
* ``train.tta_flip`` off (validation would need the mirror images' features too) and
  ``train.ema`` off (it averages the whole model each step);
* one training process;
* the head's output is the model's output: the logits of two validation images through the model
  equal the head applied to what reaches it (a model that computes something after its last
  linear layer keeps the ordinary path).

The features are the input of the head (:func:`cnnvis.models.head_module`; a dropout right before
its linear layer is part of it and keeps training), computed in eval mode under
``torch.inference_mode`` on the run's device, in evaluation batches and split order. They are cached as ``RUN/features/<split>-<key>.pt`` (plain tensors, loaded
with ``weights_only=True``); the key hashes the split's images as the backbone sees them (decoded
pixels in memory, or the file list with sizes and modification times and the transform for files),
the backbone's weights and buffers (the head's excluded) and the architecture, so new data or other
weights never reuse stale features. Another run of the same runs folder with the same key lends
its file (a new run with another learning rate starts at once).

Training batches of features are drawn in the order the image batches would have been (the same
generator when the images are in memory), and the head sees the same dropout draws: the fast path
trains the same head as the ordinary one, to float tolerance.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cnnvis.checkpoint import save_checkpoint
from cnnvis.config import Config
from cnnvis.data import DataBundle
from cnnvis.data.tensors import DeviceBatches
from cnnvis.device import autocast, eval_mode, memory_format
from cnnvis.models import head_module
from cnnvis.vis.hooks import temporary_hooks

FEATURES_DIR = "features"
RANDOM_TRANSFORMS = ("random_crop", "flip", "rotation", "translate", "color_jitter")


def fast_path_blocker(config: Config, world_size: int = 1) -> str | None:
    """Why the fast path is off for ``config``, every reason at once (None: nothing in the config stops it)."""
    t, train = config.data.transforms, config.train
    if config.model.freeze != "backbone":
        return "the backbone is trained (model.freeze: none)"
    # all of them, so that one edit of the config turns the fast path on
    reasons = [] if train.cache_features else ["train.cache_features is false"]
    random = [f"data.transforms.{k}" for k in RANDOM_TRANSFORMS if getattr(t, k)]
    random += [f"train.{k}" for k in ("mixup", "cutmix") if getattr(train, k)]
    if random:
        reasons.append(f"random augmentation ({', '.join(random)})")  # other pixels every epoch
    if train.tta_flip:
        reasons.append("train.tta_flip evaluates mirror images as well")
    if train.ema:
        reasons.append("train.ema averages the whole model")
    if world_size > 1:
        reasons.append("several training processes")
    return "; ".join(reasons) or None


class FeatureBatches:
    """Batches of ``(features, labels)`` on the device; shuffled with ``generator`` for training.

    The tensors arrive with :meth:`fill` (after the header is shown); the generator exists from the
    start, so a resumed run restores the order before the features are there."""

    def __init__(self, count: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> None:
        self.count, self.batch_size, self.shuffle = count, batch_size, shuffle
        self.generator = generator if generator is not None else torch.Generator()
        self.features: Tensor | None = None
        self.labels: Tensor | None = None

    def fill(self, features: Tensor, labels: Tensor) -> None:
        self.features, self.labels, self.count = features, labels, len(labels)

    def __len__(self) -> int:
        return (self.count + self.batch_size - 1) // self.batch_size

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.features is None or self.labels is None:
            raise RuntimeError("FeatureBatches used before fill()")
        device = self.labels.device
        # the permutation DeviceBatches draws for the images: the same batches, in the same order
        order = torch.randperm(self.count, generator=self.generator).to(device) if self.shuffle else None
        for start in range(0, self.count, self.batch_size):
            if order is None:
                yield self.features[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size]
                yield self.features[idx], self.labels[idx]


def _in_order(source: object, batch_size: int) -> Any:
    """The images of a training source in split order, as evaluation prepares them (with nothing
    random, that is what training prepares too); None for a source of unknown kind."""
    if isinstance(source, DeviceBatches):
        return DeviceBatches(source.images, source.labels, batch_size, source.mean.flatten().tolist(),
                             source.std.flatten().tolist(), source.labels.device, size=source.size)
    if isinstance(source, DataLoader) and hasattr(source.dataset, "samples"):
        return DataLoader(source.dataset, batch_size=batch_size, shuffle=False, num_workers=source.num_workers,
                          pin_memory=source.pin_memory)
    return None


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def data_key(source: object) -> str | None:
    """A hash of a split's images as the backbone sees them; None when the source is of unknown kind."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(source, DeviceBatches):  # decoded pixels: exact, whatever the files were
        for part in (source.images, source.labels, source.mean, source.std):
            h.update(_tensor_bytes(part))
        h.update(f"size={source.size}".encode())
    elif isinstance(source, DataLoader) and hasattr(source.dataset, "samples"):
        for path, label in source.dataset.samples:
            stat = os.stat(path)
            h.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        h.update(repr(source.dataset.transform).encode())
    else:
        return None
    return h.hexdigest()


def backbone_key(model: nn.Module, head: nn.Module, arch: str, amp: torch.dtype | None) -> str:
    """A hash of everything but the head that decides the features: weights, buffers, architecture."""
    h = hashlib.blake2b(digest_size=16)
    head_tensors = {id(t) for t in [*head.parameters(), *head.buffers()]}
    h.update(f"{arch}\0{type(model).__qualname__}\0{amp}".encode())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in head_tensors:
            h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}".encode())
            h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _first(head: nn.Module) -> nn.Module:
    return head[0] if isinstance(head, nn.Sequential) and len(head) else head


def extract(model: nn.Module, head: nn.Module, batches: Any, device: torch.device,
            amp: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(features, labels, logits)`` of every batch: what reaches the head, on ``device`` (float32)."""
    seen: list[Tensor] = []
    layout = memory_format(model)
    features, labels, logits = [], [], []
    hook = [lambda: _first(head).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))]
    with eval_mode(model), torch.inference_mode(), autocast(device, amp), temporary_hooks(hook):
        for images, y in batches:
            seen.clear()
            logits.append(model(images.to(device, non_blocking=True, memory_format=layout)).float())
            if len(seen) != 1:
                raise _NotAHead(f"the head ran {len(seen)} times in one forward pass")
            features.append(seen[0].float())
            labels.append(y.to(device, non_blocking=True))
    if not features:
        raise _NotAHead("the split is empty")
    return torch.cat(features), torch.cat(labels).long(), torch.cat(logits)


class _NotAHead(Exception):
    """The module found as the head does not make the model's output from what reaches it."""


def check_head(model: nn.Module, head: nn.Module, images: Tensor, device: torch.device,
               amp: torch.dtype | None = None) -> str | None:
    """Why the head applied to what reaches it is not the model's output (None: it is)."""
    try:
        features, _, logits = extract(model, head, [(images, torch.zeros(len(images)))], device, amp)
    except _NotAHead as exc:
        return str(exc)
    with eval_mode(head), torch.inference_mode(), autocast(device, amp):
        again = head(features).float()
    if again.shape != logits.shape or not torch.allclose(again, logits, rtol=1e-3, atol=1e-3 * (1 + float(logits.abs().max()))):
        return "the model computes something after its head"
    return None


class FastPath:
    """The head as the module the trainer steps, and the features of the train and val splits."""

    def __init__(self, config: Config, model: nn.Module, data: DataBundle, device: torch.device,
                 amp: torch.dtype | None, run_dir: Path) -> None:
        self.model, self.device, self.amp, self.run_dir = model, device, amp, Path(run_dir)
        self.head = head_module(model)
        self.sources = {"train": data.train, "val": data.val}
        self.batch_size = config.data.eval_batch_size
        weights = backbone_key(model, self.head, config.model.arch, amp)
        self.files: dict[str, str] = {}
        for split, source in self.sources.items():
            key = data_key(source)
            if key is None:
                raise ValueError(f"the {split} batches come from a {type(source).__name__}")
            self.files[split] = f"{split}-{hashlib.blake2b(f'{key}{weights}'.encode(), digest_size=12).hexdigest()}.pt"
        generator = getattr(data.train, "generator", None) if isinstance(data.train, DeviceBatches) else None
        if generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        self.train = FeatureBatches(data.sizes["train"], config.data.batch_size, True, generator)
        self.val = FeatureBatches(data.sizes["val"], config.data.eval_batch_size, False)
        self.loaded: dict[str, Path] = {}  #: split -> the cache file its features came from
        self.computed: list[str] = []  #: splits whose features were computed by this process

    def cached(self, split: str) -> Path | None:
        """This run's cache file of ``split``, else one another run in the same folder holds."""
        own = self.run_dir / FEATURES_DIR / self.files[split]
        if own.is_file():
            return own
        return next(iter(sorted(self.run_dir.parent.glob(f"*/{FEATURES_DIR}/{self.files[split]}"))), None)

    def _load(self, path: Path) -> tuple[Tensor, Tensor] | None:
        try:
            payload = torch.load(path, map_location=self.device, weights_only=True)
            return payload["features"], payload["labels"]
        except Exception:  # noqa: BLE001 - a damaged or foreign cache file is recomputed, never trusted
            return None

    def prepare(self) -> None:
        """Load every split's features from the cache, or compute them (once) and cache them."""
        for split, target in (("train", self.train), ("val", self.val)):
            path = self.cached(split)
            loaded = self._load(path) if path is not None else None
            if loaded is not None:
                self.loaded[split] = path
            else:
                features, labels, _ = extract(self.model, self.head, _in_order(self.sources[split], self.batch_size),
                                              self.device, self.amp)
                loaded = features.clone(), labels.clone()  # normal tensors: inference-mode ones refuse autograd
                own = self.run_dir / FEATURES_DIR / self.files[split]
                for stale in own.parent.glob(f"{split}-*.pt"):  # another data set's or weights' features
                    stale.unlink(missing_ok=True)
                save_checkpoint({"kind": "features", "features": features.cpu(), "labels": labels.cpu()}, own)
                self.computed.append(split)
            target.fill(*loaded)


def plan_fast_path(config: Config, model: nn.Module, data: DataBundle, device: torch.device, amp: torch.dtype | None,
                   run_dir: Path, world_size: int = 1) -> tuple[FastPath | None, list[str]]:
    """``(fast path or None, the lines the run's header says about it)``; none when the backbone trains."""
    if config.model.freeze != "backbone":
        return None, []
    why = fast_path_blocker(config, world_size)
    if why is None and (isinstance(data.train, DeviceBatches) or _in_order(data.train, 1) is not None):
        try:
            fixed = data.fixed_batch("val", 2).images
            why = check_head(model, head_module(model), fixed, device, amp)
        except Exception as exc:  # noqa: BLE001 - any model the check cannot run keeps the ordinary path
            why = f"the head could not be checked ({type(exc).__name__}: {exc})"
    elif why is None:
        why = f"the training batches come from a {type(data.train).__name__}"
    off = ["off: {}", "the whole network runs every step"]
    if why is not None:
        return None, [off[0].format(why), off[1]]
    try:
        fast = FastPath(config, model, data, device, amp, run_dir)
    except ValueError as exc:
        return None, [off[0].format(exc), off[1]]
    found = [split for split in ("train", "val") if fast.cached(split) is not None]
    return fast, ["on: frozen backbone, nothing random: only the head runs each step",
                  f"on the backbone's features, {'found in a cache: ' + ', '.join(found) if found else 'computed once'} "
                  f"(RUN/{FEATURES_DIR}/)"]
