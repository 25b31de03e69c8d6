"""Building blocks of what cnnvis writes to TensorBoard: a writer that opens its file on first use,
the model graph made best-effort, histograms computed on the device, and tag-safe names."""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from cnnvis.device import eval_mode

MIN_SHOWN_SIDE = 56  # small images (MNIST's 28 px) are enlarged, pixel-exact, to at least this


class TensorBoardWarning(UserWarning):
    """A logging extra that failed or found something odd; training goes on."""


# ---------------------------------------------------------------------- graph


class _TensorOutputs(nn.Module):
    """Lets the tracer read a model whose forward returns a dict, list or tuple of tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(_tensors(self.model(x)))


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def log_graph(writer: SummaryWriter, model: nn.Module, example: Tensor) -> bool:
    """``add_graph`` made best-effort: eval mode, no autograd, non-strict trace, quiet.

    Returns whether the graph was written; a failure is one :class:`TensorBoardWarning`.
    """
    try:
        with eval_mode(model), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
            out = model(example)
            traced = model if isinstance(out, Tensor) else _TensorOutputs(model)
            if not _tensors(out):
                raise TypeError(f"the model returned a {type(out).__name__}, not tensors")
            writer.add_graph(traced, example, use_strict_trace=False)
        return True
    except Exception as exc:
        warnings.warn(f"TensorBoard: model graph not logged ({one_line(exc)})", TensorBoardWarning, stacklevel=2)
        return False


def histogram_rows(tensors: Sequence[Tensor], bins: int) -> Tensor:
    """Per tensor ``[min, max, count, sum, sum of squares, non-finite count, bins x counts]`` over its
    finite values, computed on the tensors' device without a host sync and returned in one copy."""
    rows = []
    for t in tensors:
        x = t.detach().reshape(-1).float()
        finite = torch.isfinite(x)
        inf = torch.tensor(float("inf"), device=x.device)
        lo = torch.where(finite, x, inf).amin()
        hi = torch.where(finite, x, -inf).amax()
        lo0 = torch.where(torch.isfinite(lo), lo, 0.0)
        hi0 = torch.where(torch.isfinite(hi), hi, 0.0)
        xz = torch.where(finite, x, lo0)
        width = (hi0 - lo0) / bins
        scale = torch.where(width > 0, 1.0 / width, 0.0)
        index = ((xz - lo0) * scale).floor().clamp_(0, bins - 1).long()
        counts = torch.zeros(bins, dtype=torch.float64, device=x.device).index_add_(0, index, finite.double())
        xd = torch.where(finite, x, 0.0).double()
        stats = torch.stack([lo0.double(), hi0.double(), finite.sum().double(), xd.sum(), (xd * xd).sum(), (~finite).sum().double()])
        rows.append(torch.cat([stats, counts]))
    return torch.stack(rows).cpu()


# ---------------------------------------------------------------------- pictures


def enlarge(images: Tensor) -> Tensor:
    """Pixel-exact (nearest) enlargement of small images so a digit is visible in the dashboard."""
    side = max(images.shape[-2:])
    factor = math.ceil(MIN_SHOWN_SIDE / side) if side < MIN_SHOWN_SIDE else 1
    return images.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else images


# ---------------------------------------------------------------------- small helpers


def hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


def class_tags(names: Sequence[str]) -> list[str]:
    """Tag-safe class names, unique (a clash gets its class index appended)."""
    tags = [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(n)).strip("_") or f"class_{i}" for i, n in enumerate(names)]
    seen: dict[str, int] = {}
    for t in tags:
        seen[t] = seen.get(t, 0) + 1
    return [t if seen[t] == 1 else f"{t}_{i}" for i, t in enumerate(tags)]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class LazyWriter:
    """A ``SummaryWriter`` on ``log_dir`` that creates its events file at the first call, so a command
    that fails before it logs anything leaves no empty events file in the run."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = str(log_dir)
        self._writer: SummaryWriter | None = None

    def __getattr__(self, name: str) -> Any:
        if self._writer is None:
            self._writer = SummaryWriter(self.log_dir)
        return getattr(self._writer, name)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
