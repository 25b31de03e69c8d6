"""Training on several processes (issue 14): torchrun's launcher starts real processes that talk
over gloo on this CPU, exactly as ``cnnvis train --nproc-per-node N`` does for a user.

What a user relies on: ``data.batch_size`` is the global batch, so 2 processes end with the weights
1 process would have; one run directory, written by rank 0 alone; checkpoints that any later
command (or a resume with another number of processes) loads; a process that dies stops the others
promptly and leaves a run that ``--resume`` finishes. Each launch costs a few seconds of process
start-up, so the tests share launches where one answers several questions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cnnvis.config import build_config
from cnnvis.data.tensors import DeviceBatches
from cnnvis.errors import ConfigError
from cnnvis.training import distributed
from cnnvis.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not hasattr(signal, "SIGKILL"),
                                reason="needs torch.distributed and POSIX signals")

#: weights of 2 processes vs 1 after the same steps: equal up to the order of float sums
#: (DDP averages two half-batch gradients where one process sums one batch); measured ~1e-6
WEIGHT_TOLERANCE = 1e-4
LAUNCH_TIMEOUT_S = 120  # two processes importing torch on a busy 2-core machine


def raw_config(root: Path, epochs: int, **train) -> dict:
    """Tiny MNIST: 301 digits, a global batch of 64 (the last one, 45, splits 23/22 over 2
    processes), a BatchNorm-free net, no augmentation or dropout: every random draw that
    remains (the shuffle) is shared, so 1 and 2 processes see the same batches."""
    return {
        "name": "ddp",
        "data": {"root": str(root), "download": False, "subset": 301, "val_size": 200, "batch_size": 64,
                 "eval_batch_size": 2000},
        "model": {"arch": "mnist_classic"},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "scheduler": {"name": "step"},
        "train": {"epochs": epochs, "collective_timeout_s": 30, **train},
        "log": {"tensorboard": False},
    }


def launch(tmp_path: Path, nproc: int, *args: object) -> subprocess.Popen:
    """``cnnvis train ARGS --nproc-per-node NPROC`` in its own process group, output to files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    out = open(tmp_path / f"launch{time.monotonic_ns()}.out", "w+")  # noqa: SIM115 - read back by output()
    proc = subprocess.Popen([sys.executable, "-m", "cnnvis", "train", *map(str, args), "--device", "cpu",
                             "--nproc-per-node", str(nproc)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env=env, start_new_session=True)
    proc.log = out
    STARTED.append(proc)
    return proc


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the launch did not end within {timeout} s:\n{output(proc)}")


def only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, f"one run directory expected: {found}"
    return found[0]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    """``last.pt`` as a stranger loads it: plain torch.load, weights only."""
    payload = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in payload["model"]), "the DDP wrapper leaked into the checkpoint"
    return payload["model"]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < WEIGHT_TOLERANCE, f"weights differ by {worst:.2e}"


def write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------ through the CLI


def test_two_processes_train_what_one_does(mnist_root, tmp_path, one_thread):
    """An epoch on 2 processes x global batch 64 ends with the weights of the same epoch on 1
    process x 64 (within WEIGHT_TOLERANCE), continuing a 1-process run (``--resume`` with another
    number of processes); rank 0 alone writes and speaks. (2 -> 1: the killed-rank test.)"""
    first = Trainer(build_config(raw_config(mnist_root, epochs=1)), runs_dir=tmp_path / "one", device="cpu")
    first.fit()
    two = Path(shutil.copytree(first.run_dir, tmp_path / "two" / first.run_dir.name))
    Trainer(None, resume=first.run_dir, overrides=["train.epochs=2"], device="cpu").fit()  # epoch 2 on 1 process

    launched = launch(tmp_path, 2, "--resume", two, "--set", "train.epochs=2")  # epoch 2 on 2 processes
    assert finish(launched) == 0, output(launched)
    text = " ".join(output(launched).split())
    assert "processes 2, global batch 64 (32 per process)" in text
    assert text.count("training summary") == 1 and "Traceback" not in text, "only rank 0 speaks"
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert_close(weights(two), weights(first.run_dir))  # the same steps, split over two processes
    assert torch.load(two / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["epoch"] >= 1
    lines = rows(two)
    assert [r["epoch"] for r in lines if "val_accuracy" in r] == [1, 2] and sum("test_accuracy" in r for r in lines) == 1
    expected = rows(first.run_dir)[-1]
    assert lines[-1]["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=0.002)  # 20 of 10000 test digits
    assert lines[-1]["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-3)


# ------------------------------------------------------------------ faults


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [item for item in env if item.startswith(b"RANK=")]
    return int(found[0][5:]) if found else None


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = LAUNCH_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"the launch ended (exit {proc.returncode}) before {what}:\n{output(proc)}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{output(proc)}")


def epochs_done(runs: Path) -> int:
    found = list(runs.glob("*/metrics.jsonl"))
    return len(found[0].read_text().splitlines()) if found else 0


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_a_killed_rank_stops_the_run_promptly_and_resume_finishes_it(mnist_root, tmp_path, one_thread):
    timeout_s = 30
    config = write(tmp_path, "long.yaml", raw_config(mnist_root, epochs=40, collective_timeout_s=timeout_s))
    runs = tmp_path / "runs"
    proc = launch(tmp_path, 2, config, "--runs-dir", runs)
    wait_for(proc, lambda: epochs_done(runs) >= 1, "the end of epoch 1")
    rank1 = wait_for(proc, lambda: [p for p in children(proc.pid) if rank_of(p) == 1], "rank 1's process")[0]
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    code = finish(proc, timeout=timeout_s + 15)
    took = time.monotonic() - killed
    text = output(proc)
    assert code != 0 and took < timeout_s, f"exit {code} after {took:.1f} s:\n{text}"
    run = only_run(runs)
    assert f"error: training process rank 1 was killed by SIGKILL; torchrun stopped the others. checkpoints/last.pt " \
           f"holds the last completed epoch: continue with cnnvis train --resume {run}" in " ".join(text.split()), text
    assert "Traceback" not in text, text

    assert not list((run / "checkpoints").glob("*.tmp")), "a half-written checkpoint was left behind"
    saved = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] >= 1 and len(saved["rng_per_rank"]) == 2

    resumed = Trainer(None, resume=run, overrides=[f"train.epochs={saved['epoch'] + 1}"], device="cpu")
    resumed.fit()
    epochs = [r["epoch"] for r in rows(run) if "val_accuracy" in r]
    assert epochs == list(range(1, saved["epoch"] + 2)) and "test_accuracy" in rows(run)[-1]


# ------------------------------------------------------------------ the pieces, in one process


@pytest.mark.parametrize("world_size", [2, 3])
def test_device_batches_share_out_every_image_once(world_size):
    images, labels = torch.zeros(11, 1, 4, 4, dtype=torch.uint8), torch.arange(11)

    def shards(shuffle: bool) -> list[list[list[int]]]:
        return [[batch[1].tolist() for batch in DeviceBatches(images, labels, 6 if shuffle else 4, [0.0], [1.0], "cpu",
                                                                 shuffle=shuffle, seed=3, rank=rank, world_size=world_size)]
                for rank in range(world_size)]

    single = [y.tolist() for _, y in DeviceBatches(images, labels, 6, [0.0], [1.0], "cpu", shuffle=True, seed=3)]
    per_rank = shards(shuffle=True)
    for step, batch in enumerate(single):  # each global batch, split over the ranks in order
        assert [label for ranks in per_rank for label in ranks[step]] == batch
    evaluated = sorted(label for ranks in shards(shuffle=False) for batch in ranks for label in batch)
    assert evaluated == list(range(11)), "evaluation must see every image exactly once"


def test_dataloader_evaluation_shares_out_every_image_once(tiny_imagefolder):
    from cnnvis.data import build_data

    raw = {"data": {"dataset": "imagefolder", "path": str(tiny_imagefolder(classes=2, per_class=9)), "num_workers": 0,
                    "in_memory": False, "batch_size": 4, "eval_batch_size": 3, "transforms": {"image_size": 16}}}
    config = build_config(raw)
    bundles = [build_data(config, "cpu", rank, 2) for rank in range(2)]
    for split in ("val", "test"):
        seen = sorted(i for b in bundles for i in getattr(b, split).sampler)
        assert seen == list(range(bundles[0].sizes[split]))
    assert all(len(batch[1]) <= 2 for batch in bundles[0].train), "each rank loads half of the global batch of 4"


def test_a_batch_that_does_not_split_evenly_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"data.batch_size = 66 does not split evenly over 4 processes.*batch_size=64"):
        distributed.check_batch_split(66, distributed.World(0, 4, 0))


def test_sync_batchnorm_on_the_cpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="train.sync_batchnorm needs CUDA"):
        distributed.wrap(torch.nn.BatchNorm1d(2), distributed.World(0, 2, 0), torch.device("cpu"), sync_batchnorm=True)


def test_the_world_comes_from_torchrun_s_environment():
    assert distributed.detect_world({}) == distributed.World(0, 1, 0)
    world = distributed.detect_world({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.is_main, world.distributed) == (5, 8, 1, False, True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_two_gpus_with_nccl_and_sync_batchnorm(mnist_root, tmp_path):
    raw = raw_config(mnist_root, epochs=1, sync_batchnorm=True)
    raw["model"]["arch"] = "mnist_cnn"
    config = write(tmp_path, "gpu.yaml", raw)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "cnnvis", "train", str(config), "--runs-dir", str(tmp_path / "runs"),
                             "--device", "cuda", "--nproc-per-node", "2"], capture_output=True, text=True, env=env, check=False,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_accuracy" in rows(only_run(tmp_path / "runs"))[-1]
