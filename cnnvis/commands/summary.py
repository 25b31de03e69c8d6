"""Layer-by-layer model summary (names, shapes, parameters, mult-adds) via torchinfo.

Each row's ``name`` is exactly the dotted name from ``model.named_modules()`` (``features.3``,
``layer4.1.conv2``) -- the value a user passes as ``--layer`` -- so every listed name works with
``model.get_submodule(name)``. Nothing is printed; the CLI renders the rows as a table.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import torch
from torch import nn

from cnnvis.errors import CnnvisError

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
            was not called in the forward pass (or returned something that is not a tensor).
        num_params: parameters of the module including its children.
        trainable_params: how many of those have ``requires_grad``.
        trainable: ``"trainable"``, ``"frozen"``, ``"partial"`` or ``"-"`` (no parameters).
        mult_adds: multiply-adds of one forward pass of the given input (containers: the sum of
            their layers), over all calls of the module.
        is_leaf: has no child modules.
        calls: how often the forward pass called it (ResNet blocks reuse their ``relu``).
        input_shape: input shape of its first call, ``None`` if not called.
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

    @property
    def executed(self) -> bool:
        return self.calls > 0


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
        return [row.name for row in self.rows]

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


def _shape(size: object) -> tuple[int, ...] | None:
    if isinstance(size, (list, tuple)) and size and all(isinstance(s, int) for s in size):
        return tuple(int(s) for s in size)
    return None


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

    Returns a :class:`ModelSummary`: a sequence of :class:`LayerRow` in forward order (modules
    that were never called come last with ``calls == 0``) with the totals.

    Raises :class:`~cnnvis.errors.CnnvisError` when the model cannot run on that input size.
    """
    import torchinfo

    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = (1, *size)
    if not size or any(s <= 0 for s in size):
        raise CnnvisError(f"invalid input size {list(input_size)}", "Give (batch, channels, height, width).")

    home = _model_device(model)
    run_on = torch.device(device) if device is not None else (home or torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # no BatchNorm statistics are updated, dropout is off
        try:
            with torch.no_grad():
                stats = torchinfo.summary(
                    model, input_size=size, device=run_on, mode="eval", verbose=0, depth=10_000
                )
        except RuntimeError as exc:
            cause = exc.__cause__ or exc
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise CnnvisError(
                f"{type(model).__name__} cannot run on an input of size {list(size)}: {detail}",
                "Check that the channels and image size match the model and its data set.",
            ) from None
        finally:
            try:  # torchinfo keeps every summary (and so the model) in a module-level cache
                torchinfo.torchinfo._cached_forward_pass.pop(model.__class__.__name__, None)
            except AttributeError:  # pragma: no cover - other torchinfo versions
                pass
    finally:
        if home is not None and _model_device(model) != home:
            model.to(home)
        for module, training in modes.items():
            module.training = training

    names = {id(m): n for n, m in model.named_modules()}
    first: dict[str, object] = {}
    calls: dict[str, int] = {}
    leaf_macs: dict[int, int] = {}
    order: list[str] = []
    for info in stats.summary_list:
        name = names.get(id(info.module))
        if name is None or name == "":
            continue
        if name not in first:
            first[name] = info
            calls[name] = 0
            order.append(name)
        if getattr(info, "executed", True):
            calls[name] += 1
        if info.is_leaf_layer:
            leaf_macs[id(info.module)] = leaf_macs.get(id(info.module), 0) + int(info.macs)

    listed = set(order)
    order += [n for n, _ in model.named_modules() if n and n not in listed]

    rows = []
    for name in order:
        module = model.get_submodule(name)
        info = first.get(name)
        total, trainable = _count(list(module.parameters()))
        is_leaf = not any(True for _ in module.children())
        if is_leaf:
            macs = leaf_macs.get(id(module), 0)
        else:
            macs = sum(leaf_macs.get(id(m), 0) for m in module.modules())
        rows.append(
            LayerRow(
                name=name,
                type=type(module).__name__,
                depth=name.count(".") + 1,
                output_shape=_shape(getattr(info, "output_size", None)) if info is not None else None,
                num_params=total,
                trainable_params=trainable,
                trainable=_trainable(total, trainable),
                mult_adds=macs,
                is_leaf=is_leaf,
                calls=calls.get(name, 0),
                input_shape=_shape(getattr(info, "input_size", None)) if info is not None else None,
            )
        )

    total, trainable = _count(list(model.parameters()))
    return ModelSummary(
        rows=tuple(rows),
        model=type(model).__name__,
        input_size=size,
        total_params=total,
        trainable_params=trainable,
        mult_adds=int(stats.total_mult_adds),
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
