"""Run directories: naming new runs, and rebuilding a trained model from one.

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml  metrics.jsonl  events.out.tfevents.*  checkpoints/{last,best}.pt  visualizations/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnvis.checkpoint import load_checkpoint, load_model_state
from cnnvis.config import Config, build_config
from cnnvis.errors import CheckpointError, ConfigError
from cnnvis.models import build_model


def create_run_dir(runs_dir: str | Path, name: str) -> Path:
    """A fresh directory; an existing run is never reused or overwritten."""
    runs_dir = Path(runs_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        candidate = runs_dir / (f"{name}-{stamp}" if attempt == 0 else f"{name}-{stamp}-{attempt}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            (candidate / "checkpoints").mkdir()
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
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    order = ["best.pt", "last.pt"] if prefer == "best" else ["last.pt", "best.pt"]
    for name in order:
        candidate = path / "checkpoints" / name
        if candidate.is_file():
            return path, candidate
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is not a cnnvis run (no config.yaml or checkpoints/)")
    if prefer == "last":  # resuming: the run stopped before its first checkpoint was written
        raise CheckpointError(f"{path} has no checkpoint yet: it stopped before training began.", "Start a new run instead.")
    raise CheckpointError(f"{path} has no checkpoint yet", "Train it first (an epoch must finish before best.pt exists).")


@dataclass
class LoadedRun:
    """A trained model and everything needed to feed it and to name its outputs."""

    model: nn.Module
    config: Config
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    run_dir: Path
    checkpoint: Path
    epoch: int
    device: torch.device


def model_from_checkpoint(payload: dict[str, Any], config: Config, source: str) -> nn.Module:
    meta = payload["meta"]
    model = build_model(
        config.model.arch,
        num_classes=len(meta["class_names"]),
        in_channels=int(meta["in_channels"]),
        image_size=int(meta["image_size"]),
        dropout=config.model.dropout,
    )
    load_model_state(model, payload["model"], source)
    return model


def load_run(path: str | Path, device: torch.device | str = "cpu", prefer: str = "best") -> LoadedRun:
    """Rebuild the model of a run (or checkpoint file) from the config stored in the checkpoint."""
    device = torch.device(device)
    run_dir, checkpoint = resolve_checkpoint(path, prefer)
    payload = load_checkpoint(checkpoint, map_location="cpu")
    config = build_config(payload["config"], source=f"{checkpoint} (stored config)")
    model = model_from_checkpoint(payload, config, str(checkpoint)).to(device).eval()
    meta = payload["meta"]
    return LoadedRun(
        model=model,
        config=config,
        class_names=list(meta["class_names"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        in_channels=int(meta["in_channels"]),
        image_size=int(meta["image_size"]),
        run_dir=run_dir,
        checkpoint=checkpoint,
        epoch=int(payload.get("epoch", 0)),
        device=device,
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
