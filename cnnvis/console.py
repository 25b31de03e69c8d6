"""What the CLI shows while training: a rich progress bar listener and the summary table.

This lives outside the library layer on purpose: the trainer only fires events.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from cnnvis.train import Listener, TrainState


class ProgressListener(Listener):
    """One bar per epoch; the loss shown is read every ``train.log_every`` steps, not every step."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.every = 50

    def on_train_start(self, state: TrainState) -> None:
        self.every = state.config.train.log_every
        self.progress.start()
        self.console.print(
            f"[bold]run[/] {escape(str(state.run_dir))}  [bold]device[/] {state.device}  "
            f"[bold]data[/] {state.data.sizes['train']} train / {state.data.sizes['val']} val / "
            f"{state.data.sizes['test']} test, {state.data.num_classes} classes"
        )

    def on_epoch_start(self, state: TrainState) -> None:
        label = f"{state.epoch + 1}/{state.config.train.epochs}"
        self.task = self.progress.add_task("train", total=state.steps_per_epoch, epoch=label, loss="-")

    def on_step(self, state: TrainState, step_in_epoch: int, loss: Tensor) -> None:
        if (step_in_epoch + 1) % self.every == 0:
            self.progress.update(self.task, advance=1, loss=f"{loss.item():.4f}")
        else:
            self.progress.advance(self.task)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self.progress.update(
            self.task,
            completed=state.steps_per_epoch,
            loss=(
                f"{metrics['train_loss']:.4f}  acc {metrics['train_accuracy']:.2%}  "
                f"val {metrics['val_loss']:.4f} / {metrics['val_accuracy']:.2%}  "
                f"{metrics['images_per_second']:.0f} img/s"
            ),
        )

    def on_train_end(self, state: TrainState, final: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        self.progress.stop()


def summary_table(history: list[dict[str, Any]], final: dict[str, Any]) -> Table:
    # Light borders and unwrapped cells: the eight columns fit an 80-column terminal whole.
    table = Table(title="training summary", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "img/s", "seconds"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in history:
        table.add_row(
            str(row["epoch"]),
            f"{row['train_loss']:.4f}",
            f"{row['train_accuracy']:.2%}",
            f"{row['val_loss']:.4f}",
            f"{row['val_accuracy']:.2%}",
            f"{row['lr']:.2e}",
            f"{row['images_per_second']:.0f}",
            f"{row['seconds']:.1f}",
        )
    table.caption = (
        f"test accuracy {final['test_accuracy']:.2%} (split: {final['test_split']}, "
        f"weights: {final['test_checkpoint']}.pt, best val {final['best_val_accuracy']:.2%})"
    )
    return table
