"""Resume: an interrupted run continued with --resume ends with exactly the weights of an
uninterrupted one, and its metrics.jsonl has one line per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnvis.checkpoint import load_checkpoint
from cnnvis.config import build_config, load_config
from cnnvis.errors import ConfigError
from cnnvis.training.trainer import Listener, Trainer

# Timing fields differ between any two runs; everything else must match exactly.
TIMING = {"seconds", "images_per_second"}


class InterruptAfter(Listener):
    """Ctrl-C right after epoch ``n`` ended (its checkpoint is written by then)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, state, metrics) -> None:
        if state.epoch == self.n:
            raise KeyboardInterrupt


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_state(run_a: Path, run_b: Path) -> None:
    a = load_checkpoint(run_a / "checkpoints" / "last.pt")
    b = load_checkpoint(run_b / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key])), (index, key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def run_interrupted_and_resumed(config, tmp_path: Path, resume_from: str = "run") -> tuple[Path, Path]:
    full = Trainer(config, runs_dir=tmp_path / "full", device="cpu")
    full.fit()
    cut = Trainer(config, runs_dir=tmp_path / "cut", device="cpu", listeners=[InterruptAfter(1)])
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert load_checkpoint(cut.run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    target = cut.run_dir if resume_from == "run" else cut.run_dir / "checkpoints" / "last.pt"
    resumed = Trainer(None, resume=target, device="cpu")
    assert resumed.run_dir == cut.run_dir  # continues in the same run directory
    resumed.fit()
    return full.run_dir, cut.run_dir


def assert_metrics_continue(full: Path, resumed: Path, epochs: int) -> None:
    rows = metrics(resumed)
    epoch_rows = [r for r in rows if "val_accuracy" in r]
    assert [r["epoch"] for r in epoch_rows] == list(range(1, epochs + 1)), "missing or duplicated epoch lines"
    assert sum("test_accuracy" in r for r in rows) == 1 and "test_accuracy" in rows[-1]
    assert without_timing(rows) == without_timing(metrics(full))


# ------------------------------------------------------------------ MNIST, batched on the device


def mnist_config(root: Path, **train):
    return build_config(
        {
            "name": "resume",
            "data": {
                "root": str(root),
                "download": False,
                "subset": 192,
                "val_size": 100,
                "batch_size": 32,
                "eval_batch_size": 2000,
                "transforms": {"rotation": 10, "translate": 0.1},  # the device augmentation draws random numbers
            },
            "model": {"dropout": 0.2},  # and so does dropout, from the global generator
            "scheduler": {"name": "onecycle"},
            "train": {"epochs": 2, "label_smoothing": 0.1, **train},
        }
    )


def test_mnist_interrupted_and_resumed_equals_uninterrupted(mnist_root, tmp_path):
    full, resumed = run_interrupted_and_resumed(mnist_config(mnist_root), tmp_path)
    assert_same_state(full, resumed)
    assert_metrics_continue(full, resumed, epochs=2)


# ------------------------------------------------------------------ image folders, through a DataLoader or in memory


def folder_config(folder: Path, workers: int, in_memory: bool = False, **extra):
    raw = {
        "name": "resume",
        "data": {
            "dataset": "imagefolder",
            "path": str(folder),
            "num_workers": workers,
            "in_memory": in_memory,
            "batch_size": 4,
            "eval_batch_size": 16,
            "transforms": {"image_size": 16, "resize": 18, "random_crop": True, "flip": True, "color_jitter": 0.2},
        },
        "model": {"arch": "mnist_cnn", "dropout": 0.2},
        "train": {"epochs": 2},
    }
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw)


@pytest.mark.parametrize(
    "workers, resume_from, in_memory",
    [(0, "run", False), (1, "checkpoint", False), (0, "run", True)],  # 1 worker is what num_workers: auto picks on two cores
)
def test_imagefolder_interrupted_and_resumed_equals_uninterrupted(tiny_imagefolder, tmp_path, workers, resume_from, in_memory):
    folder = tiny_imagefolder(classes=3, per_class=10, size=20)
    full, resumed = run_interrupted_and_resumed(folder_config(folder, workers, in_memory), tmp_path, resume_from)
    assert_same_state(full, resumed)
    assert_metrics_continue(full, resumed, epochs=2)


def test_one_epoch_then_resume_for_a_second_equals_two_epochs(tiny_imagefolder, tmp_path):
    """``Trainer(None, resume=run, overrides=["train.epochs=2"])`` extends a finished run."""
    folder = tiny_imagefolder(classes=3, per_class=10, size=20)
    config = folder_config(folder, 0, scheduler={"name": "step", "step_size": 1, "gamma": 0.5})
    full = Trainer(config, runs_dir=tmp_path / "full", device="cpu")
    full.fit()
    short = Trainer(config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})}), runs_dir=tmp_path / "short", device="cpu")
    short.fit()
    assert sum("test_accuracy" in r for r in metrics(short.run_dir)) == 1
    extended = Trainer(None, resume=short.run_dir, overrides=["train.epochs=2"], device="cpu")
    assert extended.config.train.epochs == 2
    extended.fit()
    assert_same_state(full.run_dir, short.run_dir)
    assert_metrics_continue(full.run_dir, short.run_dir, epochs=2)
    # the run's config.yaml now describes the whole run: training from it reproduces it
    assert load_config(short.run_dir / "config.yaml") == load_config(full.run_dir / "config.yaml")


def test_extending_a_onecycle_run_is_a_clear_error(tiny_imagefolder, tmp_path):
    folder = tiny_imagefolder(classes=2, per_class=6, size=16)
    config = folder_config(folder, 0, train={"epochs": 1})
    trainer = Trainer(config, runs_dir=tmp_path, device="cpu")
    trainer.fit()
    before = (trainer.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"onecycle schedule was planned for .*train.epochs = 3"):
        Trainer(None, resume=trainer.run_dir, overrides=["train.epochs=3"], device="cpu")
    assert (trainer.run_dir / "metrics.jsonl").read_text() == before, "a refused resume changed the run"


def test_resume_after_a_crash_between_metrics_and_checkpoint(tiny_imagefolder, tmp_path):
    """A kill after an epoch's metrics line but before its checkpoint (or mid-line): the resumed
    run redoes that epoch and the file still has exactly one line per epoch."""
    folder = tiny_imagefolder(classes=2, per_class=6, size=16)
    config = folder_config(folder, 0, train={"epochs": 3})
    cut = Trainer(config, runs_dir=tmp_path / "cut", device="cpu", listeners=[InterruptAfter(1)])
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    path = cut.run_dir / "metrics.jsonl"
    rows = metrics(cut.run_dir)
    with open(path, "a") as handle:
        handle.write(json.dumps({**rows[0], "epoch": 2}) + "\n")  # epoch 2 logged, never checkpointed
        handle.write('{"epoch": 3, "train_lo')  # and a line cut by the kill
    Trainer(None, resume=cut.run_dir, device="cpu").fit()
    rows = metrics(cut.run_dir)
    assert [r["epoch"] for r in rows if "val_accuracy" in r] == [1, 2, 3]
    assert "test_accuracy" in rows[-1]


def test_resume_needs_a_run(tmp_path):
    from cnnvis.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no such run"):
        Trainer(None, resume=tmp_path / "missing", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a cnnvis run"):
        Trainer(None, resume=tmp_path / "empty", device="cpu")


def test_weight_average_mixing_and_flip_test_resume_exactly(tiny_imagefolder, tmp_path):
    """EMA weights (what is evaluated and saved), MixUp/CutMix draws and the trained weights all
    continue exactly after --resume."""
    folder = tiny_imagefolder(classes=3, per_class=10, size=20)
    config = folder_config(folder, 0, True, train={"epochs": 2, "ema": 0.9, "mixup": 0.2, "cutmix": 1.0, "tta_flip": True},
                           optimizer={"weight_decay": 0.01, "decay_norm_and_bias": False})
    full, resumed = run_interrupted_and_resumed(config, tmp_path)
    assert_same_state(full, resumed)
    assert_metrics_continue(full, resumed, epochs=2)
    a, b = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (full, resumed))
    assert all(torch.equal(a["trained_model"][k], b["trained_model"][k]) for k in a["trained_model"])
    assert a["average"] == b["average"] == {"n_averaged": 2 * 5}  # 18 training images, 4 a batch: 5 steps an epoch
