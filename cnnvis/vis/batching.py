"""The one batching rule: how many samples (occluded copies, noisy copies, path points, perturbed
images) go through the model in one pass when the caller does not say.

The budget is counted in input elements, so small images (MNIST digits) go hundreds at a time and
large photos fewer, within ``[MIN_BATCH, MAX_BATCH]``. On the CPU smaller batches keep a batch's
activations in cache (for ``mnist_cnn`` on one core 256-512 images per pass ran about 1.3x faster
than 1024 in ``benchmarks/vis_speed.py``); GPUs want large ones. Passes that also run backward keep
their activations for the gradient and get their own budget.
"""

from __future__ import annotations

from torch import Tensor

from cnnvis.errors import VisError

#: input elements per forward-only pass, by device type
FORWARD_ELEMENTS = {"cpu": 2**18, "cuda": 2**24}
#: input elements per forward + backward pass, by device type
BACKWARD_ELEMENTS = {"cpu": 2**20, "cuda": 2**22}
MIN_BATCH = 32
MAX_BATCH = 4096


def batch_size(images: Tensor, requested: int | None = None, *, backward: bool = False,
               sample_elements: int | None = None) -> int:
    """``requested`` if given (checked to be >= 1), else the budget's count for one of ``images``.

    ``sample_elements``: the size of the largest tensor one sample puts through the model, where
    that is not the image (incremental occlusion runs on changed patches and whole deeper maps).
    """
    if requested is not None:
        if int(requested) < 1:
            raise VisError(f"batch_size must be >= 1, got {requested}")
        return int(requested)
    budgets = BACKWARD_ELEMENTS if backward else FORWARD_ELEMENTS
    budget = budgets["cuda" if images.device.type == "cuda" else "cpu"]
    per_sample = images[0].numel() if sample_elements is None else sample_elements
    return max(MIN_BATCH, min(MAX_BATCH, budget // max(1, per_sample)))
