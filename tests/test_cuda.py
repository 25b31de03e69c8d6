"""The CUDA paths: mixed precision, channels_last, device-resident MNIST batches, maps on the GPU.

Skipped on machines without CUDA; these are the paths a CPU run never exercises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnvis.config import build_config
from cnnvis.run import load_run
from cnnvis.training.trainer import Trainer
from cnnvis.vis import METHODS, run_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(24):
            pixels = rng.integers(0, 50, (24, 24, 3), dtype=np.uint8)
            pixels[:, 2 + label * 7 : 6 + label * 7, :] = 220
            Image.fromarray(pixels).save(root / f"c{label}" / f"{i:02d}.png")
    return root


def _config(folder: Path, amp: str) -> object:
    return build_config({
        "data": {"dataset": "imagefolder", "path": str(folder), "num_workers": 0, "batch_size": 8,
                 "transforms": {"image_size": 24}},
        "model": {"arch": "resnet18"},
        "optimizer": {"name": "adam", "lr": 0.003},
        "scheduler": {"name": "none"},
        "train": {"epochs": 3, "amp": amp, "channels_last": True},
        "log": {"tensorboard": False},
    })


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_learns_and_steps_once_per_batch(tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    trainer = Trainer(_config(_folder(tmp_path / "bars"), amp), runs_dir=tmp_path / "runs", device="cuda")
    assert trainer.amp == (torch.bfloat16 if amp == "bf16" else torch.float16)
    final = trainer.fit()
    trainer.close()
    history = trainer.state.history
    assert all(np.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert final["test_accuracy"] > 0.6
    # one optimizer step per batch: Adam's step counter equals the number of batches seen
    steps = {int(state["step"]) for state in trainer.state.optimizer.state.values()}
    assert steps == {trainer.state.global_step}
    payload = torch.load(trainer.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    if amp == "fp16":
        assert payload["scaler"], "the fp16 grad scaler state must be saved for resume"
    run = load_run(trainer.run_dir, device="cpu")  # saved on CUDA, loaded on a CPU
    assert next(run.model.parameters()).device.type == "cpu"


def test_mnist_batches_live_on_the_gpu(mnist_root):
    config = build_config({"data": {"root": str(mnist_root), "download": False, "subset": 512}})
    from cnnvis.data import build_data

    bundle = build_data(config, "cuda")
    images, labels = next(iter(bundle.train))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.float32


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.kind == "heatmap"])
def test_maps_on_the_gpu_equal_maps_on_the_cpu(name):
    torch.manual_seed(0)
    from cnnvis.models import build_model

    model = build_model("resnet18", 5, 3).eval()
    images = torch.randn(4, 3, 64, 48)
    cpu = run_method(name, model, images, "pred")
    gpu = run_method(name, model.cuda(), images.cuda(), "pred")
    assert gpu.is_cuda
    scale = float(cpu.abs().max()) or 1.0
    torch.testing.assert_close(gpu.cpu() / scale, cpu / scale, atol=2e-3, rtol=0)
