"""Everything the CLI shows: the training progress bars and every table it prints (rich).

This lives outside the library on purpose: the trainer only fires events and the commands
return typed results; here they become text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from torch import Tensor

from cnnvis.training.events import Listener, TrainState

if TYPE_CHECKING:
    from cnnvis.commands.evaluate import Evaluation
    from cnnvis.commands.summary import LayerRow, ModelSummary
    from cnnvis.commands.visualize import Result
    from cnnvis.data import DataBundle
    from cnnvis.metrics.faithfulness import FaithfulnessReport

#: how the header line names where ``data.root`` came from
ROOT_SOURCES = {"override": "--set", "environment": "CNNVIS_DATA", "config": "the config", "default": "the default"}


class ProgressListener(Listener):
    """A header, one bar per epoch while it runs, then one line per finished epoch (80 columns).

    The loss shown is the epoch's running mean, read at the first step and then about ten times
    an epoch (at most every ``train.log_every`` steps): each read waits for the device once.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.every = 50
        self.running: Tensor | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.progress.start()
        data, root, epochs = state.data, state.config.data, state.config.train.epochs
        # One fact per line, so that nothing wraps mid-phrase at 80 columns; paths stay whole.
        started = (f"resumed after epoch {state.epoch} of {epochs}" if state.epoch
                   else f"new, {epochs} epoch{'s' if epochs != 1 else ''}")
        lines = [
            f"[bold]run[/]     {escape(str(state.run_dir))} ({started})",
            f"[bold]device[/]  {state.device}",
            f"[bold]data[/]    {data.sizes['train']} train / {data.sizes['val']} val / {data.sizes['test']} test, "
            f"{data.num_classes} classes",
            f"        from {escape(str(data.root or root.root))} (data.root from {ROOT_SOURCES[root.root_source]})",
            f"        {escape(data.pipeline)}",
            *_processes(state),
            *(f"[bold]{label:<7}[/] {escape(line)}" if i == 0 else f"        {escape(line)}"
              for label, texts in state.notes for i, line in enumerate(texts)),
        ]
        for line in lines:
            self.console.print(line, soft_wrap=True, highlight=False)

    def on_epoch_start(self, state: TrainState) -> None:
        label = f"{state.epoch + 1}/{state.config.train.epochs}"
        steps = max(state.steps_per_epoch, 1)
        self.every = max(1, min(state.config.train.log_every, steps // 10))
        self.running = None
        self.task = self.progress.add_task("train", total=state.steps_per_epoch, epoch=label, loss="-")

    def on_step(self, state: TrainState, step_in_epoch: int, loss: Tensor) -> None:
        self.running = loss.detach().float() if self.running is None else self.running + loss.detach().float()
        if step_in_epoch == 0 or (step_in_epoch + 1) % self.every == 0:
            self.progress.update(self.task, advance=1, loss=f"{self.running.item() / (step_in_epoch + 1):.4f}")
        else:
            self.progress.advance(self.task)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self.progress.remove_task(self.task)
        epochs = state.config.train.epochs
        self.console.print(
            f"epoch {state.epoch:>{len(str(epochs))}}/{epochs}  loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.2%}  val {metrics['val_loss']:.4f} {metrics['val_accuracy']:.2%}  "
            f"{metrics['images_per_second']:.0f} img/s  {metrics['seconds']:.1f} s",
            highlight=False,
        )

    def on_train_end(self, state: TrainState, final: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        self.progress.stop()


def _processes(state: TrainState) -> list[str]:
    """The header's line on several training processes: how the global batch is shared out."""
    n = state.world_size
    if n == 1:
        return []
    batch = state.config.data.batch_size
    return [f"[bold]processes[/] {n}, global batch {batch} ({batch // n} per process)"]


class MethodProgress:
    """One bar per visualisation method: its name, how far it is, time spent and left."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(bar_width=24),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> MethodProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()

    def update(self, method: str, fraction: float) -> None:
        if not self.tasks:  # started by the first method, so an error before it prints no empty bar lines
            self.progress.start()
        if method not in self.tasks:
            self.tasks[method] = self.progress.add_task(method, total=1.0)
        self.progress.update(self.tasks[method], completed=fraction)


def summary_table(history: list[dict[str, Any]], final: dict[str, Any]) -> Table:
    # Light borders and unwrapped cells: the eight columns fit an 80-column terminal whole.
    table = Table(title="training summary", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("epoch", "train loss", "train acc", "val loss", "val acc", "peak lr", "img/s", "seconds"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in history:
        table.add_row(
            str(row["epoch"]),
            f"{row['train_loss']:.4f}",
            f"{row['train_accuracy']:.2%}",
            f"{row['val_loss']:.4f}",
            f"{row['val_accuracy']:.2%}",
            f"{row.get('lr_max', row['lr']):.2e}",  # runs before lr_max was recorded: the epoch's first rate
            f"{row['images_per_second']:.0f}",
            f"{row['seconds']:.1f}",
        )
    table.caption = (
        f"test accuracy {final['test_accuracy']:.2%} (split: {final['test_split']}, "
        f"weights: {final['test_checkpoint']}.pt, best val {final['best_val_accuracy']:.2%})"
    )
    return table


def visualize_table(result: Result, title: str) -> Table:
    # light borders: the longest method and file names (integrated-gradients.png) fit 80 columns whole
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for column in ("method", "layer", "file", "shows", "seconds"):
        # a transformer's layer names run long: folded whole rather than cut, as they are copied into --layer
        table.add_column(column, justify="right" if column == "seconds" else "left", no_wrap=column not in ("layer", "file"),
                         overflow="fold" if column in ("layer", "file") else "ellipsis")
    for w in result.written:
        table.add_row(w.method, w.layer or "-", w.path.name, w.detail, f"{w.seconds:.1f}")
    return table


def evaluation_table(ev: Evaluation, where: str) -> Table:
    correct = round(ev.accuracy * ev.count)
    # one phrase per title line: a table narrower than its title would wrap it mid-phrase
    table = Table(title=f"{escape(ev.set_name)}: accuracy {ev.accuracy:.2%} ({correct}/{ev.count}), loss {ev.loss:.4f}\n{where}")
    for column in ("class", "images", "predicted", "precision", "recall", "F1", "accuracy\n(one vs rest)"):
        table.add_column(column, justify="left" if column == "class" else "right")
    number = lambda v: f"{v:.3f}" if v == v else "-"  # noqa: E731 - NaN: undefined (e.g. a class never predicted)
    for c in ev.per_class:
        table.add_row(escape(c.name), str(c.support), str(c.predicted), number(c.precision), number(c.recall),
                      number(c.f1), number(c.accuracy))
    return table


def worst_mistakes_line(ev: Evaluation) -> str:
    shown = ", ".join(f"{escape(w.where)} ({escape(ev.class_names[w.true])} → {escape(ev.predicted_name(w))} {w.probability:.0%})"
                      for w in ev.confidently_wrong[:5])
    return f"{ev.wrong_count} misclassified; most confidently wrong: {shown}"


def faithfulness_table(report: FaithfulnessReport, images: str) -> Table:
    layers = sorted({r.layer for r in report.rows if r.layer})
    # light borders and short two-line headers: ten columns fit 80 terminal columns with every digit shown
    table = Table(title=f"which map can I trust?\n{report.images} {escape(images)}, predicted class, {report.steps} steps"
                        + (f", layer {', '.join(layers)}" if layers else ""),
                  box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    for column in ("#", "method", "del.\nAUC↓", "ins.\nAUC↑", "ROAD\n↑", "max\nsens.↓", "rand.\n|ρ|↓", "SSIM", "sanity",
                   "beats\nrandom"):
        table.add_column(column, justify="left" if column in ("method", "sanity", "beats\nrandom") else "right",
                         no_wrap=True)
    for r in report.rows:
        table.add_row(str(r.rank), r.method, f"{r.deletion_auc:.3f}", f"{r.insertion_auc:.3f}",
                      _maybe(r.road, 3), _maybe(r.sensitivity, 2), f"{r.randomization.spearman:.2f}", f"{r.randomization.ssim:.2f}",
                      "[green]pass[/]" if r.passed else "[red]FAIL[/]", "yes" if r.beats_random else "no")
    table.add_row("", "[dim]random order[/]", f"[dim]{report.random_deletion_auc:.3f}[/]",
                  f"[dim]{report.random_insertion_auc:.3f}[/]", "", "", "", "", "", "")
    table.caption = (f"deletion / insertion AUC: lower / higher is better. rand. |ρ|: mean |Spearman| between the maps of the "
                     f"trained and the fully re-initialised model; above {report.threshold} fails the sanity check. "
                     f"ROAD: (LeRF − MoRF) / 2 of the target probability with imputed pixels, higher is better; max sens.: "
                     f"largest relative change of the map under ±{report.sensitivity_radius:g} input noise, lower is better "
                     f"(both on {report.subset_images} images). Ranked: passing first, then the mean place by "
                     f"insertion − deletion and ROAD.")
    return table


def _maybe(value: float, digits: int) -> str:
    """A score that may not have been measured (NaN): ``–``."""
    return f"{value:.{digits}f}" if value == value else "–"


#: how the layer table gets narrower, one step at a time until it fits the terminal: numbers
#: abbreviated, then whole columns given up, the least needed first (said under the table); at each
#: step the names keep their indentation if it fits, else lose it (their dots still show the depth).
#: Layer names, what --layer needs, are never cut.
LAYER_TABLE_SHRINK = ("short numbers", "type", "trainable", "output", "params", "mult-adds")


def layer_table(result: ModelSummary, title: str, depth: int = 0, width: int | None = None) -> Group:
    """The layer table: every layer ``--layer`` can take, in tree order. A module that never ran (its
    parent only uses its weights) is not listed; one that returns no single tensor shows its output
    type (``(tuple)``), since ``--layer`` cannot take it. At ``width`` columns it shrinks step by step
    (:data:`LAYER_TABLE_SHRINK`) instead of cutting cells. Below it, a line per note (what is
    counted, what was left out)."""
    shown = [r for r in result if r.executed and not (depth and r.depth > depth)]
    # the column says nothing when no parameter is frozen: the caption says so once
    columns = ["layer (--layer)", "type", "output", "params",
               *(["trainable"] if result.frozen_params else []), "mult-adds"]
    steps: list[str] = []
    for step in (None, *LAYER_TABLE_SHRINK):
        if step in columns:
            columns.remove(step)
        elif step not in (None, "short numbers"):
            continue
        if step is not None:
            steps.append(step)
        for indent in (True, False):
            table = _layer_rows(shown, columns, short="short numbers" in steps, indent=indent)
            if width is None or _table_width(table) <= width:
                break
        else:
            continue
        break
    table.title = title
    split = "all trainable" if not result.frozen_params else (
        f"{result.trainable_params:,} trainable, {result.frozen_params:,} frozen")
    table.caption = f"{result.total_params:,} parameters ({split}), {_short(result.mult_adds)} mult-adds per image"
    notes = ["mult-adds count convolutions, matrix products and attention over all tokens (torch's "
             "FlopCounterMode, FLOPs / 2), not norms or activations"]
    dropped = [s for s in steps if s != "short numbers"]
    if dropped:
        notes.append(f"at {width} columns without: {', '.join(dropped)}")
    kinds = sorted({f"({r.output_type})" for r in shown if r.output_shape is None})
    if kinds:
        notes.append(f"{', '.join(kinds)}: no single tensor out, so not usable as --layer (take the block around it)")
    hidden = [r.name for r in result if not r.executed]
    if hidden:
        notes.append(f"not listed: {len(hidden)} module(s) that did not run in this forward pass (an attention's "
                     f"out_proj whose weights its parent uses, an auxiliary head in eval mode, a dropout a fused kernel "
                     f"skips ...), such as {hidden[0]}")
    return Group(table, *(Text(note, style="dim") for note in notes))


def _layer_rows(rows: list[LayerRow], columns: list[str], short: bool, indent: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    for column in columns:
        table.add_column(column, justify="right" if column in ("params", "mult-adds") else "left", no_wrap=True)
    for row in rows:
        shape = "x".join(str(d) for d in row.output_shape[1:]) if row.output_shape else f"({row.output_type})"
        cells = {"layer (--layer)": "  " * (row.depth - 1) * indent + row.name, "type": row.type, "output": shape,
                 "params": _short(row.num_params) if short else f"{row.num_params:,}", "trainable": row.trainable,
                 "mult-adds": _short(row.mult_adds) if row.mult_adds else "-"}
        table.add_row(*(cells[c] for c in columns))
    return table


def split_sizes_table(bundle: DataBundle) -> Table:
    table = Table()
    table.add_column("split")
    table.add_column("images", justify="right")
    for split, count in bundle.sizes.items():
        table.add_row(split, str(count))
    return table


def _table_width(table: Table) -> int:
    """Columns ``table`` takes when nothing is cut."""
    wide = Console(width=10_000)
    return Measurement.get(wide, wide.options, table).maximum


def _short(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
