"""Fine-tuning library backbones (``model.arch: torchvision:NAME``) with a frozen backbone, and the
fast path that trains the head on backbone features computed once (``training/features.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import cli, make_images, only_run, weights_only, write_config
from PIL import Image
from torchvision import models as tv_models

from cnnvis.config import build_config, load_config
from cnnvis.training.features import FastPath, fast_path_blocker
from cnnvis.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("ft") / "folder", per_class=8, size=32)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random ResNet-18 weights in a local file, standing in for downloaded ones."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    model = tv_models.resnet18()
    for module in model.modules():  # BatchNorm statistics that an eval-mode backbone must keep
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, folder: Path, resnet_file: Path) -> tuple[Path, str, Path]:
    """``(run, train output, weights file)``: torchvision's ResNet-18 from a weights file, backbone frozen."""
    base = tmp_path_factory.mktemp("finetuned")
    weights = Path(shutil.copy(resnet_file, base / "weights.pt"))
    config = write_config(base / "ft.yaml", folder, data={"transforms": {"image_size": 32}},
                          model={"arch": "torchvision:resnet18", "pretrained": str(weights), "freeze": "backbone"})
    out = cli("train", config, "--runs-dir", base / "runs", code=0)
    return only_run(base / "runs"), out, weights


def test_frozen_library_backbone_trains_only_its_head(finetuned):
    run, out, weights = finetuned
    assert "torchvision:resnet18" in out and "head fc, 1,539 of 11,178,051 parameters train" in out
    assert "backbone frozen, in eval mode" in out and "fast on: frozen backbone" in out
    saved, start = weights_only(run / "checkpoints" / "best.pt"), torch.load(weights, weights_only=True)
    backbone = [k for k in saved["model"] if not k.startswith("fc.")]
    assert backbone and all(torch.equal(saved["model"][k], start[k]) for k in backbone)  # BatchNorm statistics too
    assert saved["model"]["fc.weight"].shape == (3, 512)
    assert saved["meta"]["arch"] == "torchvision:resnet18" and saved["meta"]["weights"] == str(weights)
    assert sorted(p.name.split("-")[0] for p in (run / "features").iterdir()) == ["train", "val"]


def test_later_commands_rebuild_the_run_offline(finetuned, tmp_path, no_network):
    """Every later command builds the architecture with random weights and loads the checkpoint:
    neither the weights file (gone here) nor named weights (never downloaded again) are needed."""
    run = Path(shutil.copytree(finetuned[0], tmp_path / "run"))
    for name in ("best", "last"):  # as if the run had started from torchvision's named weights
        path = run / "checkpoints" / f"{name}.pt"
        payload = weights_only(path)
        payload["config"]["model"]["pretrained"] = "DEFAULT"
        torch.save(payload, path)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored["model"]["pretrained"] = "DEFAULT"
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    cli("visualize", run, "-m", "gradcam", "--images", 2, code=0)
    assert list((run / "visualizations").rglob("*.png"))
    assert "1,539 trainable" in cli("summary", run, code=0)


def test_weights_normalisation_comes_from_the_library_tables():
    raw = {"data": {"dataset": "imagefolder", "path": "x"}, "model": {"arch": "timm:vit_tiny_patch16_224"}}
    from cnnvis.data import photo_statistics

    assert photo_statistics(build_config(raw))[:2] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # random weights
    raw["model"]["pretrained"] = "pretrained"
    mean, std, source = photo_statistics(build_config(raw))
    assert mean == std == (0.5, 0.5, 0.5) and "timm" in source


def test_a_model_without_a_linear_head_is_one_clear_line(tmp_path, folder):
    config = write_config(tmp_path / "ft.yaml", folder, model={"arch": "torchvision:squeezenet1_0"})
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=2)
    assert "cannot find the classification head of SqueezeNet" in out


# ---------------------------------------------------------------------------- the fast path


def _trainer(tmp_path: Path, folder: Path, data: dict | None = None, **train) -> Trainer:
    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", folder, epochs=2, data={"transforms": {"image_size": 32}, **(data or {})},
                                      model={"arch": "mnist_cnn", "freeze": "backbone", "dropout": 0.3},
                                      optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "step"}, train=train).read_text())
    return Trainer(build_config(raw), runs_dir=tmp_path / "runs", device="cpu")


def test_fast_path_trains_the_same_head_as_the_whole_network(tmp_path, folder):
    results, trainers = [], []
    for cache in (True, False):  # one after the other: each seeds the global generator dropout draws from
        trainers.append(_trainer(tmp_path, folder, cache_features=cache))
        start = {k: v.clone() for k, v in trainers[-1].state.model.state_dict().items()}
        results.append(trainers[-1].fit())
    fast, slow = trainers
    assert fast.fast is not None and slow.fast is None
    a, b = fast.state.model.state_dict(), slow.state.model.state_dict()
    assert not torch.allclose(a["fc.weight"], start["fc.weight"])  # the head did learn
    for key in a:  # same head to float tolerance (same batches, same dropout draws); same frozen rest
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
        if not key.startswith("fc."):
            assert torch.equal(b[key], start[key]), key  # BatchNorm statistics kept by the slow path too
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]


def test_feature_cache_is_reused_and_invalidated_by_data_or_weights(tmp_path, folder):
    data = shutil.copytree(folder, tmp_path / "data")
    first = _trainer(tmp_path, data)
    first.fit()
    files = sorted(p.name for p in (first.run_dir / "features").iterdir())
    assert first.fast.computed == ["train", "val"]
    again = _trainer(tmp_path, data)  # a new run in the same folder: the same data and weights
    again.fit()
    assert again.fast.computed == [] and set(again.fast.loaded) == {"train", "val"}
    with torch.no_grad():  # other backbone weights: other features
        next(again.state.model.features.parameters()).add_(0.5)
    assert FastPath(again.config, again.state.model, again.data, again.device, None, again.run_dir).cached("train") is None
    pixels = Image.open(next((data / "class_0").iterdir()))  # one changed image (in whichever split)
    for path in sorted((data / "class_1").iterdir()):
        pixels.save(path)
    changed = _trainer(tmp_path, data)
    changed.fit()
    assert changed.fast.computed, "changed images must not reuse the old features"
    assert sorted(p.name for p in (changed.run_dir / "features").iterdir()) != files


def test_resumed_fast_run_reads_its_features(tmp_path, folder):
    run = _trainer(tmp_path, folder)
    run.fit()
    resumed = Trainer(None, resume=run.run_dir, overrides=["train.epochs=3"], device="cpu")
    resumed.fit()
    assert resumed.fast.computed == [] and resumed.state.epoch == 3


@pytest.mark.parametrize("changes, reason", [
    ({"data": {"transforms": {"flip": True}}}, "data.transforms.flip"),
    ({"train": {"mixup": 0.2}}, "train.mixup"),
    ({"train": {"tta_flip": True}}, "tta_flip"),
    ({"train": {"ema": 0.99}}, "train.ema"),
    ({"model": {"freeze": "none"}}, "model.freeze"),
])
def test_fast_path_off_says_why(changes, reason):
    raw = {"data": {"dataset": "imagefolder", "path": "x"}, "model": {"arch": "mnist_cnn", "freeze": "backbone"}}
    assert fast_path_blocker(build_config(raw)) is None
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    assert reason in fast_path_blocker(build_config(raw))


def test_every_reason_the_fast_path_is_off_is_given_at_once():
    raw = {"data": {"dataset": "imagefolder", "path": "x", "transforms": {"flip": True}},
           "model": {"arch": "mnist_cnn", "freeze": "backbone"},
           "train": {"tta_flip": True, "ema": 0.99, "cache_features": False}}
    reason = fast_path_blocker(build_config(raw), world_size=2)
    for part in ("train.cache_features", "data.transforms.flip", "train.tta_flip", "train.ema", "several training processes"):
        assert part in reason


def test_header_says_when_augmentation_keeps_the_fast_path_off(tmp_path, folder):
    config = write_config(tmp_path / "c.yaml", folder, data={"transforms": {"image_size": 32, "random_crop": True}},
                          model={"arch": "mnist_cnn", "freeze": "backbone"})
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=0)
    assert "fast off: random augmentation (data.transforms.random_crop) the whole network runs every step" in out
    assert not (only_run(tmp_path / "runs") / "features").exists()


def test_shipped_finetune_config_is_valid():
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "flowers5_finetune.yaml")
    assert config.model.arch.startswith("torchvision:") and config.model.freeze == "backbone"
    assert fast_path_blocker(config) is None


def test_fast_path_on_files_read_per_batch_keys_on_the_files(tmp_path, folder):
    import os

    from cnnvis.training.features import data_key

    data = shutil.copytree(folder, tmp_path / "data")
    trainer = _trainer(tmp_path, data, data={"in_memory": False}, epochs=1)
    assert trainer.fast is not None and not hasattr(trainer.data.train, "images")  # a DataLoader
    trainer.fit()
    assert trainer.fast.computed == ["train", "val"] and trainer.state.epoch == 1
    before = data_key(trainer.data.train)
    path = trainer.data.train.dataset.samples[0][0]
    os.utime(path, ns=(0, 0))  # an edited file: its modification time moves
    assert data_key(trainer.data.train) != before


def test_library_prefix_is_checked_in_the_config():
    from cnnvis.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model library 'keras'; write torchvision:NAME or timm:NAME"):
        build_config({"model": {"arch": "keras:resnet50"}})
    with pytest.raises(ConfigError, match="names no model"):
        build_config({"model": {"arch": "timm:"}})
    assert build_config({"model": {"arch": "torchvision:no_such_net"}}).model.arch == "torchvision:no_such_net"
