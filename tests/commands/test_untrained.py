"""A run stopped before its first epoch ended holds random weights: refused, or stamped "untrained"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import cli

from cnnvis.errors import CheckpointError
from cnnvis.run import load_run


@pytest.fixture
def stopped_in_epoch_one(run_copy: Path) -> Path:
    """What Ctrl-C in epoch 1 leaves: only the start-up last.pt, at epoch 0."""
    checkpoints = run_copy / "checkpoints"
    payload = torch.load(checkpoints / "last.pt", weights_only=True)
    payload["epoch"] = 0
    torch.save(payload, checkpoints / "last.pt")
    (checkpoints / "best.pt").unlink()
    return run_copy


@pytest.mark.parametrize("command", ["visualize", "evaluate"])
def test_explaining_random_weights_is_refused(stopped_in_epoch_one: Path, command: str) -> None:
    out = cli(command, stopped_in_epoch_one, "--no-tensorboard", code=2)
    assert f"error: {stopped_in_epoch_one} has no checkpoint yet. Train it first" in " ".join(out.split())
    assert "--allow-untrained" in out
    assert not (stopped_in_epoch_one / "visualizations").exists() and not (stopped_in_epoch_one / "evaluation").exists()


def test_the_library_refuses_the_same_way(stopped_in_epoch_one: Path) -> None:
    with pytest.raises(CheckpointError, match="has no checkpoint yet") as info:
        load_run(stopped_in_epoch_one)
    assert info.value.exit_code == 2
    run = load_run(stopped_in_epoch_one, allow_untrained=True)
    assert run.untrained and "UNTRAINED" in run.label


def test_allowed_untrained_maps_say_so_in_the_table_and_every_sidecar(stopped_in_epoch_one: Path) -> None:
    out = cli("visualize", stopped_in_epoch_one, "-m", "saliency", "-m", "filters", "-n", "2", "--no-tensorboard",
              "--allow-untrained", code=0)
    assert "UNTRAINED" in out
    sidecars = sorted((stopped_in_epoch_one / "visualizations").rglob("*.json"))
    assert {s.parent.name for s in sidecars} == {"saliency", "filters"}
    for sidecar in sidecars:
        written = json.loads(sidecar.read_text())
        assert written["untrained"] is True and written["epoch"] == 0


def test_allowed_untrained_evaluation_says_so(stopped_in_epoch_one: Path) -> None:
    out = cli("evaluate", stopped_in_epoch_one, "--no-tensorboard", "--allow-untrained", code=0)
    assert "UNTRAINED" in out
    metrics = json.loads((stopped_in_epoch_one / "evaluation" / "metrics.json").read_text())
    assert metrics["untrained"] is True


def test_trained_runs_are_not_stamped(run_copy: Path) -> None:
    cli("visualize", run_copy, "-m", "saliency", "-n", "2", "--no-tensorboard", code=0)
    (sidecar,) = (run_copy / "visualizations").rglob("*.json")
    assert json.loads(sidecar.read_text())["untrained"] is False


def test_summary_of_an_untrained_run_still_lists_its_layers(stopped_in_epoch_one: Path) -> None:
    assert "features" in cli("summary", stopped_in_epoch_one, code=0)
