"""The run directory, the contract between ``train`` and every later command: its paths, naming
new runs, and rebuilding a trained model from one.

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml  metrics.jsonl  events.out.tfevents.*  checkpoints/{last,best}.pt
      visualizations/  evaluation/  report.html
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnvis.checkpoint import load_checkpoint, load_model_state
from cnnvis.config import Config, build_config
from cnnvis.data.bundle import DataBundle, ImageSpec
from cnnvis.errors import CheckpointError, ConfigError
from cnnvis.io import JsonLines, read_jsonl
from cnnvis.models import build_model

if TYPE_CHECKING:  # sources.py builds LoadedRun objects: it imports this module, not the other way round
    from cnnvis.sources import ModelOrigin
    from cnnvis.zoo import Preprocessing

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
VISUALIZATIONS_DIR = "visualizations"
EVALUATION_DIR = "evaluation"
REPORT_FILE = "report.html"
EVENT_FILE_GLOB = "events.out.tfevents.*"


class EvaluationFiles:
    """The names of what ``cnnvis evaluate`` writes into ``RUN/evaluation/`` (and the report reads)."""

    METRICS = "metrics.json"
    PER_CLASS = "per_class.csv"
    CONFUSION_MATRIX = "confusion_matrix.png"
    CONFIDENTLY_WRONG = "confidently_wrong.png"
    FAITHFULNESS = "faithfulness.json"
    FAITHFULNESS_TABLE = "faithfulness.csv"
    FAITHFULNESS_CURVES = "faithfulness_curves.png"


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    """``RUN/checkpoints/<which>.pt`` (``which``: ``last`` or ``best``)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def create_run_dir(runs_dir: str | Path, name: str) -> Path:
    """A fresh directory; an existing run is never reused or overwritten."""
    runs_dir = Path(runs_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        candidate = runs_dir / (f"{name}-{stamp}" if attempt == 0 else f"{name}-{stamp}-{attempt}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            (candidate / CHECKPOINT_DIR).mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create a run directory in {runs_dir}: {exc.strerror}") from None
    raise ConfigError(f"could not find a free run name for {name!r} in {runs_dir}")


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` from a run directory or a checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return run_dir, path
    order = ["best", "last"] if prefer == "best" else ["last", "best"]
    for name in order:
        candidate = checkpoint_path(path, name)
        if candidate.is_file():
            return path, candidate
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a cnnvis run (no config.yaml or checkpoints/)")
    if prefer == "last":  # resuming: the run stopped before its first checkpoint was written
        raise CheckpointError(f"{path} has no checkpoint yet: it stopped before training began.", "Start a new run instead.")
    raise CheckpointError(f"{path} has no checkpoint yet", "Train it first (an epoch must finish before best.pt exists).")


def resume_point(resume: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, Path, dict[str, Any], Config]:
    """``(run_dir, checkpoint, payload, config)`` to continue training from: the run's ``last.pt``
    and its stored config with ``overrides`` applied (e.g. more epochs; not another architecture)."""
    run_dir, checkpoint = resolve_checkpoint(resume, prefer="last")
    payload = load_checkpoint(checkpoint, map_location="cpu")
    config = build_config(payload["config"], list(overrides), source=f"{checkpoint} (stored config)")
    saved_arch = payload.get("meta", {}).get("arch", config.model.arch)
    if config.model.arch != saved_arch:
        raise ConfigError(
            f"{checkpoint} holds a {saved_arch} model; a resumed run cannot switch to model.arch = {config.model.arch}.",
            "Keep the run's model.arch, or start a new run for the other architecture.",
        )
    return run_dir, checkpoint, payload, config


@dataclass
class LoadedRun:
    """A model and everything needed to feed it and to name its outputs: a trained run, or (with
    ``origin``) any other model (:mod:`cnnvis.sources`) with a run-like output directory."""

    model: nn.Module
    config: Config | None  #: None for a model that is not a cnnvis run
    spec: ImageSpec
    run_dir: Path  #: where outputs go (a run-like directory for other models)
    checkpoint: Path | None  #: None for a model that is not a cnnvis run
    epoch: int
    device: torch.device
    origin: ModelOrigin | None = None  #: where a model that is not a cnnvis run came from

    @property
    def architecture(self) -> str:
        return self.origin.name if self.origin is not None else self.config.model.arch

    @property
    def untrained(self) -> bool:
        """No epoch has finished (a run) or random weights were asked for: explanations of nothing learned."""
        return self.origin.random if self.origin is not None else self.epoch == 0

    @property
    def label(self) -> str:
        """How titles and tables name the model: ``mnist_cnn, best.pt (epoch 8)``."""
        if self.origin is not None:
            return self.origin.label
        return (f"{self.architecture}, {self.checkpoint.name} (epoch {self.epoch}"
                f"{': UNTRAINED, random weights' if self.untrained else ''})")

    @property
    def weights(self) -> str:
        """What sidecars record as the weights: the checkpoint file, a weights name or file, or ``random``."""
        return self.origin.weights_text if self.origin is not None else str(self.checkpoint)

    @property
    def notes(self) -> list[str]:
        """Lines the commands print once: defaults used, random weights, deprecated formats."""
        return list(self.origin.notes) if self.origin is not None else []

    @property
    def class_aliases(self) -> tuple[str, ...]:
        """The names ``--target`` and class folders are matched against: with every alias where the
        model's names have them (``"tench, Tinca tinca"``), else :attr:`spec.class_names`."""
        if self.origin is not None and self.origin.aliases is not None:
            return tuple(self.origin.aliases)
        return self.spec.class_names

    @property
    def preprocessing(self) -> Preprocessing:
        """How an image file becomes an input (:class:`cnnvis.zoo.Preprocessing`): a run's own
        evaluation transform (short side to ``resize``, centre crop), or what the model came with."""
        from cnnvis.zoo import Preprocessing

        if self.origin is not None:
            return self.origin.preprocessing
        size = self.spec.image_size
        # the digit pipeline has no resize step: the picture is scaled to image_size
        resize = size if self.config.data.dataset == "mnist" else (self.config.data.transforms.resize or size)
        return Preprocessing(crop=(size, size), resize=max(resize, size), mean=self.spec.mean, std=self.spec.std,
                             source="the run's evaluation transform")

    def data(self, device: torch.device | str | None = None, hint: str = "Use the data the run was trained on.") -> DataBundle:
        """The run's own data for evaluation, checked to still have the classes the model was
        trained on (else ``hint``); for another model, the labelled folder it was given
        (``origin.data``). Image files are read as they are needed, never all decoded
        up front: a command that explains eight images must not decode the training set."""
        if self.origin is not None:
            from cnnvis.data.folders import labelled_folder

            if self.origin.data is None:
                raise ConfigError(f"{self.architecture} has no data of its own",
                                  "Give a labelled image folder (one sub-folder per class): --data FOLDER.")
            return labelled_folder(self.origin.data, self.spec, self.preprocessing.transform(),
                                   aliases=self.origin.aliases)
        from cnnvis.data import build_data

        config = self.config.model_copy(update={"data": self.config.data.model_copy(update={"in_memory": False})})
        bundle = build_data(config, self.device if device is None else device)
        bundle.check_fits(self.spec.class_names, self.checkpoint, hint)
        return bundle


def model_from_checkpoint(payload: dict[str, Any], config: Config, source: str) -> nn.Module:
    """The model a checkpoint payload holds, rebuilt from ``config`` and its stored :class:`ImageSpec`."""
    spec = ImageSpec.from_dict(payload["meta"])
    model = build_model(config.model.arch, num_classes=spec.num_classes, in_channels=spec.in_channels,
                        image_size=spec.image_size, dropout=config.model.dropout)
    load_model_state(model, payload["model"], source)
    return model


def load_run(path: str | Path, device: torch.device | str = "cpu", prefer: str = "best",
             allow_untrained: bool = False) -> LoadedRun:
    """Rebuild the model of a run (or checkpoint file) from the config stored in the checkpoint.

    A run stopped before its first epoch ended holds only the start-up ``last.pt`` (epoch 0):
    random weights, whose maps look as plausible as trained ones. That is refused unless
    ``allow_untrained``; the loaded run then says ``untrained`` wherever it is named.
    """
    device = torch.device(device)
    run_dir, checkpoint = resolve_checkpoint(path, prefer)
    payload = load_checkpoint(checkpoint, map_location="cpu")
    if int(payload.get("epoch", 0)) == 0 and not allow_untrained:
        raise CheckpointError(f"{run_dir if Path(path).is_dir() else checkpoint} has no checkpoint yet",
                              "Train it first (an epoch must finish before best.pt exists), "
                              "or pass --allow-untrained to explain the random start-up weights.")
    config = build_config(payload["config"], source=f"{checkpoint} (stored config)")
    model = model_from_checkpoint(payload, config, str(checkpoint)).to(device).eval()
    return LoadedRun(model=model, config=config, spec=ImageSpec.from_dict(payload["meta"]), run_dir=run_dir,
                     checkpoint=checkpoint, epoch=int(payload.get("epoch", 0)), device=device)


def read_metrics(run_dir: str | Path) -> JsonLines:
    """The records of ``RUN/metrics.jsonl``; a line cut by a kill is skipped and counted."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)
