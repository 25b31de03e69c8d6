"""Every benchmark in its quick mode, one table: is anything slower than it was?

    python benchmarks/run_all.py                 # the whole set, under 10 minutes on 2 cores
    python benchmarks/run_all.py --only vis cli  # the benchmarks whose name starts so

Each script runs as its own process with the quick arguments listed in ``QUICK`` below (fewer
images, epochs and repetitions than its full run; the full runs are what benchmarks/RESULTS.md
records). The table shows each one's exit status, wall clock and headline: the last line it
prints, which every script keeps for its result (a ratio against the reference where there is
one). A script in this folder without an entry in ``QUICK`` is listed as such, so a new benchmark
cannot be forgotten. OMP_WAIT_POLICY=PASSIVE is set for every child, as the scripts set it
themselves: a spinning OpenMP pool would steal the other core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"

#: script -> (quick arguments, what the quick mode leaves out)
QUICK: dict[str, tuple[list[str], str]] = {
    "cli_startup.py": (["--runs", "3"], "3 runs per command instead of 7"),
    "cam_speed.py": (["--models", "mnist", "--reps", "2", "--batch-sizes", "32", "128"],
                     "random-weight mnist_cnn only, min of 3 calls, pytorch-grad-cam at batch_size 32 and 128"),
    "vis_speed.py": (["--images", "16", "--reps", "2", "--ppe", "32", "128", "--ibs", "0", "--keep", "1"],
                     "16 digits, 2 repetitions, 2 Captum occlusion and 1 IG batch setting"),
    "occlusion_speed.py": (["--only", "mnist", "--images", "16", "--reps", "1", "--ppe", "16", "--keep", "1",
                            "--tau", "0.5", "--threads", "1"],
                           "mnist_cnn on 16 digits, once, Captum at ppe 16 only (full run: ResNet-18 224 px too)"),
    "logging_overhead.py": (["--epochs", "1", "--repeats", "1", "--set", "data.subset=6000"],
                            "1 epoch of 6,000 digits per mode, once"),
    "flowers_throughput.py": (["--batches", "4", "--reps", "1", "--threads", "2"], "4 timed batches, once"),
    "ddp_throughput.py": (["--batches", "4", "--reps", "1"], "4 timed global batches, once per process count"),
    "mnist_time_to_99.py": (["--only", "project", "--whole-process"],
                            "the whole `cnnvis train` process only: the PyTorch example takes 10 minutes (full run: both)"),
    "maximize_speed.py": (["--steps", "32", "--reps", "1", "--threads", "1"], "32 steps instead of 128, once"),
    "frozen_backbone.py": (["--train", "96", "--holdout", "0.01", "--size", "64", "--epochs", "2", "--repeats", "1"],
                           "96 training images at 64 px, 2 epochs, once"),
}
NEEDS_DATA = {"ddp_throughput.py", "frozen_backbone.py", "occlusion_speed.py", "vis_speed.py", "logging_overhead.py", "flowers_throughput.py", "mnist_time_to_99.py"}


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="run only benchmarks whose file name starts so")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one benchmark may take")
    parser.add_argument("--logs", type=Path, default=None, help="also keep each benchmark's whole output here")
    args = parser.parse_args()
    scripts = sorted(p.name for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    if args.only:
        scripts = [s for s in scripts if s.startswith(tuple(args.only))]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    rows = []
    started_all = time.perf_counter()
    for script in scripts:
        if script not in QUICK:
            rows.append((script, "-", 0.0, "no quick mode registered in run_all.py"))
            continue
        if script in NEEDS_DATA and not DATA.is_dir():
            rows.append((script, "skip", 0.0, f"needs {DATA}"))
            continue
        quick, _ = QUICK[script]
        print(f"running {script} {' '.join(quick)} ...", flush=True)
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, str(HERE / script), *quick], capture_output=True, text=True,
                                  timeout=args.timeout, env=env, cwd=HERE.parent, check=False)
            status, headline = str(done.returncode), last_line(done.stdout if done.returncode == 0 else done.stderr)
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                (args.logs / f"{Path(script).stem}.log").write_text(done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            status, headline = "timeout", f"over {args.timeout:.0f} s"
        rows.append((script, status, time.perf_counter() - started, headline))
    print(f"\n{'benchmark':<24} {'exit':>7} {'seconds':>8}  headline (last line of its output)")
    for script, status, seconds, headline in rows:
        print(f"{script:<24} {status:>7} {seconds:>8.1f}  {headline}")
    print(f"all quick benchmarks: {time.perf_counter() - started_all:.0f} s; "
          f"{sum(r[1] not in ('0', 'skip') for r in rows)} did not finish cleanly")


if __name__ == "__main__":
    main()
