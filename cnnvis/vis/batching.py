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
#: input elements per forward + backward pass, by device type: for mnist_cnn on one core 668 digits
#: per pass (2**19) ran 1.3-1.4x faster than 1337 (2**20) in integrated gradients and the noise
#: tunnel (benchmarks/vis_speed.py, a shared machine); images of 128 px and more get MIN_BATCH either way
BACKWARD_ELEMENTS = {"cpu": 2**19, "cuda": 2**22}
#: elements of the largest activation one pass holds, for passes that know it (incremental occlusion
#: runs on patches and small deep maps, so its images count for less than their pixels): mnist_cnn's
#: full forward at the input budget above holds 334 x 16 x 28 x 28 ~ 2**22; for incremental occlusion
#: of ResNet-18 at 224 px, 64-128 copies per pass ran 1.2x faster than 32 (1 thread)
ACTIVATION_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}
MIN_BATCH = 32
MAX_BATCH = 4096


def batch_size(images: Tensor, requested: int | None = None, *, backward: bool = False,
               activation_elements: int | None = None) -> int:
    """``requested`` if given (checked to be >= 1), else the budget's count for one of ``images``.

    ``activation_elements``: the largest activation one sample puts through a forward-only pass,
    where the caller knows it; then :data:`ACTIVATION_ELEMENTS` is the budget instead of the input's.
    """
    if requested is not None:
        if int(requested) < 1:
            raise VisError(f"batch_size must be >= 1, got {requested}")
        return int(requested)
    device = "cuda" if images.device.type == "cuda" else "cpu"
    if activation_elements is not None and not backward:
        return max(MIN_BATCH, min(MAX_BATCH, ACTIVATION_ELEMENTS[device] // max(1, activation_elements)))
    budget = (BACKWARD_ELEMENTS if backward else FORWARD_ELEMENTS)[device]
    return max(MIN_BATCH, min(MAX_BATCH, budget // max(1, images[0].numel())))
