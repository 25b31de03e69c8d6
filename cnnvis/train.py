"""The training loop: plain functions for an epoch and an evaluation, a trainer that fires
events (progress bars and TensorBoard are listeners), checkpoints, resume and early stopping.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from cnnvis.checkpoint import interrupts_deferred, load_checkpoint, load_model_state, save_checkpoint
from cnnvis.config import Config, build_config, config_to_dict, save_config
from cnnvis.data import DataBundle, build_data
from cnnvis.errors import ConfigError, TrainingError
from cnnvis.models import build_model
from cnnvis.optim import make_optimizer, make_scheduler
from cnnvis.run import create_run_dir, resolve_checkpoint


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine", "Use --device cpu or auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def amp_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config.train.amp == "off":
        return None
    if config.train.amp == "fp16" or (config.train.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


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


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
             amp: torch.dtype | None = None) -> dict[str, float]:
    """Cross-entropy (no label smoothing) and accuracy over a split; sums stay on the device
    until the one read at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    memory_format = _memory_format(model)
    with torch.inference_mode(), _autocast(device, amp):
        for images, labels in batches:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            logits = model(images).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
            count += labels.shape[0]
    model.train(was_training)
    count = max(count, 1)
    return {"loss": loss_sum.item() / count, "accuracy": correct.item() / count}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _memory_format(model: nn.Module) -> torch.memory_format:
    return getattr(model, "_cnnvis_memory_format", torch.contiguous_format)


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
        """With ``resume``, the run's stored config is used (``overrides`` still apply, e.g. more epochs)."""
        self.device = resolve_device(device)
        self.listeners = list(listeners)
        payload = None
        if resume is not None:
            run_dir, checkpoint = resolve_checkpoint(resume, prefer="last")
            payload = load_checkpoint(checkpoint, map_location="cpu")
            config = build_config(payload["config"], overrides, source=f"{checkpoint} (stored config)")
            saved_arch = payload.get("meta", {}).get("arch", config.model.arch)
            if config.model.arch != saved_arch:
                raise ConfigError(
                    f"{checkpoint} holds a {saved_arch} model; a resumed run cannot switch to model.arch = {config.model.arch}.",
                    "Drop --set model.arch, or start a new run for the other architecture.",
                )
            self.run_dir = run_dir
        elif config is None:
            raise ConfigError("a config is needed unless resuming a run")
        self.config = config
        _seed_everything(config)
        self.data = data or build_data(config, self.device)
        if payload is not None and list(payload["meta"]["class_names"]) != self.data.class_names:
            trained = list(payload["meta"]["class_names"])
            added = [c for c in self.data.class_names if c not in trained]
            gone = [c for c in trained if c not in self.data.class_names]
            changes = "; ".join(part for part in (
                f"new: {', '.join(added)}" if added else "", f"missing: {', '.join(gone)}" if gone else "") if part)
            raise ConfigError(
                f"the data now has {self.data.num_classes} classes but {checkpoint} was trained on "
                f"{len(trained)} ({changes or 'another order'}); resume needs the same classes.",
                "Restore the class folders as they were, or start a new run.",
            )
        model = build_model(
            config.model.arch, self.data.num_classes, self.data.in_channels, self.data.image_size,
            pretrained=config.model.pretrained if payload is None else None,
            freeze=config.model.freeze, dropout=config.model.dropout,
        ).to(self.device)
        if config.train.channels_last:  # faster convolutions on CUDA and on CPUs (oneDNN) alike
            model = model.to(memory_format=torch.channels_last)
            model._cnnvis_memory_format = torch.channels_last
        self.amp = amp_dtype(config, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        optimizer = make_optimizer(config, (p for p in model.parameters() if p.requires_grad))
        steps_per_epoch = len(self.data.train)
        self.scheduler, self.scheduler_unit = make_scheduler(config, optimizer, steps_per_epoch)
        if payload is None:
            self.run_dir = create_run_dir(runs_dir, name or config.name)
            save_config(config, self.run_dir / "config.yaml")
        self.state = TrainState(config, self.run_dir, self.device, model, optimizer, self.data, steps_per_epoch=steps_per_epoch)
        self.saved_epoch: int | None = None  # the epoch checkpoints/last.pt holds, once written
        #: the stored test metrics when ``resume`` names a run that already finished (nothing to train)
        self.finished: dict[str, Any] | None = None
        if payload is not None:
            self._restore(payload)
            self.saved_epoch = self.state.epoch
            save_config(config, self.run_dir / "config.yaml")  # overrides (e.g. more epochs) are part of the run now

    # ------------------------------------------------------------------ checkpoints

    def _payload(self) -> dict[str, Any]:
        s = self.state
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        train_source = self.data.train
        if hasattr(train_source, "state_dict"):
            rng["loader"] = train_source.state_dict()["generator"]
        elif getattr(train_source, "generator", None) is not None:
            rng["loader"] = train_source.generator.get_state()
        return {
            "model": {k: v.detach().cpu().contiguous() for k, v in s.model.state_dict().items()},
            "optimizer": s.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(),
            "epoch": s.epoch,
            "global_step": s.global_step,
            "best_val_accuracy": s.best_val_accuracy,
            "epochs_without_improvement": s.epochs_without_improvement,
            "rng": rng,
            "config": config_to_dict(self.config),
            "meta": {
                "arch": self.config.model.arch,
                "class_names": list(self.data.class_names),
                "mean": list(self.data.mean),
                "std": list(self.data.std),
                "in_channels": self.data.in_channels,
                "image_size": self.data.image_size,
            },
        }

    def _restore(self, payload: dict[str, Any]) -> None:
        s = self.state
        saved = payload.get("scheduler") or {}
        planned = saved.get("total_steps", saved.get("T_max")) if self.scheduler_unit == "step" else None
        wanted = s.steps_per_epoch * self.config.train.epochs
        stored = payload["config"]["train"]["epochs"]
        planned_by_epochs = self.config.scheduler.name in ("onecycle", "cosine")
        if planned_by_epochs and (stored != self.config.train.epochs or planned not in (None, wanted)):
            # Loading the state would keep the old plan: OneCycleLR raises past its end, cosine turns back up.
            planned = planned or s.steps_per_epoch * stored
            raise ConfigError(
                f"this run's {self.config.scheduler.name} schedule was planned for {planned} steps "
                f"({stored} epochs) but the resumed run needs {wanted} (train.epochs = {self.config.train.epochs}).",
                "Resume with the run's own train.epochs and batch size, or start a new run; "
                "scheduler.name step or none can be extended.",
            )
        load_model_state(s.model, payload["model"], "the checkpoint")
        s.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler"):
            self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        s.epoch = int(payload["epoch"])
        s.global_step = int(payload["global_step"])
        s.best_val_accuracy = float(payload["best_val_accuracy"])
        s.epochs_without_improvement = int(payload.get("epochs_without_improvement", 0))
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if "loader" in rng:
            if hasattr(self.data.train, "load_state_dict"):
                self.data.train.load_state_dict({"generator": rng["loader"]})
            elif getattr(self.data.train, "generator", None) is not None:
                self.data.train.generator.set_state(rng["loader"])
        rows = _read_jsonl(self.run_dir / "metrics.jsonl")
        # Lines after the checkpoint's epoch belong to work that is about to be redone.
        history = [m for m in rows if m.get("epoch", 0) <= s.epoch and "test_accuracy" not in m]
        s.history = history
        tested = [m for m in rows if "test_accuracy" in m and m.get("epoch") == s.epoch]
        if tested and s.epoch >= self.config.train.epochs:
            self.finished = tested[-1]
        else:
            _write_jsonl(self.run_dir / "metrics.jsonl", history)

    def save(self, which: Sequence[str] = ("last",)) -> None:
        payload = self._payload()
        with interrupts_deferred():  # Ctrl-C lands after the write: last.pt and best.pt of one epoch
            # last.pt (the resume point) goes last: a SIGKILL between the two writes then leaves a
            # best.pt that is ahead of last.pt (the resumed epoch rewrites it), never one behind the
            # best epoch last.pt records, or none at all.
            for name in sorted(which, key=lambda n: n == "last"):
                save_checkpoint(payload, self.run_dir / "checkpoints" / f"{name}.pt")
        self.saved_epoch = payload["epoch"]

    # ------------------------------------------------------------------ the loop

    def _emit(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            getattr(listener, event)(self.state, *args)

    def train_one_epoch(self) -> dict[str, float]:
        s, device = self.state, self.device
        model, optimizer, config = s.model, s.optimizer, self.config
        model.train()
        losses = torch.zeros(max(s.steps_per_epoch, 1), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        check_every = config.train.log_every
        trainable = [p for p in model.parameters() if p.requires_grad]
        memory_format = _memory_format(model)
        start = time.perf_counter()
        for step, (images, labels) in enumerate(self.data.train):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            if step == 0:
                self._emit("on_first_batch", images, labels)
            with _autocast(device, self.amp):
                logits = model(images)
                loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=config.train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.train.grad_clip:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, config.train.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            if self.scheduler_unit == "step":
                self.scheduler.step()
            detached = loss.detach()
            losses[step] = detached
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            s.global_step += 1
            self._emit("on_step", step, detached)
            if (step + 1) % check_every == 0:
                self._check_finite(losses[: step + 1])  # the one host sync per interval
        self._check_finite(losses[: s.steps_per_epoch])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return {
            "train_loss": losses[: s.steps_per_epoch].mean().item(),
            "train_accuracy": correct.item() / max(seen, 1),
            "seconds": seconds,
            "images_per_second": seen / seconds if seconds > 0 else 0.0,
        }

    def _check_finite(self, losses: Tensor) -> None:
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            step = int(bad.nonzero()[0, 0]) + 1
            raise self._diverged(f"the loss became {losses[step - 1].item()} in epoch {self.state.epoch + 1}, step {step}")

    def _diverged(self, what: str) -> TrainingError:
        return TrainingError(
            f"{what}; training stopped.",
            f"The last good checkpoint is kept in {self.run_dir / 'checkpoints'}. Try a lower learning rate "
            f"(optimizer.lr is {self.config.optimizer.lr}) or set train.grad_clip.",
        )

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then test the best model; returns the final metrics."""
        s, config = self.state, self.config
        if s.epoch == 0 and not (self.run_dir / "checkpoints" / "last.pt").exists():
            self.save(["last"])  # a resume point exists from the first second on
        self._emit("on_train_start")
        batch_key, where = "batch_size", "in epoch 1"
        try:
            while s.epoch < config.train.epochs:
                self._emit("on_epoch_start")
                lr = s.optimizer.param_groups[0]["lr"]
                batch_key, where = "batch_size", f"in epoch {s.epoch + 1}"
                metrics = self.train_one_epoch()
                batch_key = "eval_batch_size"
                val = evaluate(s.model, self.data.val, self.device, self.amp)
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
                    record = {"epoch": s.epoch, "step": s.global_step, **metrics, "val_loss": val["loss"], "val_accuracy": val["accuracy"], "lr": lr}
                    improved = val["accuracy"] > s.best_val_accuracy
                    if improved:
                        s.best_val_accuracy, s.epochs_without_improvement = val["accuracy"], 0
                    else:
                        s.epochs_without_improvement += 1
                    record["best_val_accuracy"] = s.best_val_accuracy
                    s.history.append(record)
                    _append_jsonl(self.run_dir / "metrics.jsonl", record)
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
                f"Try a smaller batch size, e.g. --set data.{batch_key}={max(1, size // 2)}",
            ) from None
        self._emit("on_train_end", final)
        return final

    def test(self) -> dict[str, Any]:
        """Test accuracy of the best-validation weights (what ``best.pt`` holds)."""
        s = self.state
        best = self.run_dir / "checkpoints" / "best.pt"
        model = s.model
        if best.is_file():
            payload = load_checkpoint(best, map_location=self.device)
            model = build_model(self.config.model.arch, self.data.num_classes, self.data.in_channels, self.data.image_size,
                                dropout=self.config.model.dropout).to(self.device)
            load_model_state(model, payload["model"], str(best))
            model._cnnvis_memory_format = _memory_format(s.model)
            if self.config.train.channels_last:
                model = model.to(memory_format=torch.channels_last)
        result = evaluate(model, self.data.test, self.device, self.amp)
        final = {
            "epoch": s.epoch,
            "step": s.global_step,
            "test_loss": result["loss"],
            "test_accuracy": result["accuracy"],
            "test_split": "test",
            "test_checkpoint": "best",
            "best_val_accuracy": s.best_val_accuracy,
        }
        _append_jsonl(self.run_dir / "metrics.jsonl", final)
        return final

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


def _seed_everything(config: Config) -> None:
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _unwritable(path, exc) from None


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}) + "\n")
    except OSError as exc:
        raise _unwritable(path, exc) from None


def _unwritable(path: Path, exc: OSError) -> TrainingError:
    return TrainingError(
        f"could not write {path}: {exc.strerror or exc}",
        "Free disk space or make the run directory writable; the checkpoints written so far are intact.",
    )
