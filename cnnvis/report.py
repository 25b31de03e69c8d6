"""One self-contained HTML page per run: ``cnnvis report RUN`` -> ``RUN/report.html``.

The page gathers what the other commands wrote into the run -- the config, the training curves
(drawn here from ``metrics.jsonl``), the final metrics, ``cnnvis evaluate``'s confusion matrix,
confidently wrong images and faithfulness table, and ``cnnvis visualize``'s pictures grouped by
method -- and renders ``cnnvis/templates/report.html.j2`` with Jinja2 (autoescaped). Every image
is embedded as a ``data:`` URI and the page has no script, font or style sheet from elsewhere, so
it opens from disk, offline, and can be mailed as one file. Sections whose inputs are missing say
which command makes them. Nothing here prints and nothing is computed on a model.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cnnvis.errors import CheckpointError, DataError
from cnnvis.evaluate import EVALUATION_DIR
from cnnvis.files import atomic_write
from cnnvis.run import read_metrics
from cnnvis.vis import render
from cnnvis.vis.registry import METHODS

REPORT_NAME = "report.html"
TEMPLATE = "report.html.j2"


@dataclass
class Picture:
    """One embedded PNG with its caption."""

    data_uri: str
    caption: str
    alt: str
    width: int  #: pixels, for the browser's layout before decoding


@dataclass
class GalleryGroup:
    method: str
    description: str
    pictures: list[Picture]


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    path: Path
    sections: dict[str, bool]  #: section title -> whether it had content
    missing: list[tuple[str, str]] = field(default_factory=list)  #: (section, the command that fills it)
    pictures: int = 0
    size: int = 0  #: bytes


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _picture(path: Path, caption: str, alt: str) -> Picture:
    data = path.read_bytes()
    width = render.PNG(data).width if data[:8] == b"\x89PNG\r\n\x1a\n" else 0
    return Picture(_data_uri(data), caption, alt, width)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}", "Run the command that wrote it again.") from None


def training_curves_png(history: list[dict[str, Any]], title: str = "") -> bytes | None:
    """Loss and accuracy per epoch (train and validation) from ``metrics.jsonl`` epoch records."""
    epochs = [r for r in history if "epoch" in r and ("train_loss" in r or "val_loss" in r)]
    if not epochs:
        return None
    fig = Figure(figsize=(11, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    x = [r["epoch"] for r in epochs]
    for panel, (what, keys) in enumerate((("loss", ("train_loss", "val_loss")), ("accuracy", ("train_accuracy", "val_accuracy")))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for key, style in zip(keys, ("-o", "-s")):
            points = [(e, r[key]) for e, r in zip(x, epochs) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), style, markersize=3.5, linewidth=1.5, label=key.split("_")[0].replace("val", "validation"))
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if what == "accuracy":
            ax.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return render.figure_to_png(fig)


def _gallery(folder: Path) -> list[GalleryGroup]:
    """``visualizations/<method>/*.png`` grouped by method in the registry's order, captions from the sidecars."""
    if not folder.is_dir():
        return []
    present = {p.name: p for p in folder.iterdir() if p.is_dir()}
    order = [m for m in METHODS if m in present] + sorted(set(present) - set(METHODS))
    groups = []
    for method in order:
        pictures = []
        for png in sorted(present[method].glob("*.png"), key=lambda p: _natural(p.stem)):
            meta = _read_json(png.with_suffix(".json")) or {}
            pictures.append(_picture(png, _caption(png, meta), f"{method}: {png.stem}"))
        if pictures:
            spec = METHODS.get(method)
            groups.append(GalleryGroup(method, spec.description if spec else "", pictures))
    return groups


def _natural(stem: str) -> tuple:
    """``image-2`` before ``image-10``; layer names in their module order (``features.6`` < ``features.13``)."""
    return tuple(int(part) if part.isdigit() else part for part in stem.replace("-", ".").split("."))


def _caption(png: Path, meta: dict[str, Any]) -> str:
    parts = [png.name]
    if meta.get("layer"):
        parts.append(f"layer {meta['layer']}")
    if meta.get("method") == "filters":
        shape = (meta.get("parameters") or {}).get("shape")
        if shape:
            parts.append("weights " + "×".join(map(str, shape)))
    elif meta.get("image"):
        parts.append(str(meta["image"]))
    elif isinstance(meta.get("images"), list) and meta["images"]:
        parts.append(f"{len(meta['images'])} images")
    if meta.get("target") is not None and meta.get("method") not in ("filters", "activations"):
        parts.append(f"target {meta['target']}")
    if meta.get("checkpoint"):
        parts.append(f"{Path(str(meta['checkpoint'])).name}, epoch {meta.get('epoch', '?')}")
    return " · ".join(parts)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Render the run's report to ``out`` (default ``RUN/report.html``), written atomically."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, UndefinedError

    run = Path(run_dir)
    if run.is_file() and run.parent.name == "checkpoints":  # a checkpoint path names its run
        run = run.parent.parent
    if not run.is_dir():
        raise CheckpointError(f"no such run directory: {run}")
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run} is not a cnnvis run (no config.yaml)", "Give the directory `cnnvis train` created.")
    config_text = (run / "config.yaml").read_text(encoding="utf-8")
    history = read_metrics(run)
    epochs = [r for r in history if "train_loss" in r or "val_loss" in r]
    final = next((r for r in reversed(history) if "test_accuracy" in r), None)
    evaluation_dir = run / EVALUATION_DIR
    evaluation = _read_json(evaluation_dir / "metrics.json")
    faithfulness = _read_json(evaluation_dir / "faithfulness.json")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    model = config.get("model", {}) if isinstance(config, dict) else {}
    data = config.get("data", {}) if isinstance(config, dict) else {}

    summary: list[tuple[str, str]] = [("architecture", str(model.get("arch", "?"))), ("dataset", str(data.get("dataset", "?")))]
    if epochs:
        last = epochs[-1]
        summary += [("epochs trained", str(last.get("epoch", len(epochs)))),
                    ("final training loss", _fmt(last.get("train_loss"))),
                    ("final validation accuracy", _percent(last.get("val_accuracy")))]
    if final:
        summary += [("best validation accuracy", _percent(final.get("best_val_accuracy"))),
                    (f"{final.get('test_split', 'test')} accuracy ({final.get('test_checkpoint', 'best')}.pt)", _percent(final.get("test_accuracy"))),
                    (f"{final.get('test_split', 'test')} loss", _fmt(final.get("test_loss")))]
    if evaluation:
        split = evaluation.get("split", "test")
        summary += [(f"{split} images evaluated", str(evaluation.get("images", "?"))),
                    (f"{split} macro F1", _fmt(evaluation.get("macro_f1"))),
                    (f"{split} images misclassified", str(evaluation.get("misclassified", "?")))]

    curves_png = training_curves_png(history)
    curves = Picture(_data_uri(curves_png), "loss and accuracy per epoch, from metrics.jsonl", "training curves", 1100) if curves_png else None
    confusion = wrong = faith_curves = None
    if (evaluation_dir / "confusion_matrix.png").is_file():
        confusion = _picture(evaluation_dir / "confusion_matrix.png", "rows: true class · columns: predicted class · colour: share of the true class", "confusion matrix")
    if (evaluation_dir / "confidently_wrong.png").is_file():
        wrong = _picture(evaluation_dir / "confidently_wrong.png", "the misclassified images the model was surest about", "confidently wrong images")
    if faithfulness and (evaluation_dir / "faithfulness_curves.png").is_file():
        faith_curves = _picture(evaluation_dir / "faithfulness_curves.png",
                                "mean target probability while pixels are deleted / inserted in each map's order; dashed: random order",
                                "deletion and insertion curves")
    gallery = _gallery(run / "visualizations")
    per_class = [
        {**row, **{k: _fmt(row.get(k)) for k in ("precision", "recall", "f1", "accuracy")}}
        for row in (evaluation or {}).get("per_class", [])
    ]
    faith_rows = []
    for row in (faithfulness or {}).get("methods", []):
        cascade = row.get("cascade") or []
        faith_rows.append({
            **row,
            "deletion": _fmt(row.get("deletion_auc")),
            "insertion": _fmt(row.get("insertion_auc")),
            "spearman": _fmt(row.get("randomization_spearman"), 2),
            "ssim": _fmt(row.get("randomization_ssim"), 2),
            "cascade_text": " → ".join(f"{_fmt(step.get('spearman'), 2)}" for step in cascade),
            "passed": row.get("randomization_check") == "pass",
        })

    sections = {
        "Summary": True,
        "Training curves": curves is not None,
        "Evaluation": evaluation is not None,
        "Which map can I trust?": faithfulness is not None,
        "Visualizations": bool(gallery),
        "Config": True,
    }
    hints = {
        "Training curves": "train the run: no epoch finished yet",
        "Evaluation": f"cnnvis evaluate {run}",
        "Which map can I trust?": f"cnnvis evaluate {run} --explanations",
        "Visualizations": f"cnnvis visualize {run}",
    }
    missing = [(name, hints[name]) for name, present in sections.items() if not present]

    env = Environment(loader=PackageLoader("cnnvis", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    try:
        html = env.get_template(TEMPLATE).render(
            title=run.name,
            generated=datetime.now().strftime("%Y-%m-%d %H:%M"),
            summary=summary,
            curves=curves,
            evaluation=evaluation,
            evaluation_checkpoint=Path(str((evaluation or {}).get("checkpoint", ""))).name,
            per_class=per_class,
            confusion=confusion,
            wrong=wrong,
            faithfulness=faithfulness,
            faith_rows=faith_rows,
            faith_curves=faith_curves,
            faith_random=(faithfulness or {}).get("random_order"),
            faith_params=(faithfulness or {}).get("parameters", {}),
            faith_skipped=(faithfulness or {}).get("skipped", []),
            fmt=_fmt,
            gallery=gallery,
            config_text=config_text,
            missing=dict(missing),
            sections=sections,
        )
    except UndefinedError as exc:  # a file in the run lacks a field this version writes
        raise DataError(f"{run / EVALUATION_DIR} holds files this version of cnnvis cannot read ({exc.message})",
                        "Run `cnnvis evaluate` again to rewrite them.") from None
    path = Path(out) if out is not None else run / REPORT_NAME
    data_bytes = html.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data_bytes)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    pictures = sum(p is not None for p in (curves, confusion, wrong, faith_curves)) + sum(len(g.pictures) for g in gallery)
    return Report(path, sections, missing, pictures, len(data_bytes))
