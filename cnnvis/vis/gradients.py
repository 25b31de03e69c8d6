"""Input gradients of target logits, the building block of the gradient-based heatmaps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnvis.vis.fused import gradient_copy
from cnnvis.vis.hooks import (
    Targets,
    as_input,
    check_images,
    model_state,
    resolve_targets,
    target_scores,
)


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
    model, images = gradient_copy(model, images)
    with model_state(model, grad=True):
        x = as_input(images, requires_grad=True)
        logits = model(x)
        t = resolve_targets(targets, logits)
        (grad,) = torch.autograd.grad(target_scores(logits, t).sum(), x)
    return grad
