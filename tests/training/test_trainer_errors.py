"""Training faults: non-finite loss, out of memory, Ctrl-C, full or read-only disks (docs/errors.md)."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

import torch
from cli_helpers import cli, finite, only_run, weights_only

from cnnvis import checkpoint as ckpt
from cnnvis.training.trainer import Trainer


def test_nan_loss_from_a_huge_learning_rate(tmp_path, config):
    out = cli("train", config, "--set", "optimizer.lr=1e30", "--set", "train.epochs=2", "--runs-dir", tmp_path / "runs", code=1)
    assert re.search(r"error: the (validation )?loss became nan (in|after) epoch 1, step \d", out), out
    assert "training stopped" in out and "Try a lower learning rate (optimizer.lr is 1e+30)" in out
    run = only_run(tmp_path / "runs")
    assert f"The last good checkpoint is kept in {run / 'checkpoints'}" in out
    last = weights_only(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 0 and finite(last)
    assert not (run / "checkpoints" / "best.pt").exists()


def test_nan_loss_mid_epoch_names_epoch_and_step(tmp_path, config, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"train": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if "label_smoothing" in kwargs:  # training steps only
            calls["train"] += 1
            if calls["train"] == 7:  # 18 training images, 4 a batch: 5 steps an epoch
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    out = cli("train", config, "--set", "train.epochs=3", "--runs-dir", tmp_path / "runs", code=1)
    assert "error: the loss became nan in epoch 2, step 2; training stopped." in out
    last = weights_only(only_run(tmp_path / "runs") / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and finite(last)


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, config, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_one_epoch", oom)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=1)
    assert "out of memory on cpu in epoch 1 (data.batch_size = 4)" in out
    assert "Try a smaller batch size, e.g. data.batch_size=2" in out


def test_out_of_memory_while_testing_names_the_eval_batch_size(tmp_path, config, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(Trainer, "test", oom)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=1)
    assert "out of memory on cpu while testing (data.eval_batch_size = 64)" in out
    assert "e.g. data.eval_batch_size=32" in out


def test_ctrl_c_mid_epoch_in_process(tmp_path, config, monkeypatch):
    """The real signal is sent in test_crash_safety; this checks the message and exit status."""
    real = Trainer.train_one_epoch
    calls = []

    def interrupted_in_epoch_2(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted_in_epoch_2)
    out = cli("train", config, "--set", "train.epochs=3", "--runs-dir", tmp_path / "runs", code=130)
    run = only_run(tmp_path / "runs")
    assert f"interrupted in epoch 2; checkpoints/last.pt holds epoch 1. resume with: cnnvis train --resume {run}" in out
    assert weights_only(run / "checkpoints" / "last.pt")["epoch"] == 1


def test_ctrl_c_before_the_first_checkpoint(tmp_path, config, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=130)
    assert "interrupted in epoch 1, before the first checkpoint was written." in out and "resume" not in out
    monkeypatch.setattr("cnnvis.training.trainer.build_data", interrupted)  # still loading the data
    out = cli("train", config, "--runs-dir", tmp_path / "other", code=130)
    assert out == "interrupted"
    assert not (tmp_path / "other").exists()


class FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_disk_full_while_writing_a_checkpoint(tmp_path, config, monkeypatch):
    real_fdopen = os.fdopen
    opened = []

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        if ".pt." not in os.readlink(f"/proc/self/fd/{fd}"):  # config.yaml and others use os.fdopen too
            return handle
        opened.append(fd)
        # 1: last.pt before training; the end of epoch 1: 2 best.pt, then 3 last.pt (the resume point)
        return FullDisk(handle, room=4096) if len(opened) == 3 else handle

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    out = cli("train", config, "--set", "train.epochs=2", "--runs-dir", tmp_path / "runs", code=1)
    run = only_run(tmp_path / "runs")
    assert f"error: could not write checkpoint {run / 'checkpoints' / 'last.pt'}: No space left on device." in out
    assert "Free disk space or choose a writable runs directory; the previous checkpoint is intact." in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"], "a half-written file was left"
    last = weights_only(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 0 and finite(last)
    assert weights_only(run / "checkpoints" / "best.pt")["epoch"] == 1


def test_disk_full_while_writing_metrics(tmp_path, config, monkeypatch):
    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr("cnnvis.io.open", full_open, raising=False)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=1)
    run = only_run(tmp_path / "runs")
    assert f"could not write {run / 'metrics.jsonl'}: No space left on device" in out
    assert weights_only(run / "checkpoints" / "last.pt")["epoch"] == 0


def test_run_dir_made_read_only_during_training(tmp_path, config, monkeypatch):
    # Simulated (tests may run as root): the run's folder refuses new files after the first checkpoint.
    runs = tmp_path / "runs"
    real_mkstemp = tempfile.mkstemp
    made = []

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")).name == "checkpoints" and runs in Path(kwargs["dir"]).parents:
            made.append(kwargs["dir"])
            if len(made) > 1:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = cli("train", config, "--set", "train.epochs=2", "--runs-dir", runs, code=1)
    run = only_run(runs)
    assert f"error: could not write checkpoint {run / 'checkpoints' / 'best.pt'}: Permission denied." in out
    assert "Free disk space or choose a writable runs directory; the previous checkpoint is intact." in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert weights_only(run / "checkpoints" / "last.pt")["epoch"] == 0


def test_runs_dir_not_writable(tmp_path, config, monkeypatch):
    # Tests may run as root, for whom chmod does not block writes: the refusal is simulated.
    runs = tmp_path / "readonly"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if runs in (self, *self.parents):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = cli("train", config, "--runs-dir", runs, code=2)
    assert f"cannot create a run directory in {runs}: Read-only file system" in out


def test_runs_dir_inside_a_file(tmp_path, config):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    out = cli("train", config, "--runs-dir", blocker / "sub", code=2)
    assert f"cannot create a run directory in {blocker / 'sub'}: Not a directory" in out


def test_run_dir_not_writable_when_the_config_is_saved(tmp_path, config, monkeypatch):
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".config.yaml."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=2)
    assert "config.yaml: Permission denied" in out and "cannot write" in out
    assert not list((tmp_path / "runs").rglob("*.tmp"))
