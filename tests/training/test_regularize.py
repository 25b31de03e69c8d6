"""MixUp / CutMix batches, the weight average, weight decay groups and the flip test, in training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnvis.checkpoint import load_checkpoint
from cnnvis.config import build_config
from cnnvis.run import load_run
from cnnvis.training.loop import evaluate, predict
from cnnvis.training.optim import make_optimizer
from cnnvis.training.regularize import BatchMixer, hard_labels, weight_average
from cnnvis.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def folder_config(folder, **train):
    return build_config({
        "name": "reg",
        "data": {"dataset": "imagefolder", "path": str(folder), "num_workers": 0, "batch_size": 4, "eval_batch_size": 16,
                 "transforms": {"image_size": 16, "random_crop": True, "flip": True}},
        "model": {"arch": "resnet_small"},
        "train": {"epochs": 2, **train},
        "log": {"tensorboard": False},
    })


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_batches_have_probability_targets_that_follow_the_images(mixup, cutmix):
    torch.manual_seed(0)
    images = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(3)])  # image i is all i, class i
    labels = torch.arange(3)
    mixer = BatchMixer(mixup, cutmix, 3)
    for _ in range(5):
        mixed, targets = mixer(images, labels)
        assert mixed.shape == images.shape and targets.shape == (3, 3)
        torch.testing.assert_close(targets.sum(1), torch.ones(3))
        # a blend (MixUp) or a patchwork (CutMix) of two images, in exactly the shares the targets give
        torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), targets @ torch.arange(3.0), atol=1e-5, rtol=0)
    assert torch.equal(hard_labels(targets), targets.argmax(1)) and torch.equal(hard_labels(labels), labels)


def test_the_weight_average_is_what_is_evaluated_saved_and_explained(tiny_imagefolder, tmp_path):
    folder = tiny_imagefolder(classes=3, per_class=8, size=20)
    trainer = Trainer(folder_config(folder, ema=0.5, mixup=0.2, cutmix=1.0), runs_dir=tmp_path, device="cpu")
    trainer.fit()
    averaged, trained = trainer.average.module.state_dict(), trainer.state.model.state_dict()
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)  # an average, not a copy
    last = load_checkpoint(trainer.run_dir / "checkpoints" / "last.pt")
    assert all(torch.equal(last["model"][k], averaged[k].cpu()) for k in averaged)
    assert all(torch.equal(last["trained_model"][k], trained[k].cpu()) for k in trained)
    run = load_run(trainer.run_dir, prefer="last")  # every later command explains the average
    assert all(torch.equal(run.model.state_dict()[k], last["model"][k]) for k in averaged)
    assert trainer.state.history[-1]["val_accuracy"] == pytest.approx(
        evaluate(trainer.average.module, trainer.data.val, torch.device("cpu"))["accuracy"])


def test_weight_decay_can_spare_normalisation_weights_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    config = build_config({"optimizer": {"name": "sgd", "weight_decay": 0.1, "decay_norm_and_bias": False}})
    groups = make_optimizer(config, model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sorted(p.ndim for p in groups[0]["params"]) == [2, 4]  # the conv and linear weights
    assert all(p.ndim == 1 for p in groups[1]["params"]) and len(groups[1]["params"]) == 4
    assert len(make_optimizer(build_config({"optimizer": {"weight_decay": 0.1}}), model).param_groups) == 1


def test_flip_test_averages_the_logits_of_each_image_and_its_mirror():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3, 2)).eval()
    x = torch.randn(4, 1, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(predict(model, x, tta_flip=True), (model(x) + model(x.flip(-1))) / 2)
        torch.testing.assert_close(predict(model, x), model(x))


def test_averaging_off_is_none_and_on_keeps_the_memory_format_note():
    model = nn.Linear(2, 2)
    model._cnnvis_memory_format = torch.channels_last
    assert weight_average(model, 0.0) is None
    assert weight_average(model, 0.99).module._cnnvis_memory_format == torch.channels_last
