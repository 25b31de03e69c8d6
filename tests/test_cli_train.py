"""`cnnvis train` and `cnnvis data check` through Typer's CliRunner, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cnnvis.cli import app
from cnnvis.config import load_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
NO_TB = ["--set", "log.tensorboard=false"]  # TensorBoard logging is tested in tests/training/test_tensorboard.py


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def folder_config(tmp_path: Path, folder: Path) -> Path:
    return write_config(
        tmp_path / "folder.yaml",
        {
            "name": "pics",
            "data": {"dataset": "imagefolder", "path": str(folder), "num_workers": 0, "batch_size": 4, "transforms": {"image_size": 16}},
            "model": {"arch": "mnist_cnn"},
            "scheduler": {"name": "step"},
            "train": {"epochs": 2},
        },
    )


# ------------------------------------------------------------------ the main job


def test_train_mnist_end_to_end(mnist_root, tmp_path):
    config = write_config(
        tmp_path / "mnist.yaml",
        {
            "name": "digits",
            "data": {"root": str(mnist_root), "download": False, "subset": 1024, "val_size": 200, "batch_size": 32, "eval_batch_size": 2000},
            "train": {"epochs": 5},
        },
    )
    runs = tmp_path / "runs"
    result = runner.invoke(
        app, ["train", str(config), "--set", "train.epochs=2", "--set", "optimizer.lr=0.01", "--runs-dir", str(runs), "--device", "cpu", *NO_TB]
    )
    assert result.exit_code == 0, result.output
    assert_no_traceback(result)

    run = only_run(runs)
    assert re.fullmatch(r"digits-\d{8}-\d{6}", run.name), run.name
    saved = load_config(run / "config.yaml")  # the resolved config, overrides applied
    assert saved.train.epochs == 2 and saved.optimizer.lr == 0.01 and saved.data.subset == 1024
    assert saved == load_config(config, ["train.epochs=2", "optimizer.lr=0.01", "log.tensorboard=false"])

    rows = metrics(run)
    assert [r["epoch"] for r in rows[:-1]] == [1, 2]
    for row in rows[:-1]:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds", "images_per_second"):
            assert isinstance(row[key], (int, float)), key
    final = rows[-1]
    assert final["test_split"] == "test" and 0.0 <= final["test_accuracy"] <= 1.0
    assert final["test_accuracy"] > 0.5, "two epochs on 1024 digits should beat chance by far"

    for name in ("last", "best"):
        payload = torch.load(run / "checkpoints" / f"{name}.pt", map_location="cpu", weights_only=True)
        assert payload["meta"]["class_names"] == [str(i) for i in range(10)]
        assert payload["config"]["train"]["epochs"] == 2
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2

    out = result.stdout
    assert "training summary" in out
    assert "test accuracy" in out and f"{final['test_accuracy']:.2%}" in out
    assert f"run saved in {run}" in out  # on one line, whole: a path to copy


def test_two_runs_never_share_a_directory(tiny_imagefolder, tmp_path):
    config = folder_config(tmp_path, tiny_imagefolder(classes=2, per_class=6))
    runs = tmp_path / "runs"
    for _ in range(2):
        result = runner.invoke(app, ["train", str(config), "--runs-dir", str(runs), "--set", "train.epochs=1", "--device", "cpu", *NO_TB])
        assert result.exit_code == 0, result.output
    dirs = sorted(p.name for p in runs.iterdir())
    assert len(dirs) == 2 and all(d.startswith("pics-") for d in dirs)


def test_ctrl_c_then_resume_from_the_cli(tiny_imagefolder, tmp_path, monkeypatch):
    from cnnvis.training.trainer import Trainer

    config = folder_config(tmp_path, tiny_imagefolder(classes=2, per_class=6))
    runs = tmp_path / "runs"
    real_epoch = Trainer.train_one_epoch

    def ctrl_c_in_epoch_2(self):
        if self.state.epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self)

    monkeypatch.setattr(Trainer, "train_one_epoch", ctrl_c_in_epoch_2)
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(runs), "--device", "cpu", *NO_TB])
    assert result.exit_code == 130, result.output
    run = only_run(runs)
    assert f"cnnvis train --resume {run}" in result.output.replace("\n", "")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert_no_traceback(result)

    monkeypatch.setattr(Trainer, "train_one_epoch", real_epoch)
    result = runner.invoke(app, ["train", "--resume", str(run), "--device", "cpu", *NO_TB])
    assert result.exit_code == 0, result.output
    assert only_run(runs) == run
    assert [r["epoch"] for r in metrics(run) if "val_accuracy" in r] == [1, 2]
    assert "test_accuracy" in metrics(run)[-1]

    # Resuming the finished run again: it says so and changes nothing.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["train", "--resume", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "already finished its 2 epochs; nothing to train" in " ".join(result.output.split())
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ help and entry points


def test_train_help_shows_options_with_defaults():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    text = result.output
    for option in ("--set", "--name", "--runs-dir", "--resume", "--device", "CONFIG"):
        assert option in text, option
    assert re.search(r"default:\s*runs", text), text
    assert re.search(r"default:\s*auto", text), text
    assert "train.epochs=3" in text  # the help shows how --set is written


def test_top_level_help_lists_commands():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "train" in result.output and "data" in result.output


def test_python_dash_m_cnnvis_help():
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "cnnvis", "--help"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout and "train" in done.stdout


# ------------------------------------------------------------------ errors: one line, an exit status, no traceback


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_2_with_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"data": {"root": str(tmp_path)}})
    result = runner.invoke(app, ["train", str(config), "--device", "cuda", "--runs-dir", str(tmp_path / "runs"), *NO_TB])
    assert result.exit_code == 2
    assert_no_traceback(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "--device cuda: CUDA is not available" in lines[0] and "cpu or auto" in lines[0]
    assert not (tmp_path / "runs").exists(), "a run directory was created for a run that never started"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "optimzer.lr=0.1"], "did you mean 'optimizer'"),
        (["--set", "train.epochs=zero"], "train.epochs = 'zero'"),
        (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, args, expected):
    config = write_config(tmp_path / "c.yaml", {"data": {"root": str(tmp_path)}})
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs"), *args, *NO_TB])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr.replace("\n", "")
    assert_no_traceback(result)


def test_missing_config_and_no_config(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.stderr
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert_no_traceback(result)


def test_missing_mnist_exits_2_naming_the_folder(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"data": {"root": str(tmp_path / "data"), "download": False}})
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", *NO_TB])
    assert result.exit_code == 2
    assert str(tmp_path / "data" / "MNIST" / "raw") in result.stderr.replace("\n", "")
    assert_no_traceback(result)


# ------------------------------------------------------------------ data check


def test_data_check_names_every_bad_file(tiny_imagefolder, tmp_path):
    folder = tiny_imagefolder(classes=2, per_class=6, fmt="jpg")
    bad = [folder / "class_0" / "a_truncated_photo_with_a_long_name.jpg", folder / "class_1" / "empty.jpg"]
    good = (folder / "class_0" / "img_000.jpg").read_bytes()
    bad[0].write_bytes(good[: len(good) // 2])
    bad[1].write_bytes(b"")
    config = folder_config(tmp_path, folder)
    result = runner.invoke(app, ["data", "check", str(config)])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert f"{bad[1]}: empty file" in lines
    assert any(line.startswith(f"{bad[0]}: unreadable") for line in lines), result.stdout
    assert "2 unreadable file(s), skipped:" in lines


def test_data_check_all_good(tiny_imagefolder, tmp_path):
    config = folder_config(tmp_path, tiny_imagefolder(classes=2, per_class=6))
    result = runner.invoke(app, ["data", "check", str(config)])
    assert result.exit_code == 0, result.output
    assert "every image decodes" in result.stdout
    assert "2 classes" in " ".join(result.stdout.split())


def test_brackets_in_paths_are_printed_verbatim(tmp_path):
    """Rich reads "[...]" as markup: a path like .../x[/y]/ must neither vanish nor crash the CLI."""
    missing = tmp_path / "x[" / "y]" / "[flowers]"
    config = write_config(tmp_path / "c.yaml", {"data": {"dataset": "imagefolder", "path": str(missing)}})
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", *NO_TB])
    assert result.exit_code == 2, result.output
    assert str(missing) in result.stderr.replace("\n", "")
    assert_no_traceback(result)


def test_set_data_root_beats_cnnvis_data_which_beats_the_file_and_the_header_says_which(tmp_path, images, monkeypatch):
    from cli_helpers import cli
    from cli_helpers import write_config as write_folder_config

    relative = Path(images.name)  # data.path under data.root
    in_file = write_folder_config(tmp_path / "f.yaml", relative, data={"root": str(tmp_path / "from-file")})
    monkeypatch.setenv("CNNVIS_DATA", str(tmp_path / "from-env"))
    out = cli("train", in_file, "--runs-dir", tmp_path / "runs", code=2)  # CNNVIS_DATA beats the file's root
    assert f"image folder not found: {tmp_path / 'from-env' / images.name}" in out
    out = cli("train", in_file, "--set", f"data.root={images.parent}", "--runs-dir", tmp_path / "runs", code=0)
    assert f"from {images.parent} (data.root from --set)" in out  # --set beats CNNVIS_DATA
    monkeypatch.setenv("CNNVIS_DATA", str(images.parent))
    out = cli("train", in_file, "--runs-dir", tmp_path / "runs", code=0)
    assert f"from {images.parent} (data.root from CNNVIS_DATA)" in out
    monkeypatch.delenv("CNNVIS_DATA")
    out = cli("train", in_file, "--runs-dir", tmp_path / "runs", code=2)  # the file's root, without the environment
    assert f"image folder not found: {tmp_path / 'from-file' / images.name}" in out
    in_file = write_folder_config(tmp_path / "g.yaml", relative, data={"root": str(images.parent)})
    out = cli("train", in_file, "--runs-dir", tmp_path / "runs", code=0)
    assert f"from {images.parent} (data.root from the config)" in out
