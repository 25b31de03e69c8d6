"""Nothing is lost when training is stopped for real (issue 5).

``cnnvis train`` runs in a subprocess on a tiny generated image folder and is stopped from outside:
Ctrl-C (SIGINT to its process group, as a terminal sends it) in the middle of an epoch, and SIGKILL
in the middle of a checkpoint write and at a random moment. After each stop ``last.pt`` must load
with plain ``torch.load(weights_only=True)``, and ``cnnvis train --resume`` must finish the run with
every epoch counted once. No hook in the library slows training down for this: the test polls the
run directory (``metrics.jsonl`` and the temp file ``save_checkpoint`` writes beside ``last.pt``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

EPOCHS = 10
POLL_S = 0.0005  # while waiting for a checkpoint write: it lasts a few milliseconds
START_TIMEOUT_S = 60  # importing torch on a busy 2-core machine takes a while


def write_config(path: Path, folder: Path, epochs: int) -> Path:
    """Many tiny steps: 16x16 images, 2 a batch, one thread, no TensorBoard."""
    config = {
        "name": "crash",
        # through the DataLoader: decoding per batch keeps an epoch a few tenths of a second long,
        # long enough for a signal to land inside it (in memory, ten epochs take well under one)
        "data": {"dataset": "imagefolder", "path": str(folder), "num_workers": 0, "in_memory": False, "batch_size": 2,
                 "eval_batch_size": 64, "transforms": {"image_size": 16}},
        "model": {"arch": "mnist_cnn"},
        "scheduler": {"name": "step"},
        "train": {"epochs": epochs, "log_every": 1},
        "log": {"tensorboard": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Train:
    """``cnnvis train ARGS`` in its own process group, output kept in files (a full pipe would block it)."""

    count = 0
    started: list[Train] = []

    def __init__(self, tmp_path: Path, *args: object) -> None:
        Train.count += 1
        self.out_path = tmp_path / f"train{Train.count}.out"
        self.err_path = tmp_path / f"train{Train.count}.err"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cnnvis", "train", *map(str, args), "--device", "cpu"],
                stdout=out, stderr=err, cwd=tmp_path, env=env, start_new_session=True,
                # A test run started in the background (`pytest &`) ignores SIGINT, and children
                # inherit that: the training process must get Ctrl-C as a user's would.
                preexec_fn=_default_sigint,
            )
        Train.started.append(self)

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"cnnvis train did not end within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()

    def stderr(self) -> str:
        return " ".join(self.err_path.read_text().split())

    def wait_for(self, condition, what: str, timeout: float = START_TIMEOUT_S, poll: float = 0.01):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            if not self.running():
                pytest.fail(f"cnnvis train ended (exit {self.proc.returncode}) before {what}:\n{self.output()}")
            time.sleep(poll)
        self.signal(signal.SIGKILL)
        pytest.fail(f"timed out waiting for {what}:\n{self.output()}")


def run_dir_of(runs: Path) -> Path | None:
    found = [p for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
    assert len(found) <= 1, found
    return found[0] if found else None


def epochs_done(run: Path) -> int:
    """Epoch lines in metrics.jsonl (a line cut by a kill is not counted)."""
    done = 0
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "test_accuracy" not in row:
            done = max(done, row["epoch"])
    return done


def temp_files(run: Path) -> list[str]:
    return sorted(name for name in os.listdir(run / "checkpoints") if name.endswith(".tmp"))


def loadable(run: Path, name: str = "last.pt") -> dict:
    """The checkpoint as a stranger loads it: plain torch.load, weights only."""
    payload = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
    assert payload["format"] == "cnnvis-checkpoint/1"
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())
    return payload


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failing test must not leave its training process running."""
    yield
    while Train.started:
        train = Train.started.pop()
        if train.running():
            train.signal(signal.SIGKILL)
            train.proc.wait()


@pytest.fixture
def config(tmp_path: Path, tiny_imagefolder) -> Path:
    return write_config(tmp_path / "crash.yaml", tiny_imagefolder(classes=3, per_class=10), EPOCHS)


def test_ctrl_c_mid_epoch_keeps_last_pt_and_prints_how_to_resume(tmp_path, config):
    runs = tmp_path / "runs"
    train = Train(tmp_path, config, "--runs-dir", runs)
    run = train.wait_for(lambda: run_dir_of(runs), "the run directory")
    train.wait_for(lambda: epochs_done(run) >= 1, "the end of epoch 1")
    time.sleep(0.1)  # into epoch 2 (an epoch takes a few tenths of a second)
    train.signal(signal.SIGINT)
    assert train.wait(timeout=30) == 130, train.output()

    err = train.stderr()
    assert "Traceback" not in train.output(), train.output()
    found = re.search(r"interrupted in epoch (\d+); checkpoints/last\.pt holds epoch (\d+)\. "
                      r"resume with: cnnvis train --resume (\S+)", err)
    assert found, err
    stopped_in, held = int(found[1]), int(found[2])
    assert Path(found[3]) == run
    assert held >= 1 and stopped_in == held + 1, err
    assert loadable(run)["epoch"] == held == epochs_done(run)  # a logged epoch is a saved epoch
    assert not temp_files(run)


def assert_consistent_after_kill(run: Path, moments: list[str]) -> None:
    """What a kill may leave: whole checkpoints only, last.pt at the last or the one before the last
    logged epoch, and a best.pt at least as good as the best last.pt knows of."""
    done = epochs_done(run)
    last = loadable(run)  # never half of a checkpoint
    assert last["epoch"] in (done - 1, done), moments
    if last["best_val_accuracy"] >= 0:  # an epoch was validated: its best.pt must exist
        assert (run / "checkpoints" / "best.pt").is_file(), f"last.pt records a best epoch but best.pt is missing: {moments}"
        assert loadable(run, "best.pt")["best_val_accuracy"] >= last["best_val_accuracy"], moments


def kill_while_writing(tmp_path: Path, start: tuple, run: Path | None, runs: Path, names: tuple[str, ...],
                       moments: list[str], epochs: int = 1) -> Path:
    """Start ``cnnvis train START`` (or resume RUN) and SIGKILL it while it writes one of the
    checkpoints NAMES (seen by its temp file) at the end of epoch ``epochs`` or later. A kill that
    lands just after the rename is tried again in a resumed process (rare: a write takes milliseconds)."""
    prefixes = tuple(f".{name}." for name in names)
    for _ in range(3):
        before = set(temp_files(run)) if run else set()  # stale files of an earlier kill are no new write
        train = Train(tmp_path, *start) if run is None else Train(tmp_path, "--resume", run)
        run = run or train.wait_for(lambda: run_dir_of(runs), "the run directory")
        writing = train.wait_for(  # last.pt exists: not the first write, made before training starts
            lambda: (run / "checkpoints" / "last.pt").is_file() and epochs_done(run) >= epochs
            and {f for f in temp_files(run) if f.startswith(prefixes)} - before,
            f"a write of {' or '.join(names)}", poll=POLL_S)
        train.signal(signal.SIGKILL)
        assert train.wait(timeout=30) == -signal.SIGKILL
        mid_write = bool(set(temp_files(run)) & writing)  # still there: the rename had not happened
        moments.append(f"kill {len(moments) + 1}: {'during' if mid_write else 'just after'} the write of "
                       f"{sorted(writing)}, {epochs_done(run)} epoch(s) logged")
        assert_consistent_after_kill(run, moments)
        if mid_write:
            return run
    pytest.fail(f"no kill landed inside a checkpoint write: {moments}")


def test_sigkill_at_any_moment_then_resume_finishes_the_run(tmp_path, config):
    runs = tmp_path / "runs"
    moments: list[str] = []  # what each kill hit, for failure messages

    # 1. SIGKILL while last.pt of epoch 2 is written: last.pt keeps epoch 1; best.pt, written just
    #    before, may already hold epoch 2 (the resumed run redoes epoch 2 and writes it again).
    run = kill_while_writing(tmp_path, (config, "--runs-dir", runs), None, runs, ("last.pt",), moments, epochs=2)
    assert loadable(run)["epoch"] >= 1, moments
    stale = temp_files(run)

    # 2. SIGKILL at a random moment of a resumed run: while it trains, validates or saves.
    resumed_from = loadable(run)["epoch"]
    saved = os.stat(run / "checkpoints" / "last.pt").st_ino
    train = Train(tmp_path, "--resume", run)
    train.wait_for(lambda: os.stat(run / "checkpoints" / "last.pt").st_ino != saved, "a checkpoint after resuming")
    delay = random.uniform(0, 0.6)  # about two epochs
    time.sleep(delay)
    train.signal(signal.SIGKILL)
    assert train.wait(timeout=30) == -signal.SIGKILL
    moments.append(f"kill {len(moments) + 1}: {delay:.3f} s after last.pt of epoch {resumed_from + 1} was written")
    assert_consistent_after_kill(run, moments)
    assert loadable(run)["epoch"] > resumed_from, moments

    # 3. The last resume runs to the end: every epoch once, the checkpoints agree with the metrics.
    train = Train(tmp_path, "--resume", run)
    assert train.wait() == 0, f"{moments}\n{train.output()}"
    assert "Traceback" not in train.output()
    assert "test accuracy" in " ".join(train.output().split())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs, final = rows[:-1], rows[-1]
    assert [row["epoch"] for row in epochs] == list(range(1, EPOCHS + 1)), moments
    assert "test_accuracy" in final and final["epoch"] == EPOCHS
    last, best = loadable(run), loadable(run, "best.pt")
    assert last["epoch"] == EPOCHS and last["global_step"] == epochs[-1]["step"] == EPOCHS * epochs[0]["step"]
    top = max(row["val_accuracy"] for row in epochs)
    assert best["epoch"] == next(row["epoch"] for row in epochs if row["val_accuracy"] == top), moments
    assert best["best_val_accuracy"] == last["best_val_accuracy"] == final["best_val_accuracy"] == top
    print("\n".join(moments))  # shown with pytest -rP
    assert not temp_files(run), f"temp files left behind: {temp_files(run)} (stale after the kills: {stale})"


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal (a test run started in
    the background, `pytest &`, starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_between_an_epoch_and_its_checkpoint_waits_for_the_checkpoint(tmp_path, config, monkeypatch,
                                                                             ctrl_c_raises):
    """A real SIGINT in the milliseconds after an epoch is logged and before its checkpoint is
    written (too short a window to hit from outside): the finished epoch is saved, not lost."""
    from typer.testing import CliRunner

    from cnnvis.cli import app
    from cnnvis.training import trainer as train_module

    real_append = train_module.append_jsonl

    def append_then_ctrl_c(path, row):
        real_append(path, row)
        if row.get("epoch") == 1 and "test_accuracy" not in row:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_module, "append_jsonl", append_then_ctrl_c)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", str(config), "--runs-dir", str(runs), "--device", "cpu", "--set", "train.epochs=2"])
    out = " ".join(result.output.split())
    assert result.exit_code == 130 and "Traceback" not in out, out
    run = run_dir_of(runs)
    assert f"interrupted in epoch 2; checkpoints/last.pt holds epoch 1. resume with: cnnvis train --resume {run}" in out
    assert loadable(run)["epoch"] == 1 and loadable(run, "best.pt")["epoch"] == 1
    assert epochs_done(run) == 1


def test_best_pt_is_written_before_last_pt(tmp_path, config, monkeypatch):
    """A SIGKILL between the two writes of an epoch then leaves best.pt ahead of last.pt (the
    resumed epoch writes it again), never last.pt recording a best epoch that best.pt lacks."""
    from cnnvis.config import load_config
    from cnnvis.training import trainer as train_module

    written = []
    real_save = train_module.save_checkpoint

    def recording_save(payload, path):
        written.append(Path(path).name)
        real_save(payload, path)

    trainer = train_module.Trainer(load_config(config), runs_dir=tmp_path / "runs", device="cpu")
    monkeypatch.setattr(train_module, "save_checkpoint", recording_save)
    trainer.save(["last", "best"])
    assert written == ["best.pt", "last.pt"]
