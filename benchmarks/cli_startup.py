"""How long does ``cnnvis`` take to answer help and input mistakes?

    python benchmarks/cli_startup.py              # 7 runs of each command, minimum reported
    python benchmarks/cli_startup.py --runs 15

Each command runs as its own process, exactly as a user types it, through the installed console
script (``cnnvis`` beside this Python). The whole process is timed (interpreter start-up
included). A full training import is timed too, for scale. Targets: help and a missing config
under 0.5 s, a config error under 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"help": 0.5, "missing config": 0.5, "config error": 1.0}


def wall_clock(command: list[str], cwd: Path, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, capture_output=True, timeout=300,
                       env={**os.environ, "COLUMNS": "80", "OMP_WAIT_POLICY": "PASSIVE"})
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    cnnvis = shutil.which("cnnvis", path=str(Path(sys.executable).parent)) or "cnnvis"
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "bad.yaml").write_text("model: {arch: resnet_tiny}\n")
        cases = [
            ("cnnvis --help", [cnnvis, "--help"], "help"),
            ("cnnvis train --help", [cnnvis, "train", "--help"], "help"),
            ("cnnvis visualize --help", [cnnvis, "visualize", "--help"], "help"),
            ("cnnvis train missing.yaml", [cnnvis, "train", "missing.yaml"], "missing config"),
            ("cnnvis train bad.yaml (unknown arch)", [cnnvis, "train", "bad.yaml"], "config error"),
            ("python -c 'import cnnvis.training.trainer' (scale)", [sys.executable, "-c", "import cnnvis.training.trainer"], None),
        ]
        print(f"minimum of {args.runs} runs, whole process, {os.cpu_count()} CPUs")
        for label, command, kind in cases:
            seconds = wall_clock(command, cwd, args.runs)
            verdict = "" if kind is None else ("  ok" if seconds < TARGETS[kind] else f"  OVER {TARGETS[kind]} s")
            print(f"{label:<52} {seconds:6.2f} s{verdict}")


if __name__ == "__main__":
    main()
