"""Optimizers and learning-rate schedules, built from the ``optimizer`` and ``scheduler`` config sections."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from cnnvis.config import Config
from cnnvis.errors import ConfigError


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """The trainable parameters, as one group or as two: weights of convolutions and linear layers
    with ``weight_decay``, and normalisation weights and all biases (1-D tensors) without it."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if decay_norm_and_bias or weight_decay == 0:
        return [{"params": [p for _, p in trainable]}]
    decayed = [p for _, p in trainable if p.ndim > 1]
    kept = [p for _, p in trainable if p.ndim <= 1]
    return [{"params": decayed}, {"params": kept, "weight_decay": 0.0}]


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``config.optimizer`` over ``model``'s trainable parameters."""
    o = config.optimizer
    params = parameter_groups(model, o.weight_decay, o.decay_norm_and_bias)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.Adadelta(params, lr=o.lr, weight_decay=o.weight_decay)


class OneCycles(torch.optim.lr_scheduler.LRScheduler):
    """``OneCycleLR``'s shape, momentum cycling included, over consecutive cycles of given lengths.

    Each cycle warms up from ``max_lr / 25`` to ``max_lr`` over ``pct_start`` of its steps, then
    anneals to ``max_lr / 25e4`` (cosine both ways, as ``OneCycleLR``); the next one warms up
    again. A short first cycle leaves the weights fully annealed, hence accurate, early in a run.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, cycle_steps: Sequence[int], pct_start: float,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, base_momentum: float = 0.85,
                 max_momentum: float = 0.95, last_epoch: int = -1) -> None:
        if any(n < 4 for n in cycle_steps):
            raise ValueError(f"every cycle needs at least 4 steps, got {list(cycle_steps)}")
        self.cycle_steps = [int(n) for n in cycle_steps]
        self.total_steps = sum(self.cycle_steps)  # what the resume check reads, as for OneCycleLR
        self.pct_start = pct_start
        self.max_lr = max_lr
        self.initial_lr = max_lr / div_factor
        self.min_lr = self.initial_lr / final_div_factor
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        defaults = optimizer.defaults
        self.momentum_key = "betas" if "betas" in defaults else "momentum" if "momentum" in defaults else None
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        for length in self.cycle_steps:
            if step < length:
                break
            step -= length
        else:  # past the planned end: stay at the last value
            step = length - 1
        # Both phases need at least two steps (the same clamp as for OneCycleLR).
        warm_end = float(min(max(self.pct_start, 2 / length), (length - 2) / length) * length) - 1
        if step <= warm_end:
            pct = step / warm_end
            lr = self._anneal(self.initial_lr, self.max_lr, pct)
            momentum = self._anneal(self.max_momentum, self.base_momentum, pct)
        else:
            pct = (step - warm_end) / (length - 1 - warm_end)
            lr = self._anneal(self.max_lr, self.min_lr, pct)
            momentum = self._anneal(self.base_momentum, self.max_momentum, pct)
        for group in self.optimizer.param_groups:
            if self.momentum_key == "betas":
                group["betas"] = (momentum, *group["betas"][1:])
            elif self.momentum_key == "momentum":
                group["momentum"] = momentum
        return [lr for _ in self.optimizer.param_groups]


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Returns (scheduler, steps_per_call): schedulers stepped per batch or per epoch."""
    s, epochs = config.scheduler, config.train.epochs
    total = max(1, steps_per_epoch * epochs)
    first = s.first_cycle * steps_per_epoch
    if s.name == "onecycle" and 0 < s.first_cycle < epochs and first >= 4 and total - first >= 4:
        return OneCycles(optimizer, config.optimizer.lr, [first, total - first], s.pct_start), "step"
    if s.name == "onecycle" and total >= 4:
        # OneCycleLR divides by the length of each phase: both need at least two steps.
        pct_start = min(max(s.pct_start, 2 / total), (total - 2) / total)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.optimizer.lr, total_steps=total, pct_start=pct_start), "step"
    if s.name == "onecycle":  # too few steps for a cycle: keep the learning rate constant
        return None, "none"
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), "step"
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma), "epoch"
    return None, "none"


def check_schedule_fits(config: Config, payload: dict, steps_per_epoch: int, unit: str | None) -> None:
    """Raise unless a resumed run's schedule (``config``) can continue the one the checkpoint
    ``payload`` was planned with: loading the old plan into a longer run would make OneCycleLR raise
    past its end and cosine turn back up."""
    saved = payload.get("scheduler") or {}
    planned = saved.get("total_steps", saved.get("T_max")) if unit == "step" else None
    wanted = steps_per_epoch * config.train.epochs
    stored = payload["config"]["train"]["epochs"]
    planned_by_epochs = config.scheduler.name in ("onecycle", "cosine")
    if planned_by_epochs and (stored != config.train.epochs or planned not in (None, wanted)):
        planned = planned or steps_per_epoch * stored
        raise ConfigError(
            f"this run's {config.scheduler.name} schedule was planned for {planned} steps "
            f"({stored} epochs) but the resumed run needs {wanted} (train.epochs = {config.train.epochs}).",
            "Resume with the run's own train.epochs and batch size, or start a new run; "
            "scheduler.name step or none can be extended.",
        )
