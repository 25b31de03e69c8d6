"""Guided backpropagation (Springenberg et al. 2014, "Striving for Simplicity", sec. 3.4, fig. 1).

At every ReLU the backward signal is ``R_l = (f_l > 0) * (R_{l+1} > 0) * R_{l+1}``: the usual ReLU
mask times a mask that drops negative gradients. The rule is applied for the duration of one call
through a ``TorchFunctionMode`` that swaps every ReLU *call* (``nn.ReLU`` modules, in-place or not,
reused or not, and ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` / ``relu_`` inside ``forward``)
for :class:`GuidedReLU`. The user's model is not modified: no module is replaced and no hook is added.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cnnvis.errors import UnsupportedModelError
from cnnvis.vis.fused import gradient_copy
from cnnvis.vis.gradients import input_gradients
from cnnvis.vis.hooks import Targets
from cnnvis.vis.maps import Reduce, reduce_channels


class GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes only positive gradients where the input was positive."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


_OUT_OF_PLACE = {torch.relu, torch._C.TensorBase.relu}
_IN_PLACE = {torch.relu_, torch._C.TensorBase.relu_}


class GuidedReLUMode(TorchFunctionMode):
    """Routes every ReLU call through :class:`GuidedReLU`; ``count`` says how many it rewrote."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.relu:
            inplace = bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return self._relu(args[0], inplace)
        if func in _OUT_OF_PLACE:
            return self._relu(args[0], False)
        if func in _IN_PLACE:
            return self._relu(args[0], True)
        return func(*args, **kwargs)

    def _relu(self, x: Tensor, inplace: bool) -> Tensor:
        self.count += 1
        out = GuidedReLU.apply(x)
        # keep in-place semantics for code that relies on the side effect (x.relu_(); use x)
        return x.copy_(out) if inplace else out


@contextmanager
def guided_relus() -> Iterator[GuidedReLUMode]:
    """Inside the body every ReLU call backpropagates with the guided rule."""
    with GuidedReLUMode() as mode:
        yield mode


def guided_backprop_gradients(model: nn.Module, images: Tensor, targets: Targets = "pred") -> Tensor:
    """Signed guided-backprop gradients ``[N, C, H, W]``; raises if the model calls no ReLU."""
    fast, laid_out = gradient_copy(model, images)  # made before the guided mode is on: traced with plain ReLUs
    with guided_relus() as mode:
        grads = input_gradients(fast, laid_out, targets)
    if mode.count == 0:
        raise UnsupportedModelError(
            f"guided backprop found no ReLU call in {type(model).__name__}; it would be a plain gradient. "
            "Use 'saliency' instead."
        )
    return grads


def guided_backprop(model: nn.Module, images: Tensor, targets: Targets = "pred", *, reduce: Reduce = "absmax") -> Tensor:
    """Guided-backprop heatmaps ``[N, H, W]`` (``reduce=None``: the signed ``[N, C, H, W]`` gradients)."""
    return reduce_channels(guided_backprop_gradients(model, images, targets), reduce)
