"""Which map can I trust? ``cnnvis evaluate --explanations``: every heatmap method scored on fixed
images of a split (deletion/insertion AUC, ROAD, max-sensitivity, the randomization check; see
:mod:`cnnvis.metrics.faithfulness`), written into the run::

    RUN/evaluation/
      faithfulness.json          everything: the ranked rows, the curves, the cascade steps
      faithfulness.csv           the ranked table
      faithfulness_curves.png    deletion and insertion curves of every method

and, given a ``SummaryWriter``, the table as text and the curves under ``evaluate/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnvis import plots
from cnnvis.data import DataBundle
from cnnvis.errors import DataError
from cnnvis.io import csv_number, write_csv, write_json
from cnnvis.metrics.faithfulness import FaithfulnessReport, faithfulness
from cnnvis.run import EvaluationFiles, LoadedRun


@dataclass
class FaithfulnessFiles:
    json: Path
    csv: Path
    curves: Path


FAITHFULNESS_CSV_COLUMNS = ("rank", "method", "layer", "deletion_auc", "insertion_auc", "random_deletion_auc",
                            "random_insertion_auc", "randomization_spearman", "randomization_ssim",
                            "randomization_check", "beats_random", "road_morf", "road_lerf", "road", "max_sensitivity")


def check_explanations(run: LoadedRun, bundle: DataBundle, split: str = "test", count: int = 32, **options: Any) -> FaithfulnessReport:
    """:func:`cnnvis.metrics.faithfulness` on ``count`` fixed images of the split (the same ones
    ``cnnvis visualize`` draws), explaining the predicted class; returns its report with the
    images, classes and checkpoint recorded in ``report.info``."""
    fixed = bundle.fixed_batch(split, count)
    report = faithfulness(run.model, fixed.images.to(run.device), "pred", **options)
    names = list(run.spec.class_names)
    report.info = {
        "images_used": fixed.sources,
        "true": [names[i] for i in fixed.labels.tolist()],
        "explained": [names[i] for i in report.targets],
        "class_names": names,
        "checkpoint": run.weights,
        "epoch": run.epoch,
        "untrained": run.untrained,
        "architecture": run.architecture,
        "device": str(run.device),
    }
    return report


def write_faithfulness(report: FaithfulnessReport, out_dir: str | Path, writer: Any = None, step: int = 0,
                       title: str = "") -> FaithfulnessFiles:
    """``faithfulness.json`` (everything, curves and cascade steps included), ``faithfulness.csv``
    (the ranked table) and ``faithfulness_curves.png`` in ``out_dir``; with ``writer`` (a
    ``SummaryWriter``) the table as text and the curves as an image under ``evaluate/``."""
    out = Path(out_dir)
    png = plots.faithfulness_curves_figure(report, title)
    curves_path = plots.save_png(png, out / EvaluationFiles.FAITHFULNESS_CURVES)
    rows = [[r.rank, r.method, r.layer or "", f"{r.deletion_auc:.6g}", f"{r.insertion_auc:.6g}",
             f"{report.random_deletion_auc:.6g}", f"{report.random_insertion_auc:.6g}",
             f"{r.randomization.spearman:.6g}", f"{r.randomization.ssim:.6g}",
             "pass" if r.passed else "fail", "yes" if r.beats_random else "no",
             *(csv_number(v) for v in (r.road_morf, r.road_lerf, r.road, r.sensitivity))] for r in report.rows]
    try:
        json_path = write_json(out / EvaluationFiles.FAITHFULNESS, report.to_dict())
        csv_path = write_csv(out / EvaluationFiles.FAITHFULNESS_TABLE, FAITHFULNESS_CSV_COLUMNS, rows)
    except OSError as exc:
        raise DataError(f"cannot write the faithfulness table into {out}: {exc.strerror or exc}") from None
    if writer is not None:
        lines = ["| rank | method | deletion AUC ↓ | insertion AUC ↑ | ROAD ↑ | max-sensitivity ↓ | randomization \\|ρ\\| ↓ | SSIM | check |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in report.rows:
            lines.append(f"| {r.rank} | {r.method} | {r.deletion_auc:.3f} | {r.insertion_auc:.3f} | {r.road:.3f} | "
                         f"{r.sensitivity:.3f} | {r.randomization.spearman:.2f} | {r.randomization.ssim:.2f} | "
                         f"{'pass' if r.passed else 'FAIL'} |")
        lines.append(f"| | random order | {report.random_deletion_auc:.3f} | {report.random_insertion_auc:.3f} | | | | | |")
        writer.add_text("evaluate/faithfulness", "\n".join(lines), step)
        writer.add_image("evaluate/faithfulness_curves", plots.figure_to_tensor(png), step, dataformats="CHW")
    return FaithfulnessFiles(json_path, csv_path, curves_path)
