"""Frozen backbone: cnnvis's fast path (backbone features computed once, the head trained on them)
against the classic recipe of PyTorch's transfer-learning tutorial ("ConvNet as fixed feature
extractor": the whole network runs forward every epoch, ``requires_grad=False`` on the backbone,
SGD on ``fc``).

    OMP_NUM_THREADS=1 python benchmarks/frozen_backbone.py                 # flowers5, 128 px
    python benchmarks/frozen_backbone.py --threads 2 --epochs 5 --repeats 3 --slow

Both sides, on the same data and model:

* ResNet-18 with random weights saved to a local file (no downloads; the speed does not depend on
  the values), its ``fc`` replaced for the 5 classes of ``/work/shared/data/flowers5``;
* the photos decoded once into memory at ``--size`` px (outside the timing, shared by both sides),
  no augmentation (centre crops), ``--train`` training images, val and test ``--holdout`` of each class;
* SGD lr 0.001 momentum 0.9, StepLR(7, 0.1), ``--epochs`` epochs, batch ``--batch`` for training
  and evaluation, contiguous memory format, ``--threads`` threads, ``OMP_WAIT_POLICY=PASSIVE``;
* timed: the whole training (model build and weights load, every epoch's training and validation,
  keeping the best weights) and one test pass. cnnvis: ``Trainer(...).fit()`` into a fresh runs
  folder, so the features are computed (not read from a cache), checkpoints written as usual.
  Tutorial: its loop (``model.train()`` for the training phase, ``eval()`` + ``no_grad`` for
  validation, a deep copy of the best weights), then the test pass with the best weights.

``--slow`` also times cnnvis with ``train.cache_features: false`` (the whole network every step,
as the tutorial). The minimum over ``--repeats`` runs counts; sides alternate within a repeat.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads do not spin

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import models  # noqa: E402

from cnnvis.config import build_config  # noqa: E402
from cnnvis.data import build_data  # noqa: E402
from cnnvis.training.trainer import Trainer  # noqa: E402


def config(args: argparse.Namespace, weights: Path, cache: bool) -> dict:
    return {
        "name": "bench", "seed": 0,
        "data": {"dataset": "imagefolder", "root": str(args.data.parent), "path": args.data.name, "in_memory": True,
                 "val_fraction": args.holdout, "test_fraction": args.holdout, "subset": args.train,
                 "batch_size": args.batch, "eval_batch_size": args.batch,
                 "transforms": {"image_size": args.size}},
        "model": {"arch": "torchvision:resnet18", "pretrained": str(weights), "freeze": "backbone"},
        "optimizer": {"name": "sgd", "lr": 0.001, "momentum": 0.9},
        "scheduler": {"name": "step", "step_size": 7, "gamma": 0.1},
        "train": {"epochs": args.epochs, "channels_last": False, "cache_features": cache},
        "log": {"tensorboard": False},
    }


def run_cnnvis(args: argparse.Namespace, weights: Path, data, cache: bool) -> tuple[float, float]:
    cfg = build_config(config(args, weights, cache))
    with tempfile.TemporaryDirectory() as runs:
        start = time.perf_counter()
        trainer = Trainer(cfg, runs_dir=runs, device="cpu", data=data)
        final = trainer.fit()
        seconds = time.perf_counter() - start
        trainer.close()
    return seconds, final["test_accuracy"]


def run_tutorial(args: argparse.Namespace, weights: Path, data) -> tuple[float, float]:
    """The tutorial's fixed-feature-extractor recipe, on the same in-memory batches."""
    torch.manual_seed(0)
    start = time.perf_counter()
    model = models.resnet18()
    model.load_state_dict(torch.load(weights, weights_only=True))
    for param in model.parameters():
        param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, data.num_classes)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best, best_acc = copy.deepcopy(model.state_dict()), 0.0
    for _ in range(args.epochs):
        for phase, batches in (("train", data.train), ("val", data.val)):
            model.train() if phase == "train" else model.eval()
            correct = total = 0
            for inputs, labels in batches:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += int((outputs.argmax(1) == labels).sum())
                total += len(labels)
            if phase == "train":
                scheduler.step()
            elif correct / total > best_acc:
                best_acc, best = correct / total, copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in data.test:
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    return time.perf_counter() - start, correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/flowers5"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train", type=int, default=500, help="training images (a seeded pick of the split)")
    parser.add_argument("--holdout", type=float, default=0.03, help="share of each class for val, and for test")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slow", action="store_true", help="also time cnnvis without the fast path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "resnet18_random.pt"
        torch.manual_seed(0)
        torch.save(models.resnet18().state_dict(), weights)
        data = build_data(build_config(config(args, weights, True)), "cpu")
        print(f"flowers5 at {args.size} px: {data.sizes['train']} train / {data.sizes['val']} val / "
              f"{data.sizes['test']} test images, batch {args.batch}, {args.epochs} epochs, "
              f"{torch.get_num_threads()} thread(s), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)
        sides = {"tutorial (whole network every epoch)": lambda: run_tutorial(args, weights, data),
                 "cnnvis fast path (features once)": lambda: run_cnnvis(args, weights, data, True)}
        if args.slow:
            sides["cnnvis, train.cache_features: false"] = lambda: run_cnnvis(args, weights, data, False)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, side in (sides.items() if repeat % 2 == 0 else reversed(list(sides.items()))):
                seconds, accuracy = side()
                times[name].append(seconds)
                print(f"  repeat {repeat + 1}: {name}: {seconds:.1f} s (test accuracy {accuracy:.1%})", flush=True)
    tutorial, fast = (min(v) for v in list(times.values())[:2])
    print("\nside                                     min s   all runs")
    for name, values in times.items():
        print(f"{name:<40} {min(values):6.1f}   {', '.join(f'{v:.1f}' for v in values)}")
    print(f"\ntutorial / cnnvis fast path: {tutorial / fast:.2f}x less wall time")


if __name__ == "__main__":
    main()
