"""The real ``tensorboard`` server serves a cnnvis run: scalars, histograms, images, graph, hparams.

Starts the installed TensorBoard on a free loopback port (never on other interfaces), waits until
it answers, reads its HTTP data API, and always stops it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tb_helpers import gray_bundle

from cnnvis.config import build_config
from cnnvis.training.tensorboard import TensorBoardListener
from cnnvis.training.trainer import Trainer

pytest.importorskip("tensorboard")
HOST = "127.0.0.1"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(base: str, path: str, **params: str) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def get_json(base: str, path: str, **params: str):
    return json.loads(get(base, path, **params))


def wait_until_served(base: str, process: subprocess.Popen, run: str, log: Path) -> None:
    """Until TensorBoard answers and has loaded the run's scalars, images and histograms."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"tensorboard exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            loaded = [get_json(base, f"/data/plugin/{p}/tags").get(run, {}) for p in ("scalars", "images", "histograms")]
            if all(loaded) and "accuracy/test" in loaded[0]:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.3)
    pytest.fail(f"tensorboard did not serve the run within {START_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")


def test_tensorboard_serves_the_run(tmp_path):
    config = build_config({"name": "served", "scheduler": {"name": "step"}, "train": {"epochs": 1, "log_every": 2}, "log": {"explain_images": 4}})
    trainer = Trainer(config, runs_dir=tmp_path / "runs", device="cpu", data=gray_bundle())
    trainer.listeners.append(TensorBoardListener(trainer.run_dir, config))
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = trainer.run_dir.name
    step = trainer.state.global_step

    port = free_port()
    base = f"http://{HOST}:{port}"
    log = tmp_path / "tensorboard.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs"),
             "--host", HOST, "--port", str(port), "--reload_interval", "1"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_until_served(base, process, run, log)
        assert run in get_json(base, "/data/runs")

        scalars = get_json(base, "/data/plugin/scalars/tags")[run]
        assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "loss/train_step", "accuracy/test"} <= set(scalars)
        points = get_json(base, "/data/plugin/scalars/scalars", run=run, tag="accuracy/val")
        assert [p[1] for p in points] == [step] and 0.0 <= points[0][2] <= 1.0

        histograms = get_json(base, "/data/plugin/histograms/tags")[run]
        assert {"weights/features.0.weight", "gradients/fc.weight"} <= set(histograms)
        (hist,) = get_json(base, "/data/plugin/histograms/histograms", run=run, tag="weights/fc.weight")
        assert hist[1] == step and sum(bucket[2] for bucket in hist[2]) == trainer.state.model.fc.weight.numel()

        images = get_json(base, "/data/plugin/images/tags")[run]
        assert {"inputs/train", "filters/features.0", "explain/gradcam", "confusion_matrix/test"} <= set(images)
        (entry,) = get_json(base, "/data/plugin/images/images", run=run, tag="inputs/train")
        picture = get(base, "/data/plugin/images/individualImage?" + entry["query"])
        assert picture[:8] == b"\x89PNG\r\n\x1a\n"

        graphs = get_json(base, "/data/plugin/graphs/info")[run]
        assert graphs["run_graph"] is True
        graph = get(base, "/data/plugin/graphs/graph", run=run).decode()
        assert "node" in graph and "features" in graph

        request = urllib.request.Request(
            f"{base}/data/plugin/hparams/experiment", data=json.dumps({"experimentName": ""}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            experiment = json.loads(response.read())
        hparam_names = {h["name"] for h in experiment.get("hparamInfos", [])}
        assert {"optimizer.lr", "model.arch", "train.epochs"} <= hparam_names
        assert "accuracy/test" in {m["name"]["tag"] for m in experiment.get("metricInfos", [])}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
