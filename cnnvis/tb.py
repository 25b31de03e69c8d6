"""Everything cnnvis writes to TensorBoard: one listener, one event stream per run directory.

    tensorboard --logdir runs

What a run logs (``step`` is the trainer's global step everywhere; each part has a ``log:`` switch):

    scalars     loss/train loss/val accuracy/train accuracy/val    each epoch (one chart each in
                                                                   Scalars, train vs val on one
                                                                   chart in Custom Scalars)
                loss/train_step                                    every ``train.log_every`` steps
                lr  perf/images_per_second  perf/epoch_seconds    each epoch
                accuracy/test loss/test accuracy/val_best          at the end
                health/nonfinite_weights health/nonfinite_gradients with the histograms
    histograms  weights/<param>  gradients/<param>                 every ``histograms_every`` epochs
    images      inputs/train                                       first batch of epoch 1, augmented
                filters/<first conv>                               each epoch
                misclassified/val                                  each epoch, captioned
                explain/gradcam                                    every ``explain_every`` epochs
                confusion_matrix/test                              at the end
    pr curves   pr_curve/<class>                                   at the end, on the test set
    graph       the model graph                                    once
    hparams     the flattened config and the final metrics; the config as text (``config``)

The trainer never waits for the logger: per-step losses stay on the device and are read once per
epoch, histograms are computed on the device and copied to the host in one transfer, and nothing
here changes the model's train/eval mode, BatchNorm statistics or ``.grad`` fields.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torchvision.utils import make_grid

from cnnvis.config import Config, config_to_dict, flatten
from cnnvis.train import Listener, TrainState, amp_dtype
from cnnvis.vis import render
from cnnvis.vis.errors import UnsupportedModelError
from cnnvis.vis.filters import filters, first_conv

INPUT_IMAGES = 32  # training inputs shown at the start
HISTOGRAM_BINS = 64
PR_THRESHOLDS = 127
MIN_SHOWN_SIDE = 56  # small images (MNIST's 28 px) are enlarged, pixel-exact, to at least this
FILTER_TILE = 24  # side of one first-layer filter tile, pixels
HPARAM_METRICS = ("accuracy/test", "loss/test", "accuracy/val", "loss/val", "accuracy/val_best")
EVENT_FILE_GLOB = "events.out.tfevents.*"


class TensorBoardWarning(UserWarning):
    """A logging extra that failed or found something odd; training goes on."""


class TensorBoardListener(Listener):
    """Writes a run's story into ``run_dir`` (the run directory itself, one writer)."""

    def __init__(self, run_dir: str | Path, config: Config) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.log = config.log
        self.writer: SummaryWriter | None = None
        self._losses: list[Tensor] = []  # detached device tensors, read once per epoch
        self._loss_steps: list[int] = []
        self._explain_batch: tuple[Tensor, Tensor] | None = None
        self._explain_layer: str | None = config.log.explain_layer
        self._frozen_logged = False
        self._failed: set[str] = set()

    # ------------------------------------------------------------------ events

    def on_train_start(self, state: TrainState) -> None:
        resumed = any(self.run_dir.glob(EVENT_FILE_GLOB))
        # A resumed run starts again at its checkpoint: whatever an earlier process logged after
        # that step is replaced by what this one logs (purge_step makes TensorBoard drop it).
        purge_step = (state.global_step + 1 if state.global_step else 0) if resumed else None
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step, flush_secs=30)
        if self.log.explain_every:
            from cnnvis.vis.hooks import default_layer, get_layer

            if self._explain_layer is not None:
                get_layer(state.model, self._explain_layer)  # a wrong name is a config error: fail now
            else:
                self._safely("explain/gradcam", lambda: setattr(self, "_explain_layer", default_layer(state.model)))
        if state.global_step == 0:  # fresh (or restarted before the first epoch ended)
            self._write_layout()
            if self.log.hparams:
                self._safely("hparams", self._write_hparams_start)
            if self.log.graph:
                log_graph(self.writer, state.model, _example_input(state))
        self.writer.flush()

    def on_first_batch(self, state: TrainState, images: Tensor, labels: Tensor) -> None:
        if self.log.images and state.epoch == 0 and self.writer is not None:
            self._safely("inputs/train", self._write_inputs, state, images)

    def on_step(self, state: TrainState, step_in_epoch: int, loss: Tensor) -> None:
        if self.log.step_loss and (step_in_epoch + 1) % state.config.train.log_every == 0:
            self._losses.append(loss)  # no .item(): that would wait for the device every time
            self._loss_steps.append(state.global_step)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        w = self.writer
        if w is None:
            return
        step = state.global_step
        if self._losses:
            values = torch.stack(self._losses).float().cpu().tolist()  # the one host sync for them
            for s, v in zip(self._loss_steps, values):
                w.add_scalar("loss/train_step", v, s)
            self._losses, self._loss_steps = [], []
        for tag, key in (
            ("loss/train", "train_loss"),
            ("loss/val", "val_loss"),
            ("accuracy/train", "train_accuracy"),
            ("accuracy/val", "val_accuracy"),
            ("lr", "lr"),
            ("perf/images_per_second", "images_per_second"),
            ("perf/epoch_seconds", "seconds"),
        ):
            if key in metrics:
                w.add_scalar(tag, float(metrics[key]), step)
        if self.log.histograms_every and state.epoch % self.log.histograms_every == 0:
            self._safely("histograms", self._write_histograms, state)
        if self.log.filters:
            self._safely("filters", self._write_filters, state)
        if self.log.misclassified:
            self._safely("misclassified/val", self._write_misclassified, state)
        if self.log.explain_every and state.epoch % self.log.explain_every == 0:
            self._safely("explain/gradcam", self._write_gradcam, state)
        w.flush()

    def on_train_end(self, state: TrainState, final: dict[str, Any]) -> None:
        w = self.writer
        if w is None:
            return
        step = int(final.get("step", state.global_step))
        for tag, key in (("accuracy/test", "test_accuracy"), ("loss/test", "test_loss"), ("accuracy/val_best", "best_val_accuracy")):
            value = final.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                w.add_scalar(tag, float(value), step)
        if self.log.confusion_matrix or self.log.pr_curves:
            self._safely("test predictions", self._write_test_curves, state, step)
        if self.log.hparams:
            self._safely("hparams", self._write_hparams_end)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # after close a SummaryWriter would quietly open a new file: drop it
            self.writer = None

    # ------------------------------------------------------------------ parts

    def _safely(self, part: str, fn: Callable[..., None], *args: Any) -> None:
        """Run one logging extra; if it fails, say so once and stop doing it (training goes on)."""
        if part in self._failed:
            return
        try:
            fn(*args)
        except Exception as exc:  # a picture is never worth a crashed training run
            self._failed.add(part)
            warnings.warn(f"TensorBoard: {part} not logged ({_one_line(exc)}); skipped for the rest of this run",
                          TensorBoardWarning, stacklevel=2)

    def _write_layout(self) -> None:
        """Custom Scalars: train and validation curves on one chart (no extra runs needed)."""
        self.writer.add_custom_scalars({
            "train vs val": {
                "loss": ["Multiline", [r"^loss/(train|val)$"]],
                "accuracy": ["Multiline", [r"^accuracy/(train|val)$"]],
            }
        })

    def _write_hparams_start(self) -> None:
        hparams = {k: _hparam_value(v) for k, v in flatten(self.config).items() if not k.startswith("log.")}
        experiment, session_start, _ = hparams_summaries(hparams, {tag: 0.0 for tag in HPARAM_METRICS})
        # Into this run's own event file (SummaryWriter.add_hparams would make a timestamped sub-run).
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        text = yaml.safe_dump(config_to_dict(self.config), sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "```", 0)

    def _write_hparams_end(self) -> None:
        _, _, session_end = hparams_summaries({}, {})
        self.writer.file_writer.add_summary(session_end)

    def _write_inputs(self, state: TrainState, images: Tensor) -> None:
        shown = render.denormalize(images[:INPUT_IMAGES].detach().float().cpu(), state.data.mean, state.data.std)
        grid = make_grid(_enlarge(shown), nrow=8, padding=2, pad_value=1.0)
        self.writer.add_image("inputs/train", grid, state.global_step, dataformats="CHW")

    def _write_histograms(self, state: TrainState) -> None:
        named = list(state.model.named_parameters())
        weights = [(n, p) for n, p in named if p.requires_grad or not self._frozen_logged]
        self._frozen_logged = True  # frozen weights never change: once per process is enough
        grads = [(n, p.grad) for n, p in named if p.requires_grad and p.grad is not None]  # None: frozen or unused
        step = state.global_step
        for kind, pairs in (("weights", weights), ("gradients", grads)):
            if not pairs:
                continue
            rows = _histogram_rows([t for _, t in pairs], HISTOGRAM_BINS)
            bad = []
            for (name, _), row in zip(pairs, rows):
                lo, hi, count, total, squares, nonfinite = row[:6].tolist()
                if nonfinite:
                    bad.append(f"{name} ({int(nonfinite)})")
                if count == 0:
                    continue
                counts = row[6:]
                if hi > lo:
                    limits = (lo + (hi - lo) * np.arange(1, HISTOGRAM_BINS + 1) / HISTOGRAM_BINS).tolist()
                    limits[-1] = hi
                    counts_list = counts.tolist()
                else:  # a constant tensor: one bucket
                    limits, counts_list = [hi], [count]
                self.writer.add_histogram_raw(f"{kind}/{name}", lo, hi, count, total, squares, limits, counts_list, step)
            self.writer.add_scalar(f"health/nonfinite_{kind}", float(rows[:, 5].sum()), step)
            if bad:
                warnings.warn(
                    f"TensorBoard: non-finite {kind} after epoch {state.epoch} in {', '.join(bad[:5])}"
                    f"{' ...' if len(bad) > 5 else ''}; left out of the histograms",
                    TensorBoardWarning, stacklevel=3,
                )

    def _write_filters(self, state: TrainState) -> None:
        try:
            name = first_conv(state.model)
        except UnsupportedModelError:
            self._failed.add("filters")  # nothing to show for this model, and nothing wrong either
            return
        grid = filter_grid(filters(state.model, name))
        self.writer.add_image(f"filters/{name}", grid, state.global_step, dataformats="CHW")

    def _write_misclassified(self, state: TrainState) -> None:
        images, true, pred, prob = find_misclassified(state.model, state.data.val, state.device, self.log.misclassified,
                                                      amp_dtype(state.config, state.device))
        if images.shape[0] == 0:
            return
        names = state.data.class_names
        captions = [render.format_caption(names[t], names[p], c) for t, p, c in zip(true.tolist(), pred.tolist(), prob.tolist())]
        png = render.image_grid_figure(
            images, captions, f"misclassified validation images after epoch {state.epoch}",
            mean=state.data.mean, std=state.data.std, columns=8, panel_size=1.2 if images.shape[-1] <= 64 else 1.6,
        )
        self.writer.add_image("misclassified/val", render.figure_to_tensor(png), state.global_step, dataformats="CHW")

    def _write_gradcam(self, state: TrainState) -> None:
        from cnnvis.vis.gradcam import gradcam

        if self._explain_batch is None:
            images, labels = state.data.fixed_batch("val", self.log.explain_images)
            self._explain_batch = (images.to(state.device), labels)
        images, _ = self._explain_batch
        maps = gradcam(state.model, images, "pred", self._explain_layer).detach().float().cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained net's all-zero maps are expected, not news
            maps01 = render.normalize_maps(maps)
        shown = render.denormalize(images.float().cpu(), state.data.mean, state.data.std)
        over = render.overlay(shown, maps01)
        rows = torch.cat([render.to_rgb(shown), over])  # inputs above, where the network looks below
        grid = make_grid(_enlarge(rows), nrow=images.shape[0], padding=2, pad_value=1.0)
        self.writer.add_image("explain/gradcam", grid, state.global_step, dataformats="CHW")

    def _write_test_curves(self, state: TrainState, step: int) -> None:
        model = _best_model(state)
        logits, targets = predict_split(model, state.data.test, state.device, amp_dtype(state.config, state.device))
        if targets.numel() == 0:
            return
        names = state.data.class_names
        k = len(names)
        if self.log.confusion_matrix:
            pred = logits.argmax(1)
            matrix = torch.bincount(targets * k + pred, minlength=k * k).reshape(k, k)
            image = confusion_matrix_image(matrix, names, f"test set confusion matrix ({int(targets.numel())} images)")
            self.writer.add_image("confusion_matrix/test", image, step, dataformats="CHW")
        if self.log.pr_curves:
            probs = logits.softmax(1).numpy()
            truth = targets.numpy()
            for c, tag in enumerate(_class_tags(names)):
                self.writer.add_pr_curve(f"pr_curve/{tag}", truth == c, probs[:, c], step, num_thresholds=PR_THRESHOLDS)


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
        with _eval_mode(model), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
            out = model(example)
            traced = model if isinstance(out, Tensor) else _TensorOutputs(model)
            if not _tensors(out):
                raise TypeError(f"the model returned a {type(out).__name__}, not tensors")
            writer.add_graph(traced, example, use_strict_trace=False)
        return True
    except Exception as exc:
        warnings.warn(f"TensorBoard: model graph not logged ({_one_line(exc)})", TensorBoardWarning, stacklevel=2)
        return False


def _example_input(state: TrainState) -> Tensor:
    """One all-zero image of the right shape on the model's device (the graph does not depend on values)."""
    data = state.data
    return torch.zeros(1, data.in_channels, data.image_size, data.image_size, device=state.device)


# ---------------------------------------------------------------------- computing


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the body, every submodule's own flag restored after (BatchNorm statistics untouched)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _histogram_rows(tensors: Sequence[Tensor], bins: int) -> Tensor:
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


def filter_grid(weight: Tensor, max_filters: int = 64) -> Tensor:
    """First-layer kernels ``[out, in, kh, kw]`` as one RGB ``[3, H, W]`` grid in ``[0, 1]``.

    Each filter is scaled by its largest magnitude: mid-grey is 0. Three input channels are shown
    in colour; one as grey; any other count as the mean over the inputs. Separators are blue-grey,
    not white or black, which would read as weights.
    """
    w = weight.detach()[:max_filters].float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)
    absmax = w.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    tiles = (w / (2 * absmax) + 0.5).clamp(0, 1).expand(-1, 3, -1, -1)
    factor = max(1, FILTER_TILE // max(tiles.shape[-2:]))
    tiles = tiles.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    grid = make_grid(tiles, nrow=min(8, max(1, math.ceil(math.sqrt(tiles.shape[0])))), padding=2, pad_value=-1.0)
    separator = torch.tensor([0.62, 0.72, 0.86]).view(3, 1, 1).expand_as(grid)
    return torch.where(grid < 0, separator, grid)


def find_misclassified(
    model: nn.Module, batches, device: torch.device, limit: int, amp: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Up to ``limit`` misclassified images of a split, in split order: ``(images [n,C,H,W] on the
    CPU, true [n], predicted [n], predicted probability [n])``. Stops reading once it has enough."""
    found: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    count = 0
    with _eval_mode(model), torch.inference_mode(), _autocast(device, amp):
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            prob, pred = model(images).float().softmax(1).max(1)
            wrong = (pred != labels).nonzero().flatten()[: limit - count]  # one sync per batch
            if wrong.numel():
                found.append((images[wrong], labels[wrong], pred[wrong], prob[wrong]))
                count += wrong.numel()
            if count >= limit:
                break
    if not found:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    images, true, pred, prob = (torch.cat(parts).cpu() for parts in zip(*found))
    return images.float(), true, pred, prob


def predict_split(model: nn.Module, batches, device: torch.device, amp: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(logits [N, classes], targets [N])`` of a whole split: one pass, gathered on the device,
    moved to the CPU once."""
    logits, targets = [], []
    with _eval_mode(model), torch.inference_mode(), _autocast(device, amp):
        for images, labels in batches:
            logits.append(model(images.to(device, non_blocking=True)).float())
            targets.append(labels.to(device, non_blocking=True))
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits).cpu(), torch.cat(targets).long().cpu()


def _best_model(state: TrainState) -> nn.Module:
    """The weights the test accuracy was measured with (``best.pt``), else the current model."""
    if not (state.run_dir / "checkpoints" / "best.pt").is_file():
        return state.model
    from cnnvis.run import load_run

    return load_run(state.run_dir, state.device, prefer="best").model


# ---------------------------------------------------------------------- pictures


def _enlarge(images: Tensor) -> Tensor:
    """Pixel-exact (nearest) enlargement of small images so a digit is visible in the dashboard."""
    side = max(images.shape[-2:])
    factor = math.ceil(MIN_SHOWN_SIDE / side) if side < MIN_SHOWN_SIDE else 1
    return images.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else images


def confusion_matrix_image(matrix: Tensor, class_names: Sequence[str], title: str) -> Tensor:
    """Rows: true class, columns: predicted; colour = share of the row (recall), counts written in
    when there are few classes. Returns ``uint8 [3, H, W]``."""
    k = len(class_names)
    m = matrix.double()
    shares = (m / m.sum(1, keepdim=True).clamp_min(1)).numpy()
    side = min(16.0, max(4.0, 0.45 * k + 2.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    font = max(5.0, min(9.0, 140.0 / max(k, 1)))
    if k <= 40:
        ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=font)
        ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=font)
    if k <= 20:
        counts = matrix.long().numpy()
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if shares[i, j] > 0.5 else "black")
    accuracy = float(m.diagonal().sum() / m.sum().clamp_min(1))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}, accuracy {accuracy:.2%}", fontsize=10)
    fig.tight_layout()
    return render.figure_to_tensor(fig)


# ---------------------------------------------------------------------- small helpers


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


def _class_tags(names: Sequence[str]) -> list[str]:
    """Tag-safe class names, unique (a clash gets its class index appended)."""
    tags = [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(n)).strip("_") or f"class_{i}" for i, n in enumerate(names)]
    seen: dict[str, int] = {}
    for t in tags:
        seen[t] = seen.get(t, 0) + 1
    return [t if seen[t] == 1 else f"{t}_{i}" for i, t in enumerate(tags)]


def _one_line(exc: BaseException) -> str:
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
