"""How much slower is training with the default TensorBoard logging than with ``log.tensorboard=false``?

    python benchmarks/logging_overhead.py                      # MNIST, 2 epochs x 2 runs per mode
    python benchmarks/logging_overhead.py --threads 1 --epochs 3 --repeats 3 --set data.subset=20000

Each mode trains the same config from the same seed into a temporary runs folder, through the real
``Trainer`` with the real ``TensorBoardListener`` attached exactly as ``cnnvis train`` attaches it
(default ``log:`` settings: step losses, histograms, input/filter/misclassified/Grad-CAM images
every epoch) or with ``log.tensorboard=false``. An epoch is timed from the trainer's epoch-start
event to the end of every listener's epoch-end work (so the logger's histograms, pictures and flush
are inside it; on CUDA the device is synchronised before the clock is read); the one-off work
before the first epoch (graph, hparams) and after the last (test pass, PR curves, confusion matrix)
is shown apart. Both modes run with the same thread count (printed; ``--threads`` sets it), are
warmed up by a short untimed run each, and alternate (off/on, then on/off, ...) so drifting machine
load hits both. The headline is the ratio of median epoch times; the last line is the ratio.
Target: default logging costs at most 10% per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cnnvis.config import load_config  # noqa: E402
from cnnvis.training.trainer import Listener, Trainer  # noqa: E402


class Clock(Listener):
    """Appended last, so its epoch end comes after every other listener's."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.marks: dict[str, float] = {}

    def on_train_start(self, state) -> None:
        self.marks["started"] = time.perf_counter()

    def on_epoch_start(self, state) -> None:
        _sync(state.device)
        self._t = time.perf_counter()

    def on_epoch_end(self, state, metrics) -> None:
        _sync(state.device)
        self.epochs.append(time.perf_counter() - self._t)
        self.marks["last_epoch_end"] = time.perf_counter()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config_path: Path, overrides: list[str], logging: bool, device: str) -> dict[str, float]:
    config = load_config(config_path, [*overrides, f"log.tensorboard={'true' if logging else 'false'}"])
    with tempfile.TemporaryDirectory() as runs:
        trainer = Trainer(config, runs_dir=runs, device=device)
        if config.log.tensorboard:
            from cnnvis.training.tensorboard import TensorBoardListener

            trainer.listeners.append(TensorBoardListener(trainer.run_dir, config))
        clock = Clock()
        trainer.listeners.append(clock)
        begin = time.perf_counter()
        try:
            trainer.fit()
        finally:
            trainer.close()
        end = time.perf_counter()
    return {
        "epochs": clock.epochs,
        "start": clock.marks["started"] - begin,
        "end": end - clock.marks["last_epoch_end"],
        "total": end - begin,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mnist.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (alternating order)")
    parser.add_argument("--warmup-subset", type=int, default=2000,
                        help="training images of the untimed 1-epoch warm-up run per mode (0: no warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both modes (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; torch.get_num_threads() = {torch.get_num_threads()} (both modes); "
          f"config {args.config.name}, {args.epochs} epoch(s) x {args.repeats} run(s) per mode", flush=True)

    overrides = [f"train.epochs={args.epochs}", *args.overrides]
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append(f"data.root={REPO.parent / 'shared' / 'data'}")
    modes = (("logging off", False), ("default logging", True))
    if args.warmup_subset:
        warm = [*overrides, "train.epochs=1", f"data.subset={args.warmup_subset}"]
        for name, logging in modes:
            run(args.config, warm, logging, args.device)
        print("  warm-up done (1 short untimed run per mode)", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for rep in range(args.repeats):
        for name, logging in modes if rep % 2 == 0 else modes[::-1]:
            results[name].append(run(args.config, overrides, logging, args.device))
            print(f"  {name}: epochs {', '.join(f'{s:.2f}' for s in results[name][-1]['epochs'])} s", flush=True)

    def epochs(name: str) -> list[float]:
        return [s for r in results[name] for s in r["epochs"]]

    print(f"\n{'mode':<16} {'epochs':>6} {'epoch s median':>15} {'mean':>7} {'min':>7} {'before s':>9} {'after s':>8} {'total s':>8}")
    for name, rs in results.items():
        e = epochs(name)
        print(f"{name:<16} {len(e):>6} {statistics.median(e):>15.2f} {statistics.mean(e):>7.2f} {min(e):>7.2f} "
              f"{statistics.mean(r['start'] for r in rs):>9.2f} {statistics.mean(r['end'] for r in rs):>8.2f} "
              f"{statistics.mean(r['total'] for r in rs):>8.2f}")
    ratio = statistics.median(epochs("default logging")) / statistics.median(epochs("logging off"))
    verdict = "met" if ratio <= 1.10 else "MISSED"
    print(f"ratio (default logging / logging off, median epoch time): {ratio:.3f}  ({(ratio - 1) * 100:+.1f}%; "
          f"target <= +10%: {verdict})")


if __name__ == "__main__":
    main()
