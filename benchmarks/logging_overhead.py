"""How much slower is training with the default TensorBoard logging than with ``log.tensorboard=false``?

    python benchmarks/logging_overhead.py                      # MNIST, 2 epochs per mode
    python benchmarks/logging_overhead.py --epochs 3 --repeats 2 --set data.subset=20000

Each mode trains the same config from the same seed into a temporary runs folder. An epoch is
timed from the trainer's epoch-start event to the end of every listener's epoch-end work (so the
logger's histograms, pictures and flush are inside it); the one-off work before the first epoch
(graph, hparams) and after the last (test pass, PR curves, confusion matrix) is shown apart.
Modes alternate when repeated, so drifting machine load hits both. The last line is the ratio.
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

from cnnvis.config import load_config  # noqa: E402
from cnnvis.train import Listener, Trainer  # noqa: E402


class Clock(Listener):
    """Appended last, so its epoch end comes after every other listener's."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.marks: dict[str, float] = {}

    def on_train_start(self, state) -> None:
        self.marks["started"] = time.perf_counter()

    def on_epoch_start(self, state) -> None:
        self._t = time.perf_counter()

    def on_epoch_end(self, state, metrics) -> None:
        self.epochs.append(time.perf_counter() - self._t)
        self.marks["last_epoch_end"] = time.perf_counter()


def run(config_path: Path, overrides: list[str], logging: bool, device: str) -> dict[str, float]:
    config = load_config(config_path, [*overrides, f"log.tensorboard={'true' if logging else 'false'}"])
    with tempfile.TemporaryDirectory() as runs:
        trainer = Trainer(config, runs_dir=runs, device=device)
        if config.log.tensorboard:
            from cnnvis.tb import TensorBoardListener

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
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (alternating)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = parser.parse_args()

    overrides = [f"train.epochs={args.epochs}", *args.overrides]
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append(f"data.root={REPO.parent / 'shared' / 'data'}")
    results: dict[str, list[dict]] = {"logging off": [], "default logging": []}
    for _ in range(args.repeats):
        for name, logging in (("logging off", False), ("default logging", True)):
            results[name].append(run(args.config, overrides, logging, args.device))
            print(f"  {name}: epochs {', '.join(f'{s:.2f}' for s in results[name][-1]['epochs'])} s", flush=True)

    def mean_epoch(name: str) -> float:
        return statistics.mean(s for r in results[name] for s in r["epochs"])

    print(f"\n{'mode':<16} {'epochs':>6} {'epoch s mean':>13} {'epoch s min':>12} {'before s':>9} {'after s':>8} {'total s':>8}")
    for name, rs in results.items():
        epochs = [s for r in rs for s in r["epochs"]]
        print(f"{name:<16} {len(epochs):>6} {mean_epoch(name):>13.2f} {min(epochs):>12.2f} "
              f"{statistics.mean(r['start'] for r in rs):>9.2f} {statistics.mean(r['end'] for r in rs):>8.2f} "
              f"{statistics.mean(r['total'] for r in rs):>8.2f}")
    ratio = mean_epoch("default logging") / mean_epoch("logging off")
    print(f"ratio (default logging / logging off, mean epoch time): {ratio:.3f}  ({(ratio - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
