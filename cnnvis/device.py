"""Where and how a model runs: the device, mixed precision, and eval mode for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from cnnvis.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N", parameter="device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: CUDA is not available on this machine", "Use the cpu or auto device.",
                              parameter="device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)", parameter="device")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N", parameter="device")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` (auto, bf16, fp16 or off) on ``device``: mixed precision is a CUDA feature here."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or nothing when it is ``None``."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the body, every submodule's own flag restored after (BatchNorm statistics untouched)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def memory_format(model: nn.Module) -> torch.memory_format:
    """The memory format the trainer chose for ``model`` (``channels_last`` or contiguous)."""
    return getattr(model, "_cnnvis_memory_format", torch.contiguous_format)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch; ``deterministic`` trades speed (cuDNN autotuning) for repeatable results."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
