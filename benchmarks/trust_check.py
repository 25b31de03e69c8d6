"""Which heatmap methods fail the randomization check, measured: ``cnnvis evaluate RUN --explanations``
on each run given (a copy is used, so the run itself is not written to), timed.

    python benchmarks/trust_check.py RUN [RUN ...] [--images 32]

Prints one line per run: the methods that FAIL the cascading randomization check (mean |Spearman|
with the fully re-initialised model above 0.5), the ranked table's order, and the seconds the
whole ``evaluate --explanations`` took. This is the measurement behind the README's trust section.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from cnnvis.commands.evaluate import evaluate_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{date.today()} · {platform.processor() or platform.machine()} · {torch.get_num_threads()} threads · "
          f"torch {torch.__version__} · device {args.device}")
    for source in args.runs:
        with tempfile.TemporaryDirectory(prefix="cnnvis-trust-") as tmp:
            run = Path(tmp) / source.name
            shutil.copytree(source, run, ignore=shutil.ignore_patterns("visualizations", "evaluation", "events.out.*"))
            started = time.perf_counter()
            outcome = evaluate_command(run, explanations=True, images=args.images, device=args.device, wrong=0,
                                       methods=["all"])  # Score-CAM too: seconds on these nets
            seconds = time.perf_counter() - started
        report = outcome.faithfulness
        failed = [f"{r.method} (|ρ| {r.randomization.spearman:.2f})" for r in report.rows if not r.passed]
        print(f"{source.name} ({outcome.run.architecture}, test accuracy {outcome.evaluation.accuracy:.2%}): "
              f"{len(report.rows)} methods, {report.images} images, {seconds:.0f} s")
        print(f"  FAILED the randomization check: {', '.join(failed) or 'none'}")
        print("  ranked: " + ", ".join(r.method for r in report.rows))
        for r in report.rows:
            print(f"  {r.rank:2d} {r.method:22s} del {r.deletion_auc:.3f} ins {r.insertion_auc:.3f} ROAD {r.road:.3f} "
                  f"sens {r.sensitivity:.2f} |ρ| {r.randomization.spearman:.2f} {'pass' if r.passed else 'FAIL'} "
                  f"{r.seconds:.1f} s")
        for name, why in report.skipped:
            print(f"  skipped {name}: {why}")


if __name__ == "__main__":
    main()
