"""Layer-by-layer model summary (names, shapes, parameters, mult-adds) from one hooked forward pass.

Each row's ``name`` is exactly the dotted name from ``model.named_modules()`` (``features.3``,
``layer4.1.conv2``) -- the value a user passes as ``--layer`` -- so every listed name works with
``model.get_submodule(name)``; :attr:`LayerRow.usable` says whether ``--layer`` can take it (it ran
and returned a tensor). Mult-adds come from :class:`torch.utils.flop_counter.FlopCounterMode`, which
counts the aten ops themselves: a Linear on 197 tokens counts 197 times, attention's matrix products
count, and a ``.pt2`` program (whose modules are no nn.Conv2d) counts like the model it came from.
Nothing is printed; the CLI renders the rows as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, overload

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils.hooks import RemovableHandle

from cnnvis.device import eval_mode
from cnnvis.errors import CnnvisError
from cnnvis.vis.hooks import temporary_hooks

__all__ = ["LayerRow", "ModelSummary", "summarize", "summarize_source"]

Trainable = Literal["trainable", "frozen", "partial", "-"]


@dataclass(frozen=True)
class LayerRow:
    """One module of the model.

    Attributes:
        name: dotted name as in ``model.named_modules()`` (usable with ``get_submodule``).
        type: class name (``Conv2d``, ``BasicBlock`` ...).
        depth: nesting depth (``features`` = 1, ``features.3`` = 2, ...).
        output_shape: output shape of its first call (batch included), ``None`` if the module
            was not called in the forward pass or returned something that is not a tensor.
        num_params: parameters of the module including its children.
        trainable_params: how many of those have ``requires_grad``.
        trainable: ``"trainable"``, ``"frozen"``, ``"partial"`` or ``"-"`` (no parameters).
        mult_adds: multiply-adds of one forward pass of the given input, over all calls of the
            module, its children's included (convolutions, matrix products, attention; norms and
            activations count 0).
        is_leaf: has no child modules.
        calls: how often the forward pass called it (ResNet blocks reuse their ``relu``).
        input_shape: input shape of its first call, ``None`` if not called.
        output_type: type name of its first call's output (``Tensor``, ``tuple`` ...; ``""``
            if not called).
    """

    name: str
    type: str
    depth: int
    output_shape: tuple[int, ...] | None
    num_params: int
    trainable_params: int
    trainable: Trainable
    mult_adds: int
    is_leaf: bool
    calls: int = 1
    input_shape: tuple[int, ...] | None = None
    output_type: str = ""

    @property
    def executed(self) -> bool:
        return self.calls > 0

    @property
    def usable(self) -> bool:
        """``--layer`` can take it: it ran and returned one tensor. A module whose parent only
        uses its weights (nn.MultiheadAttention's ``out_proj``) never runs; attention returns a tuple."""
        return self.output_shape is not None


@dataclass(frozen=True)
class ModelSummary(Sequence[LayerRow]):
    """The rows (a sequence of :class:`LayerRow`, model root excluded) plus totals.

    Index with an int/slice or a layer name: ``summary["layer4.1.conv2"]``.
    """

    rows: tuple[LayerRow, ...]
    model: str
    input_size: tuple[int, ...]
    total_params: int
    trainable_params: int
    mult_adds: int
    param_bytes: int = 0
    buffer_bytes: int = 0
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({row.name: i for i, row in enumerate(self.rows)})

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def names(self) -> list[str]:
        """The names ``--layer`` takes (:attr:`LayerRow.usable`), in tree order."""
        return [row.name for row in self.rows if row.usable]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerRow]:
        return iter(self.rows)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._index
        return item in self.rows

    @overload
    def __getitem__(self, key: int | str) -> LayerRow: ...

    @overload
    def __getitem__(self, key: slice) -> tuple[LayerRow, ...]: ...

    def __getitem__(self, key: int | str | slice) -> LayerRow | tuple[LayerRow, ...]:
        if isinstance(key, str):
            try:
                return self.rows[self._index[key]]
            except KeyError:
                raise KeyError(f"no layer named {key!r}") from None
        return self.rows[key]


def _trainable(total: int, trainable: int) -> Trainable:
    if total == 0:
        return "-"
    if trainable == 0:
        return "frozen"
    return "trainable" if trainable == total else "partial"


def _count(params: Sequence[nn.Parameter]) -> tuple[int, int]:
    seen: set[int] = set()
    total = trainable = 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def _model_device(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    return devices.pop() if len(devices) == 1 else None


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@dataclass
class _Seen:
    """What the hooks saw of one module: its calls, and its first call's input and output."""

    calls: int = 0
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    output_type: str = ""


def _record_calls(model: nn.Module) -> tuple[dict[str, _Seen], list[Callable[[], RemovableHandle]]]:
    """What each module's first call saw, and the hook registrations that fill it in
    (for :func:`~cnnvis.vis.hooks.temporary_hooks`)."""
    seen: dict[str, _Seen] = {}
    register: list[Callable[[], RemovableHandle]] = []

    def pre(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            if name not in seen:
                x = args[0] if args else None
                seen[name] = _Seen(input_shape=tuple(x.shape) if isinstance(x, Tensor) else None)
        return hook

    def post(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_m: nn.Module, _args: tuple, out: object) -> None:
            record = seen.setdefault(name, _Seen())
            if record.calls == 0:
                record.output_type = type(out).__name__
                record.output_shape = tuple(out.shape) if isinstance(out, Tensor) else None
            record.calls += 1
        return hook

    for name, module in model.named_modules():
        if name:
            register += [partial(module.register_forward_pre_hook, pre(name)),
                         partial(module.register_forward_hook, post(name))]
    return seen, register


def _attention_flops(query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], *_args: object,
                     **_kwargs: object) -> int:
    return sdpa_flop_count(query, key, value)


#: the fused attention kernel FlopCounterMode has no formula for (the CPU one) counts like the CUDA ones
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


@contextmanager
def _no_attention_fastpath() -> Iterator[None]:
    """nn.MultiheadAttention's inference fast path is one fused op no flop formula knows: take the
    ordinary path (projections, matrix products) so that it is counted."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _flops_by_name(counter: FlopCounterMode) -> dict[str, int]:
    """FlopCounterMode's per-module counts keyed like ``named_modules()``: it names each module
    ``RootClass.dotted.name``."""
    out: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if "." in key:
            out[key.split(".", 1)[1]] = sum(ops.values())
    return out


def summarize(
    model: nn.Module,
    input_size: Sequence[int] = (1, 1, 28, 28),
    device: str | torch.device | None = None,
) -> ModelSummary:
    """Run one forward pass of zeros of ``input_size`` through ``model`` and describe each module.

    Args:
        model: any ``nn.Module``; its train/eval mode (of every submodule), its BatchNorm
            statistics, its gradients and its device are left as they were.
        input_size: ``(N, C, H, W)``; a ``(C, H, W)`` size gets a batch of 1.
        device: where to run the pass (default: where the model is, CPU if it has no
            parameters). The model is moved back afterwards.

    Returns a :class:`ModelSummary`: a sequence of :class:`LayerRow` in tree order (as
    ``named_modules()``; a module the forward pass never called has ``calls == 0``) with the totals.
    Mult-adds are what :class:`torch.utils.flop_counter.FlopCounterMode` counts, halved: the
    convolutions, matrix products and attention, whatever module type runs them (so a ``.pt2``
    program's too); norms and activations are not counted.

    Raises :class:`~cnnvis.errors.CnnvisError` when the model cannot run on that input size.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = (1, *size)
    if not size or any(s <= 0 for s in size):
        raise CnnvisError(f"invalid input size {list(input_size)}", "Give (batch, channels, height, width).")

    home = _model_device(model)
    run_on = torch.device(device) if device is not None else (home or torch.device("cpu"))
    seen, register = _record_calls(model)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        # eval: no BatchNorm statistics are updated, dropout is off; every module's own mode comes back
        with eval_mode(model), temporary_hooks(register):
            model.to(run_on)
            x = torch.zeros(size, dtype=_model_dtype(model), device=run_on)
            try:
                with torch.no_grad(), _no_attention_fastpath(), counter:
                    model(x)
            except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CnnvisError(
                    f"{type(model).__name__} cannot run on an input of size {list(size)}: {detail}",
                    "Check that the channels and image size match the model and its data set.",
                ) from None
    finally:
        if home is not None and _model_device(model) != home:
            model.to(home)

    flops = _flops_by_name(counter)
    rows = []
    for name, module in model.named_modules():
        if not name:
            continue
        record = seen.get(name, _Seen())
        total, trainable = _count(list(module.parameters()))
        rows.append(
            LayerRow(
                name=name,
                type=type(module).__name__,
                depth=name.count(".") + 1,
                output_shape=record.output_shape,
                num_params=total,
                trainable_params=trainable,
                trainable=_trainable(total, trainable),
                mult_adds=flops.get(name, 0) // 2,
                is_leaf=not any(True for _ in module.children()),
                calls=record.calls,
                input_shape=record.input_shape,
                output_type=record.output_type,
            )
        )

    total, trainable = _count(list(model.parameters()))
    return ModelSummary(
        rows=tuple(rows),
        model=type(model).__name__,
        input_size=size,
        total_params=total,
        trainable_params=trainable,
        mult_adds=counter.get_total_flops() // 2,
        param_bytes=sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
    )


def summarize_source(source: str | Path, overrides: Sequence[str] = (), **model_options: object) -> tuple[ModelSummary, str]:
    """The layer table of a config's model (``.yaml``, built with random weights), of a trained run
    or checkpoint, or of any other MODEL :func:`cnnvis.sources.load_source` takes (``model_options``:
    ``weights``, ``size`` ...); returns it with a title naming the architecture and the source."""
    from cnnvis.config import load_config
    from cnnvis.data import dataset_spec
    from cnnvis.models import build_model, freeze_backbone
    from cnnvis.sources import is_run_source, load_source
    from cnnvis.zoo import parse_source

    path = Path(str(source))
    if path.suffix in (".yaml", ".yml"):
        config = load_config(path, list(overrides))
        spec = dataset_spec(config)
        model = build_model(config.model.arch, spec.num_classes, spec.in_channels, spec.image_size,
                            freeze=config.model.freeze, dropout=config.model.dropout)
        title = f"{config.model.arch} ({path})"
        size = (spec.image_size, spec.image_size)
    else:
        if overrides and not is_run_source(source):
            raise CnnvisError("--set changes a config; this model has none")
        if parse_source(str(source)) is not None:  # the table does not depend on the weights: none downloaded unless asked
            model_options = {"weights": "none", **model_options}
        run = load_source(str(source), allow_untrained=True, **model_options)
        model, spec = run.model, run.spec
        if run.config is not None and run.config.model.freeze == "backbone":
            freeze_backbone(model)
        if isinstance(model, torch.jit.ScriptModule):
            raise CnnvisError(f"{source}: a TorchScript program cannot be hooked, so it has no layer table",
                              "Export the model with torch.export (a .pt2) instead.")
        title = f"{run.architecture} ({run.checkpoint})" if run.origin is None else run.label
        size = run.preprocessing.crop
    return summarize(model, input_size=(1, spec.in_channels, *size)), title
