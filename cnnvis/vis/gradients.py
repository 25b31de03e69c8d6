"""Input gradients of target logits, the building block of the gradient-based heatmaps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnvis.vis.hooks import Targets, as_input, check_images, model_state, resolve_targets, target_scores

#: Default budget for batched methods: about this many input elements per forward/backward pass.
INPUT_ELEMENTS_PER_BATCH = 2**20


def auto_batch(images: Tensor, batch_size: int | None) -> int:
    """``batch_size`` if given, else as many samples as fit ``INPUT_ELEMENTS_PER_BATCH`` (at least 1)."""
    if batch_size is not None:
        if int(batch_size) < 1:
            from cnnvis.vis.errors import VisError

            raise VisError(f"batch size must be >= 1, got {batch_size}")
        return int(batch_size)
    return max(1, INPUT_ELEMENTS_PER_BATCH // images[0].numel())


def grad_of_targets(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    """d logit[i, targets[i]] / d x[i] for a batch; call inside ``model_state(model, grad=True)``.

    The scores are summed over the batch, which is exact because in eval mode images do not interact.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(target_scores(logits, targets).sum(), x)
    return grad


def input_gradients(model: nn.Module, images: Tensor, targets: Targets = "pred") -> Tensor:
    """``[N, C, H, W]`` gradients of each image's target logit with respect to the image (one forward)."""
    check_images(model, images)
    with model_state(model, grad=True):
        x = as_input(images, requires_grad=True)
        logits = model(x)
        t = resolve_targets(targets, logits)
        (grad,) = torch.autograd.grad(target_scores(logits, t).sum(), x)
    return grad
