"""A tiny two-class digit-like data set batched on the CPU, for the TensorBoard tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from cnnvis.data import MNIST_MEAN, MNIST_STD, DataBundle, ImageSpec
from cnnvis.data.tensors import DeviceBatches


def gray_bundle(n_train: int = 32, n_eval: int = 16, seed: int = 0) -> DataBundle:
    """Two classes of 28x28 grey digits-like pictures, batched on the CPU like MNIST."""
    g = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")

    def pictures(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 2
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        images[labels == 1, 10:18, :] = 230
        return images, labels

    def normalised(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        x = (images.float().div(255).unsqueeze(1) - MNIST_MEAN[0]) / MNIST_STD[0]
        return TensorDataset(x, labels)

    tr, va, te = pictures(n_train), pictures(n_eval), pictures(n_eval)
    batches = lambda d, bs, shuffle: DeviceBatches(*d, bs, MNIST_MEAN, MNIST_STD, cpu, shuffle=shuffle, seed=seed)  # noqa: E731
    return DataBundle(
        train=batches(tr, 8, True), val=batches(va, 8, False), test=batches(te, 8, False),
        spec=ImageSpec(("zero", "one"), MNIST_MEAN, MNIST_STD, 1, 28),
        sizes={"train": n_train, "val": n_eval, "test": n_eval},
        eval_sets={"val": normalised(*va), "test": normalised(*te)},
    )
