"""A faster stand-in for the model in input-gradient passes: BatchNorm folded into the
convolutions, channels-last layout.

In eval mode a BatchNorm is an affine map, so folding it into the preceding convolution
(``torch.fx.experimental.optimization.fuse``) changes neither the logits nor their gradient with
respect to the input, only the rounding; the channels-last layout lets oneDNN pick faster CPU
kernels. Together they halve the time of integrated gradients on the digit net (0.54 vs 1.09 s
for 32 digits x 50 steps). The copy is made once per model, checked to give the model's logits
on a few of the images, and kept while the model lives and its weights stay the same (every
parameter's and buffer's identity and in-place version counter are compared at each call); the
model itself is used for anything that cannot be traced or does not match. Only the CPU, float32, [N, C, H, W] images; the user's model is never changed.
"""

from __future__ import annotations

import warnings
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from cnnvis.device import eval_mode

_COPIES: WeakKeyDictionary[nn.Module, tuple[nn.Module, tuple]] = WeakKeyDictionary()
_CHECKED = 4  #: images a new copy is checked on


def _fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a weight or buffer is replaced or modified in place (optimizer steps,
    ``load_state_dict``): each tensor's identity and autograd version counter."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


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
    fingerprint = _fingerprint(model)
    cached = _COPIES.get(model)
    if cached is not None and cached[1] == fingerprint:
        fast = cached[0]
    elif torch._C._is_torch_function_mode_enabled():
        return model, images  # tracing now would record the active mode's overrides (guided ReLUs ...)
    else:  # first use, or the weights changed since the last copy
        with eval_mode(model), torch.no_grad():
            fast = _build(model)
            if fast is not model and not _agrees(fast, model, images[:_CHECKED].detach()):
                fast = model
        _COPIES[model] = (fast, fingerprint)
    if fast is model:
        return model, images
    return fast, images.contiguous(memory_format=torch.channels_last)
