"""Flowers training throughput: images decoded once and batched in memory vs decoded per batch by a DataLoader.

    python benchmarks/flowers_throughput.py                          # 20 timed batches per measurement
    python benchmarks/flowers_throughput.py --threads 1 --batches 10 --reps 1
    python benchmarks/flowers_throughput.py --device cuda --batches 50

``configs/flowers5.yaml`` as shipped, built by the real ``Trainer`` (its data pipeline, model,
optimizer, scheduler) three times: ``data.in_memory=true`` (decoded once, augmented in batches on
the device), and ``in_memory=false`` with ``data.num_workers=auto`` and with ``0`` (PIL decoding
and torchvision transforms per image in a ``DataLoader``). Three things are measured, in images/s:

* train: data + train step, through ``Trainer.train_one_epoch`` on the first
  ``--warmup + --batches`` batches of the real training batches;
* data pipeline only: iterating those batches (decode or slice + augment + collate), no model;
* train step only: ``Trainer.train_one_epoch`` on batches decoded beforehand (held in memory),
  so nothing waits for data.

If "data pipeline only" is slower than "train step only", the step is starved by data (on a GPU
that decides the throughput; on a small CPU the step usually dominates). Each measurement skips
``--warmup`` batches (worker start-up, first-call costs) and times the next ``--batches``; on CUDA the
device is synchronised before each clock reading. Both modes use the same thread count (printed;
``--threads`` sets it; DataLoader workers use one thread each, as PyTorch sets them) and alternate
over ``--reps`` repetitions; the best repetition counts. The last line is the in-memory / DataLoader
(auto workers) ratio of the end-to-end train throughput.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cnnvis.config import load_config  # noqa: E402
from cnnvis.data.folders import resolve_workers  # noqa: E402
from cnnvis.training.trainer import Listener, Trainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstBatches:
    """The first ``n`` batches of a batch source (a fresh iterator, as an epoch would make)."""

    def __init__(self, source: Iterable[Any], n: int) -> None:
        self.source, self.n = source, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.source), self.n)

    def __len__(self) -> int:
        return self.n


class StepClock(Listener):
    """Clock readings after the last warm-up step and after the last step (device synchronised)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.marks: dict[int, float] = {}

    def on_step(self, state, step_in_epoch: int, loss: torch.Tensor) -> None:
        if step_in_epoch in (self.warmup - 1, self.total - 1):
            sync(state.device)
            self.marks[step_in_epoch] = time.perf_counter()

    def seconds(self) -> float:
        return self.marks[self.total - 1] - self.marks[self.warmup - 1]


def timed_steps(trainer: Trainer, batches: Iterable[Any], warmup: int, n: int) -> float:
    """Seconds for train steps ``warmup+1 .. warmup+n`` of ``Trainer.train_one_epoch`` over ``batches``."""
    total = warmup + n
    clock = StepClock(warmup, total)
    trainer.data.train = FirstBatches(batches, total)  # trainer.state.data is the same bundle
    trainer.state.steps_per_epoch = total
    trainer.listeners = [clock]
    trainer.train_one_epoch()
    return clock.seconds()


def timed_loader(loader: Iterable[Any], warmup: int, n: int) -> float:
    """Seconds to draw batches ``warmup+1 .. warmup+n`` from a fresh iterator over ``loader``."""
    start = None
    for i, _ in enumerate(itertools.islice(iter(loader), warmup + n)):
        if i == warmup - 1:
            start = time.perf_counter()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "flowers5.yaml")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before each measurement (>= 1)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions per mode (alternating); the best counts")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads, both modes (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = parser.parse_args()
    if args.warmup < 1 or args.batches < 1:
        sys.exit("--warmup and --batches must be >= 1")
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    overrides = list(args.overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append(f"data.root={REPO.parent / 'shared' / 'data'}")
    settings = {"memory": ["data.in_memory=true"], "auto": ["data.in_memory=false", "data.num_workers=auto"],
                "0": ["data.in_memory=false", "data.num_workers=0"]}
    modes = tuple(settings)
    tmp = tempfile.TemporaryDirectory()
    trainers: dict[str, Trainer] = {}
    for mode in modes:
        config = load_config(args.config, [*overrides, *settings[mode]])
        trainers[mode] = Trainer(config, runs_dir=tmp.name, device=args.device)
    first = trainers[modes[0]]
    config, device = first.config, first.device
    batch = config.data.batch_size
    full_batches = first.data.sizes["train"] // batch  # one epoch's full batches: the most one measurement can use
    if args.warmup + args.batches > full_batches:
        sys.exit(f"--warmup + --batches must be <= {full_batches} (full batches in one epoch of this training set)")
    loaders = {mode: t.data.train for mode, t in trainers.items()}  # the real training batches
    auto_workers = resolve_workers("auto")
    workers = {"memory": "in memory", "auto": f"auto ({auto_workers})", "0": "0"}
    print(f"torch {torch.__version__}; device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"torch.get_num_threads() = {torch.get_num_threads()} (both modes)")
    print(f"{args.config.name}: {config.model.arch}, batch {batch}, {config.data.transforms.image_size} px crops, "
          f"{first.data.sizes['train']} training images; num_workers auto = {auto_workers}; "
          f"{args.warmup} warm-up + {args.batches} timed batches, {args.reps} rep(s)\n", flush=True)

    train: dict[str, list[float]] = {m: [] for m in modes}
    pipeline: dict[str, list[float]] = {m: [] for m in modes}
    step_only: list[float] = []
    for rep in range(args.reps):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            train[mode].append(timed_steps(trainers[mode], loaders[mode], args.warmup, args.batches))
            print(f"  train, {workers[mode]}: {args.batches * batch / train[mode][-1]:.1f} images/s", flush=True)
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            pipeline[mode].append(timed_loader(loaders[mode], args.warmup, args.batches))
            print(f"  data pipeline only, {workers[mode]}: {args.batches * batch / pipeline[mode][-1]:.1f} images/s",
                  flush=True)
    preloaded = [(x.clone(), y.clone()) for x, y in itertools.islice(iter(loaders["memory"]), args.warmup + args.batches)]
    for rep in range(args.reps):
        step_only.append(timed_steps(trainers["memory"], preloaded, args.warmup, args.batches))
        print(f"  train step only (preloaded batches): {args.batches * batch / step_only[-1]:.1f} images/s", flush=True)
    tmp.cleanup()

    def rate(times: list[float]) -> float:  # the best repetition
        return args.batches * batch / min(times)

    rows = [
        *(("train (data + step)", workers[mode], train[mode]) for mode in modes),
        *(("data pipeline only", workers[mode], pipeline[mode]) for mode in modes),
        ("train step only (preloaded)", "-", step_only),
    ]
    print(f"\n{'what':<30} {'batches from':>12} {'images/s':>9} {'s/batch':>8} {'median images/s':>16}")
    for what, mode, times in rows:
        print(f"{what:<30} {mode:>12} {rate(times):>9.1f} {min(times) / args.batches:>8.3f} "
              f"{args.batches * batch / statistics.median(times):>16.1f}")
    for mode in modes:
        fed = rate(pipeline[mode]) >= rate(step_only)
        print(f"data pipeline ({workers[mode]}) {'keeps up with' if fed else 'is SLOWER than'} the train step alone: "
              f"{rate(pipeline[mode]):.0f} vs {rate(step_only):.0f} images/s{'' if fed else ' -> the step is starved by data'}")
    print(f"ratio train images/s, in memory / DataLoader with num_workers auto: {rate(train['memory']) / rate(train['auto']):.2f}x")


if __name__ == "__main__":
    main()
