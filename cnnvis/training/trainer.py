"""The trainer: the epoch loop, checkpoints, resume, early stopping and the test pass. It fires
events (``events.py``) that the progress bars and TensorBoard listen to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnvis.checkpoint import (
    interrupts_deferred,
    load_checkpoint,
    load_model_state,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from cnnvis.config import Config, config_to_dict, save_config
from cnnvis.data import DataBundle, build_data
from cnnvis.device import (
    amp_dtype,
    autocast,
    memory_format,
    resolve_device,
    seed_everything,
)
from cnnvis.errors import ConfigError, TrainingError
from cnnvis.io import append_jsonl, read_jsonl, write_jsonl
from cnnvis.models import build_model, describe_model, set_train_mode
from cnnvis.run import (
    CONFIG_FILE,
    METRICS_FILE,
    checkpoint_path,
    create_run_dir,
    model_from_checkpoint,
    resume_point,
)
from cnnvis.training import distributed
from cnnvis.training.events import Listener, TrainState
from cnnvis.training.features import plan_fast_path
from cnnvis.training.loop import evaluate, predict_split, split_scores
from cnnvis.training.optim import check_schedule_fits, make_optimizer, make_scheduler
from cnnvis.training.regularize import (
    averaged_state,
    batch_mixer,
    hard_labels,
    restore_average,
    weight_average,
)


class Trainer:
    """Builds data, model and optimizer from a config and trains into a run directory."""

    def __init__(
        self,
        config: Config | None,
        runs_dir: str | Path = "runs",
        name: str | None = None,
        device: str = "auto",
        resume: str | Path | None = None,
        listeners: Sequence[Listener] = (),
        data: DataBundle | None = None,
        overrides: Sequence[str] = (),
    ) -> None:
        """With ``resume``, the run's stored config is used (``overrides`` still apply, e.g. more epochs).

        Under torchrun each process builds its own trainer: it joins the process group, trains its
        share of each batch, and only rank 0 writes files or tells ``listeners`` anything."""
        self.world = distributed.detect_world()
        self.listeners = list(listeners) if self.world.is_main else []
        payload = None
        if resume is None and self.world.distributed:
            resume = distributed.restarted_run(runs_dir)  # torchrun --max-restarts: continue, not start over
        if resume is not None:
            self.run_dir, checkpoint, payload, config = resume_point(resume, overrides)
        elif config is None:
            raise ConfigError("a config is needed unless resuming a run")
        self.config = config
        seed_everything(config.seed, config.deterministic)
        self.device = (distributed.start(self.world, device, config.train.collective_timeout_s) if self.world.distributed
                       else resolve_device(device))
        distributed.check_batch_split(config.data.batch_size, self.world)
        self.data = data or build_data(config, self.device, self.world.rank, self.world.size)
        spec = self.data.spec
        if payload is not None:
            self.data.check_fits(payload["meta"]["class_names"], checkpoint, "Resume needs the same classes: "
                                 "restore the class folders as they were, or start a new run.")
        model = self._placed(build_model(
            config.model.arch, spec.num_classes, spec.in_channels, spec.image_size,
            pretrained=config.model.pretrained if payload is None else None,
            freeze=config.model.freeze, dropout=config.model.dropout,
        ))
        self.train_model = distributed.wrap(model, self.world, self.device, config.train.sync_batchnorm)  # the steps call this
        distributed.seed_rank(config.seed, self.world)  # the same initial weights (DDP copied rank 0's), then its own dropout
        self.amp = amp_dtype(config.train.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        optimizer = make_optimizer(config, model)
        self.mixer = batch_mixer(config.train, spec.num_classes)
        self.average = weight_average(model, config.train.ema)
        steps_per_epoch = len(self.data.train)
        self.scheduler, self.scheduler_unit = make_scheduler(config, optimizer, steps_per_epoch)
        if payload is None:  # named and made once, by rank 0
            self.run_dir = distributed.decide_on_main(self.world, lambda: self._new_run(runs_dir, name or config.name))
        self.state = TrainState(config, self.run_dir, self.device, model, optimizer, self.data, steps_per_epoch=steps_per_epoch,
                                average=self.average.module if self.average is not None else None,
                                world_size=self.world.size)
        # frozen backbone, nothing random: the head trains on features computed once (training/features.py)
        self.fast, fast_lines = plan_fast_path(config, model, self.data, self.device, self.amp, self.run_dir, self.world.size)
        self.train_model = self.fast.head if self.fast is not None else self.train_model
        self.state.notes = [("model", describe_model(config, model)), *([("fast", fast_lines)] if fast_lines else [])]
        self.saved_epoch: int | None = None  # the epoch checkpoints/last.pt holds, once written
        #: the stored test metrics when ``resume`` names a run that already finished (nothing to train)
        self.finished: dict[str, Any] | None = None
        if payload is not None:
            self._restore(payload)
            self.saved_epoch = self.state.epoch
            if self.world.is_main:
                save_config(config, self.run_dir / CONFIG_FILE)  # overrides (e.g. more epochs) are part of the run now

    def _new_run(self, runs_dir: str | Path, name: str) -> Path:
        run_dir = create_run_dir(runs_dir, name)
        save_config(self.config, run_dir / CONFIG_FILE)
        distributed.remember_run(runs_dir, run_dir)
        return run_dir

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, rng: list[dict[str, Tensor]]) -> dict[str, Any]:
        """What a checkpoint holds; ``rng`` is every rank's random state, rank 0's first."""
        s = self.state
        cpu = lambda module: {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}  # noqa: E731
        averaged = {}
        if self.average is not None:  # "model" holds the weights that are evaluated; the raw ones resume training
            averaged = {"trained_model": cpu(s.model), "average": averaged_state(self.average)}
        return {
            "model": cpu(self.evaluated_model),
            **averaged,
            "optimizer": s.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(),
            "epoch": s.epoch,
            "global_step": s.global_step,
            "best_val_accuracy": s.best_val_accuracy,
            "epochs_without_improvement": s.epochs_without_improvement,
            "rng": rng[0],
            **({"rng_per_rank": rng} if len(rng) > 1 else {}),
            "config": config_to_dict(self.config),
            # arch names the source (torchvision:NAME ...): later commands build it with random weights and load "model"
            "meta": {"arch": self.config.model.arch, "weights": self.config.model.pretrained, **self.data.spec.to_dict()},
        }

    def _restore(self, payload: dict[str, Any]) -> None:
        s = self.state
        check_schedule_fits(self.config, payload, s.steps_per_epoch, self.scheduler_unit)
        load_model_state(s.model, payload.get("trained_model", payload["model"]), "the checkpoint")
        if self.average is not None:
            if "average" in payload:
                restore_average(self.average, payload["model"], payload["average"])
            else:  # averaging switched on for a run that did not average: start it from these weights
                self.average.update_parameters(s.model)
        try:
            s.optimizer.load_state_dict(payload["optimizer"])
        except ValueError:  # another number of parameter groups, or of parameters in them
            raise ConfigError(
                "the checkpoint's optimizer state does not fit this run's parameter groups "
                "(was optimizer.decay_norm_and_bias or model.freeze changed?)",
                "Resume with the run's own optimizer settings, or start a new run.",
            ) from None
        if self.scheduler is not None and payload.get("scheduler"):
            self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        s.epoch = int(payload["epoch"])
        s.global_step = int(payload["global_step"])
        s.best_val_accuracy = float(payload["best_val_accuracy"])
        s.epochs_without_improvement = int(payload.get("epochs_without_improvement", 0))
        restore_rng(distributed.own_rng(payload, self.world), self.device, self.train_source)
        if len(payload.get("rng_per_rank") or [0]) != self.world.size:  # resumed by another number of processes
            distributed.seed_rank(self.config.seed, self.world, s.epoch)
        rows = read_jsonl(self.run_dir / METRICS_FILE).rows
        # Lines after the checkpoint's epoch belong to work that is about to be redone.
        history = [m for m in rows if m.get("epoch", 0) <= s.epoch and "test_accuracy" not in m]
        s.history = history
        tested = [m for m in rows if "test_accuracy" in m and m.get("epoch") == s.epoch]
        if tested and s.epoch >= self.config.train.epochs:
            self.finished = tested[-1]
        else:
            self._write_metrics(write_jsonl, history)

    @property
    def evaluated_model(self) -> nn.Module:
        return self.state.evaluated_model

    @property
    def train_source(self) -> Any:
        """The training batches: images, or on the fast path the backbone's features."""
        return self.fast.train if self.fast is not None else self.data.train

    def _placed(self, model: nn.Module) -> nn.Module:
        """``model`` on the run's device, in channels_last when ``train.channels_last`` (faster
        convolutions on CUDA and on CPUs through oneDNN alike), with that choice noted on it."""
        model = model.to(self.device)
        if self.config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
            model._cnnvis_memory_format = torch.channels_last
        return model

    def save(self, which: Sequence[str] = ("last",)) -> None:
        """Every rank calls this (it gathers their random states); rank 0 writes."""
        rng = distributed.gather_to_main(rng_state(self.device, self.train_source))
        if rng is not None:
            payload = self._payload(rng)
            with interrupts_deferred():  # Ctrl-C lands after the write: last.pt and best.pt of one epoch
                # last.pt (the resume point) goes last: a SIGKILL between the two writes then leaves a
                # best.pt that is ahead of last.pt (the resumed epoch rewrites it), never one behind the
                # best epoch last.pt records, or none at all.
                for name in sorted(which, key=lambda n: n == "last"):
                    save_checkpoint(payload, checkpoint_path(self.run_dir, name))
        self.saved_epoch = self.state.epoch

    # ------------------------------------------------------------------ the loop

    def _emit(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            getattr(listener, event)(self.state, *args)

    def train_one_epoch(self) -> dict[str, float]:
        s, device = self.state, self.device
        model, optimizer, config = self.train_model, s.optimizer, self.config
        model.train()
        set_train_mode(s.model, config.model.freeze)  # a frozen backbone stays in eval mode
        distributed.set_epoch(self.data.train, s.epoch)
        losses = torch.zeros(max(s.steps_per_epoch, 1), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        check_every = config.train.log_every
        trainable = [p for p in model.parameters() if p.requires_grad]
        layout = memory_format(model)
        lr_first, lr_max, lr_sum = optimizer.param_groups[0]["lr"], 0.0, 0.0
        start = time.perf_counter()
        for step, (images, labels) in enumerate(self.train_source):
            s.lr = optimizer.param_groups[0]["lr"]  # a Python float the scheduler keeps: no device sync
            lr_max, lr_sum = max(lr_max, s.lr), lr_sum + s.lr
            images = images.to(device, non_blocking=True, memory_format=layout)
            labels = labels.to(device, non_blocking=True)
            targets = labels
            if self.mixer is not None:
                images, targets = self.mixer(images, labels)
            if step == 0 and self.fast is None:  # features are no images to show
                self._emit("on_first_batch", images, labels)
            with autocast(device, self.amp):
                logits = model(images)
                loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=config.train.label_smoothing,
                                                   reduction="sum" if self.world.distributed else "mean")
                if self.world.distributed:  # this rank's part of the global batch's mean loss (DDP averages the ranks)
                    loss = loss * distributed.loss_scale(self.data.train, step, labels.shape[0], self.world)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.train.grad_clip:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, config.train.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            if self.scheduler_unit == "step":
                self.scheduler.step()
            if self.average is not None:
                self.average.update_parameters(s.model)
            detached = loss.detach()
            losses[step] = detached
            correct += (logits.detach().argmax(1) == hard_labels(targets)).sum()
            seen += labels.shape[0]
            s.global_step += 1
            self._emit("on_step", step, detached)
            if (step + 1) % check_every == 0:
                self._check_finite(losses[: step + 1])  # the one host sync per interval
        self._check_finite(losses[: s.steps_per_epoch])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        # a rank's step loss is its share of the global batch's mean, times the world size (what DDP averages)
        totals = torch.stack([losses[: s.steps_per_epoch].double().sum(), correct.double(), torch.tensor(float(seen), device=device)])
        loss_sum, correct_all, seen_all = distributed.reduce_sum(totals).tolist()  # the one copy to the host
        return {
            "train_loss": loss_sum / max(s.steps_per_epoch, 1) / self.world.size,
            "train_accuracy": correct_all / max(seen_all, 1),
            "seconds": seconds,
            "images_per_second": seen_all / seconds if seconds > 0 else 0.0,
            "lr": lr_first,
            "lr_max": lr_max,
            "lr_mean": lr_sum / max(s.steps_per_epoch, 1),
        }

    def _check_finite(self, losses: Tensor) -> None:
        # One rank's NaN is every rank's stop, at the same step: no rank is left waiting in a collective.
        losses = distributed.reduce_sum(losses.clone()) if self.world.distributed else losses
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            step = int(bad.nonzero()[0, 0]) + 1
            raise self._diverged(f"the loss became {losses[step - 1].item()} in epoch {self.state.epoch + 1}, step {step}")

    def _diverged(self, what: str) -> TrainingError:
        return TrainingError(
            f"{what}; training stopped.",
            f"The last good checkpoint is kept in {checkpoint_path(self.run_dir, 'last').parent}. Try a lower learning rate "
            f"(optimizer.lr is {self.config.optimizer.lr}) or set train.grad_clip.",
        )

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then test the best model; returns the final metrics."""
        s, config = self.state, self.config
        if self.saved_epoch is None:
            self.save(["last"])  # a resume point exists from the first second on
        self._emit("on_train_start")
        if self.fast is not None:
            self.fast.prepare()
        batch_key, where = "batch_size", "in epoch 1"
        try:
            while s.epoch < config.train.epochs:
                self._emit("on_epoch_start")
                batch_key, where = "batch_size", f"in epoch {s.epoch + 1}"
                metrics = self.train_one_epoch()
                batch_key = "eval_batch_size"
                distributed.broadcast_buffers(self.evaluated_model)  # every rank evaluates what rank 0 saves
                val = evaluate(*((self.fast.head, self.fast.val) if self.fast is not None else (self.evaluated_model, self.data.val)),
                               self.device, self.amp, config.train.tta_flip)
                if not math.isfinite(val["loss"]):
                    # The training losses were finite, so the last steps broke the weights: keep them out of last.pt.
                    raise self._diverged(
                        f"the validation loss became {val['loss']} after epoch {s.epoch + 1}, step {s.steps_per_epoch} "
                        f"(the weights are no longer finite)"
                    )
                # From here to the saved checkpoint the epoch is counted: Ctrl-C waits, so that it
                # never lands between the two and loses a finished epoch.
                with interrupts_deferred():
                    if self.scheduler_unit == "epoch":
                        self.scheduler.step()
                    s.epoch += 1
                    record = {"epoch": s.epoch, "step": s.global_step, **metrics, "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
                    improved = val["accuracy"] > s.best_val_accuracy
                    if improved:
                        s.best_val_accuracy, s.epochs_without_improvement = val["accuracy"], 0
                    else:
                        s.epochs_without_improvement += 1
                    record["best_val_accuracy"] = s.best_val_accuracy
                    s.history.append(record)
                    self._write_metrics(append_jsonl, record)
                    self.save(["last", "best"] if improved else ["last"])
                self._emit("on_epoch_end", record)
                patience = config.train.early_stopping
                if patience and s.epochs_without_improvement >= patience:
                    break
            batch_key, where = "eval_batch_size", "while testing"
            final = self.test()
        except torch.OutOfMemoryError:
            size = getattr(config.data, batch_key)
            raise TrainingError(
                f"out of memory on {self.device} {where} (data.{batch_key} = {size}).",
                f"Try a smaller batch size, e.g. data.{batch_key}={max(1, size // 2)}",
            ) from None
        except (RuntimeError, torch.distributed.DistError) as exc:
            raise distributed.peer_lost(exc, self.run_dir) or exc  # another rank died: one line, not a gloo/NCCL traceback
        distributed.forget_run(self.run_dir)
        self._emit("on_train_end", final)
        return final

    def test(self) -> dict[str, Any]:
        """Test accuracy of the best-validation weights (what ``best.pt`` holds)."""
        s = self.state
        best = checkpoint_path(self.run_dir, "best")
        model = self.evaluated_model
        saved = distributed.decide_on_main(  # read once, by rank 0; the weights alone travel (no optimizer state)
            self.world, lambda: {k: v for k, v in load_checkpoint(best).items() if k in ("model", "meta")} if best.is_file() else None)
        if saved is not None:
            model = self._placed(model_from_checkpoint(saved, self.config, str(best)))
        logits, targets = predict_split(model, self.data.test, self.device, self.amp, self.config.train.tta_flip)
        result = split_scores(logits, targets, self.device)  # over every rank's share
        s.test_predictions = distributed.gather_predictions(logits, targets)  # the whole split, for rank 0's listeners
        final = {
            "epoch": s.epoch,
            "step": s.global_step,
            "test_loss": result["loss"],
            "test_accuracy": result["accuracy"],
            "test_split": "test",
            "test_checkpoint": "best",
            "best_val_accuracy": s.best_val_accuracy,
        }
        self._write_metrics(append_jsonl, final)
        return final

    def _write_metrics(self, write: Any, rows: Any) -> None:
        """``write(RUN/metrics.jsonl, rows)`` with an unwritable file turned into a :class:`TrainingError`."""
        if not self.world.is_main:
            return
        path = self.run_dir / METRICS_FILE
        try:
            write(path, rows)
        except OSError as exc:
            raise TrainingError(
                f"could not write {path}: {exc.strerror or exc}",
                "Free disk space or make the run directory writable; the checkpoints written so far are intact.",
            ) from None

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        distributed.stop()
