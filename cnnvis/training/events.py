"""What the trainer tells its listeners: the state it shares, and the events it fires.

Progress bars (``cnnvis.views``) and TensorBoard (``training/tensorboard.py``) are listeners;
anything else that wants to follow a run subclasses :class:`Listener`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnvis.config import Config
from cnnvis.data import DataBundle


@dataclass
class TrainState:
    """What listeners see; the trainer owns it."""

    config: Config
    run_dir: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: DataBundle
    epoch: int = 0  # epochs completed
    global_step: int = 0
    steps_per_epoch: int = 0
    best_val_accuracy: float = -1.0
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    average: nn.Module | None = None  #: the weight average (``train.ema``), when there is one
    lr: float = 0.0  #: the learning rate of the step in progress (of the first parameter group)
    world_size: int = 1  #: training processes; ``config.data.batch_size`` is split over them
    #: ``(logits [N, classes], targets [N])`` on the CPU of the test pass, once it ran: listeners
    #: draw PR curves and the confusion matrix from it instead of predicting the split again
    test_predictions: tuple[Tensor, Tensor] | None = None
    #: ``(label, lines)`` the run's header shows besides run, device and data (the model, the fast path)
    notes: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def evaluated_model(self) -> nn.Module:
        """What is validated, tested, saved and explained: the weight average if any, else the model."""
        return self.average if self.average is not None else self.model


class Listener:
    """Override what you need; every hook is a no-op by default."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_first_batch(self, state: TrainState, images: Tensor, labels: Tensor) -> None:
        """The epoch's first training batch as the model sees it (augmented, normalised, on the device)."""

    def on_step(self, state: TrainState, step_in_epoch: int, loss: Tensor) -> None:
        """``loss`` is a detached device tensor: reading it is a host sync, so do it rarely."""

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, state: TrainState, final: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
