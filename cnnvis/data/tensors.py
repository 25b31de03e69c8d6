"""Data sets held as one uint8 tensor on the device, batched, augmented and normalised there.

MNIST always takes this path; an image folder takes it when its decoded pictures fit in memory
(``data.in_memory``): the photos are decoded and resized once, and an epoch then costs only the
network. Augmentation is per image but batched: one affine resample (``grid_sample``) does the
random-resized crop, the flip, the rotation and the shift of a whole batch, and colour jitter is
a few broadcast multiplications; no per-sample Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cnnvis.config import TransformConfig

RATIO = (3 / 4, 4 / 3)  #: aspect ratios of the random-resized crop, as torchvision's RandomResizedCrop


class BatchAugment:
    """Per-image random geometry and colour for a float batch in ``[0, 1]``, drawn from ``generator``.

    Geometry is one affine map per image, applied with bilinear ``grid_sample`` to ``size``:
    a random-resized crop (area ``crop_scale .. 1`` of the image, aspect ``3/4 .. 4/3``) when
    ``random_crop``, else the centre ``size`` pixels; a horizontal flip with probability 1/2 when
    ``flip``; a rotation up to ``rotation`` degrees and a shift up to ``translate`` of the side.
    ``color_jitter`` scales brightness, contrast and saturation by factors in ``1 +- color_jitter``.
    """

    def __init__(self, t: TransformConfig, size: int, generator: torch.Generator) -> None:
        self.t, self.size, self.generator = t, size, generator

    @property
    def active(self) -> bool:
        t = self.t
        return bool(t.random_crop or t.flip or t.rotation or t.translate or t.color_jitter)

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> Tensor:
        return (torch.rand(n, generator=self.generator) * (high - low) + low).to(device)

    def __call__(self, x: Tensor) -> Tensor:
        t, n, device = self.t, x.shape[0], x.device
        if t.rotation or t.translate:
            # drawn first and in one call, as the digit pipeline always did: its runs stay reproducible
            params = torch.rand(n, 3, generator=self.generator).to(device) * 2 - 1
            angle = params[:, 0] * (t.rotation * math.pi / 180)
            shift = params[:, 1:] * (2 * t.translate)  # grid units span 2 per side
        else:
            angle, shift = torch.zeros(n, device=device), torch.zeros(n, 2, device=device)
        side = x.shape[-1]
        if t.random_crop:
            area = self._uniform(n, t.crop_scale, 1.0, device)
            aspect = torch.exp(self._uniform(n, math.log(RATIO[0]), math.log(RATIO[1]), device))
            width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
            centre = torch.stack([self._uniform(n, -1, 1, device) * (1 - width),
                                  self._uniform(n, -1, 1, device) * (1 - height)], 1)
        else:
            width = height = torch.full((n,), min(1.0, self.size / side), device=device)
            centre = torch.zeros(n, 2, device=device)
        mirror = torch.where(torch.rand(n, generator=self.generator).to(device) < 0.5, -1.0, 1.0) if t.flip else 1.0
        if t.random_crop or t.flip or t.rotation or t.translate or self.size != side:
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta = torch.stack([
                torch.stack([cos * width * mirror, -sin * height, centre[:, 0] + shift[:, 0]], 1),
                torch.stack([sin * width * mirror, cos * height, centre[:, 1] + shift[:, 1]], 1),
            ], 1)
            grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
            padding = "reflection" if t.random_crop else "zeros"
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
        if t.color_jitter:
            x = self._jitter(x)
        return x

    def _jitter(self, x: Tensor) -> Tensor:
        j, n, device = self.t.color_jitter, x.shape[0], x.device
        factors = [self._uniform(n, max(0.0, 1 - j), 1 + j, device).view(n, 1, 1, 1) for _ in range(3)]
        brightness, contrast, saturation = factors
        x = x * brightness
        grey = x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x
        x = (x - grey.mean(dim=(2, 3), keepdim=True)) * contrast + grey.mean(dim=(2, 3), keepdim=True)
        if x.shape[1] == 3:
            grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])
            x = grey + (x - grey) * saturation
        return x.clamp(0.0, 1.0)


class DeviceBatches:
    """Batches from uint8 images ``[N, C, H, W]`` (or ``[N, H, W]``) that live on the device.

    Training batches (``augment``) are shuffled and augmented with :class:`BatchAugment`;
    evaluation batches are the centre ``size`` pixels. Both are normalised with ``mean``/``std``.

    With ``world_size`` processes, process ``rank`` takes its contiguous share of every global
    training batch of ``batch_size`` (each process draws the same seeded permutation, and augments
    its share with a generator of its own), and its contiguous share of an evaluation split: every
    image once over all processes, none twice.
    """

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
        size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        images = images.unsqueeze(1) if images.ndim == 3 else images
        self.images = images.to(device)  # uint8: a quarter of float32
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.size = size or images.shape[-1]
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)  # the order: the same on every rank
        # One process draws order and augmentation from one generator (as it always has); several
        # draw augmentation apart, so that the order generators stay in step whatever they augment.
        self.augment_generator = self.generator if world_size == 1 else torch.Generator().manual_seed(
            seed * 1000 + rank + 1)
        augmenter = BatchAugment(augment, self.size, self.augment_generator) if augment is not None else None
        self.augment = augmenter if augmenter is not None and augmenter.active else None

    def __len__(self) -> int:
        count = len(self.labels) if self.shuffle else len(self._eval_share())
        return (count + self.batch_size - 1) // self.batch_size

    def shard_sizes(self, step: int) -> tuple[int, int]:
        """``(this rank's images, all ranks' images)`` in training batch ``step``."""
        total = min(self.batch_size, len(self.labels) - step * self.batch_size)
        return len(range(total)[self._share(total)]), total

    def _share(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items, as ``Tensor.tensor_split`` cuts them."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def _eval_share(self) -> Tensor:
        return torch.arange(len(self.labels), device=self.labels.device)[self._share(len(self.labels))]

    def state_dict(self) -> dict[str, Tensor]:
        state = {"generator": self.generator.get_state()}
        if self.augment_generator is not self.generator:
            state["augment_generator"] = self.augment_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
        if self.augment_generator is not self.generator and "augment_generator" in state:
            self.augment_generator.set_state(state["augment_generator"])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        device = self.labels.device
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(device)
        else:
            order, n = self._eval_share(), len(self._eval_share())
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.shuffle and self.world_size > 1:
                idx = idx[self._share(len(idx))]
            x = self.images[idx].float().div_(255)
            x = self.augment(x) if self.augment is not None else centre_crop(x, self.size)
            yield (x - self.mean) / self.std, self.labels[idx]


def centre_crop(x: Tensor, size: int) -> Tensor:
    """The centre ``size x size`` pixels (torchvision ``CenterCrop``'s offsets)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


class NormalizedTensors(Dataset):
    """Index access to the images of evaluation :class:`DeviceBatches` as they are batched (fixed images)."""

    def __init__(self, batches: DeviceBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = centre_crop(self.batches.images[i].float().div(255), self.batches.size)
        return ((x - self.batches.mean[0]) / self.batches.std[0]).cpu(), self.batches.labels[i].cpu()
