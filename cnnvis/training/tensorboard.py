"""Everything cnnvis writes to TensorBoard: one listener, one event stream per run directory.

    tensorboard --logdir runs

What a run logs (``step`` is the trainer's global step everywhere; each part has a ``log:`` switch):

    scalars     loss/train loss/val accuracy/train accuracy/val    each epoch (one chart each in
                                                                   Scalars, train vs val on one
                                                                   chart in Custom Scalars)
                loss/train_step                                    every ``train.log_every`` steps
                lr                                                 every step (written each epoch)
                perf/images_per_second  perf/epoch_seconds        each epoch
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

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torchvision.utils import make_grid

from cnnvis import plots
from cnnvis.config import Config, config_to_dict, flatten
from cnnvis.device import amp_dtype
from cnnvis.errors import UnsupportedModelError
from cnnvis.metrics.classification import confusion_matrix
from cnnvis.run import EVENT_FILE_GLOB, checkpoint_path, load_run
from cnnvis.training.events import Listener, TrainState
from cnnvis.training.loop import find_misclassified, predict_split
from cnnvis.training.summaries import (
    TensorBoardWarning,
    class_tags,
    enlarge,
    histogram_rows,
    hparam_value,
    log_graph,
    one_line,
)
from cnnvis.vis.filters import first_conv
from cnnvis.vis.maps import normalize_maps
from cnnvis.vis.registry import METHODS, run_method

INPUT_IMAGES = 32  # training inputs shown at the start
HISTOGRAM_BINS = 64
PR_THRESHOLDS = 127
HPARAM_METRICS = ("accuracy/test", "loss/test", "accuracy/val", "loss/val", "accuracy/val_best")


class TensorBoardListener(Listener):
    """Writes a run's story into ``run_dir`` (the run directory itself, one writer)."""

    def __init__(self, run_dir: str | Path, config: Config) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.log = config.log
        self.writer: SummaryWriter | None = None
        self._losses: list[Tensor] = []  # detached device tensors, read once per epoch
        self._loss_steps: list[int] = []
        self._lrs: list[tuple[int, float]] = []  # (global step, rate)
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
                self._safely("explain/gradcam", lambda: setattr(
                    self, "_explain_layer", default_layer(state.model, _example_input(state))))
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
        self._lrs.append((state.global_step, state.lr))  # every step: a one-cycle rate changes every step
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
        for s, lr in self._lrs:
            w.add_scalar("lr", lr, s)
        self._lrs = []
        for tag, key in (
            ("loss/train", "train_loss"),
            ("loss/val", "val_loss"),
            ("accuracy/train", "train_accuracy"),
            ("accuracy/val", "val_accuracy"),
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
        if self.log.embeddings:
            self._safely("projector", self._write_embedding, state, step)
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
            warnings.warn(f"TensorBoard: {part} not logged ({one_line(exc)}); skipped for the rest of this run",
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
        hparams = {k: hparam_value(v) for k, v in flatten(self.config).items() if not k.startswith("log.")}
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
        spec = state.data.spec
        shown = plots.denormalize(images[:INPUT_IMAGES].detach().float().cpu(), spec.mean, spec.std)
        grid = make_grid(enlarge(shown), nrow=8, padding=2, pad_value=1.0)
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
            rows = histogram_rows([t for _, t in pairs], HISTOGRAM_BINS)
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
        grid = plots.filter_tiles(run_method("filters", state.model, torch.zeros(0), "pred", name))
        self.writer.add_image(f"filters/{name}", grid, state.global_step, dataformats="CHW")

    def _write_misclassified(self, state: TrainState) -> None:
        train = state.config.train
        images, true, pred, prob = find_misclassified(state.evaluated_model, state.data.val, state.device,
                                                      self.log.misclassified, amp_dtype(train.amp, state.device), train.tta_flip)
        if images.shape[0] == 0:
            return
        spec = state.data.spec
        names = spec.class_names
        captions = [plots.format_caption(names[t], names[p], c) for t, p, c in zip(true.tolist(), pred.tolist(), prob.tolist())]
        png = plots.image_grid_figure(
            images, captions, f"misclassified validation images after epoch {state.epoch}",
            mean=spec.mean, std=spec.std, columns=8, panel_size=1.2 if images.shape[-1] <= 64 else 1.6,
        )
        self.writer.add_image("misclassified/val", plots.figure_to_tensor(png), state.global_step, dataformats="CHW")

    def _write_gradcam(self, state: TrainState) -> None:
        if self._explain_batch is None:
            fixed = state.data.fixed_batch("val", self.log.explain_images)
            self._explain_batch = (fixed.images.to(state.device), fixed.labels)
        images, _ = self._explain_batch
        maps = run_method("gradcam", state.evaluated_model, images, "pred", self._explain_layer).detach().float().cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained net's all-zero maps are expected, not news
            maps01 = normalize_maps(maps, METHODS["gradcam"].normalize)
        shown = plots.denormalize(images.float().cpu(), state.data.spec.mean, state.data.spec.std)
        over = plots.overlay(shown, maps01)
        rows = torch.cat([plots.to_rgb(shown), over])  # inputs above, where the network looks below
        grid = make_grid(enlarge(rows), nrow=images.shape[0], padding=2, pad_value=1.0)
        self.writer.add_image("explain/gradcam", grid, state.global_step, dataformats="CHW")

    def _write_embedding(self, state: TrainState, step: int) -> None:
        from cnnvis.projector import log_embedding

        spec = state.data.spec
        log_embedding(self.writer, _best_model(state), state.data.eval_sets["test"], spec.class_names,
                      limit=self.log.embeddings, device=state.device, mean=spec.mean, std=spec.std, step=step)

    def _write_test_curves(self, state: TrainState, step: int) -> None:
        if state.test_predictions is not None:  # the trainer's test pass, with the same best.pt weights
            logits, targets = state.test_predictions
        else:
            train = state.config.train
            logits, targets = predict_split(_best_model(state), state.data.test, state.device,
                                            amp_dtype(train.amp, state.device), train.tta_flip)
        if targets.numel() == 0:
            return
        names = state.data.spec.class_names
        k = len(names)
        if self.log.confusion_matrix:
            matrix = confusion_matrix(targets, logits.argmax(1), k)
            image = plots.confusion_matrix_image(matrix, names, f"test set confusion matrix ({int(targets.numel())} images)")
            self.writer.add_image("confusion_matrix/test", image, step, dataformats="CHW")
        if self.log.pr_curves:
            probs = logits.softmax(1).numpy()
            truth = targets.numpy()
            for c, tag in enumerate(class_tags(names)):
                self.writer.add_pr_curve(f"pr_curve/{tag}", truth == c, probs[:, c], step, num_thresholds=PR_THRESHOLDS)


def _example_input(state: TrainState) -> Tensor:
    """One all-zero image of the right shape on the model's device (the graph does not depend on values)."""
    spec = state.data.spec
    return torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size, device=state.device)


def _best_model(state: TrainState) -> nn.Module:
    """The weights the test accuracy was measured with (``best.pt``), else the current model."""
    if not checkpoint_path(state.run_dir, "best").is_file():
        return state.evaluated_model
    return load_run(state.run_dir, state.device, prefer="best").model
