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
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cnnvis import plots
from cnnvis.commands.evaluate import Evaluation
from cnnvis.errors import CheckpointError, DataError
from cnnvis.io import atomic_write, read_json
from cnnvis.metrics.faithfulness import FaithfulnessReport
from cnnvis.run import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    EVALUATION_DIR,
    METRICS_FILE,
    REPORT_FILE,
    VISUALIZATIONS_DIR,
    EvaluationFiles,
    read_metrics,
)
from cnnvis.sources import SOURCE_FILE, is_run_source, output_dir
from cnnvis.vis.registry import METHODS

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
    notes: list[str] = field(default_factory=list)  #: what was read with trouble (a cut metrics line ...)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _picture(path: Path, caption: str, alt: str) -> Picture:
    data = path.read_bytes()
    width = plots.PNG(data).width if data[:8] == plots.base.PNG_SIGNATURE else 0
    return Picture(_data_uri(data), caption, alt, width)


def _read_typed(path: Path, kind: Any) -> Any:
    """``kind.from_dict`` of a JSON file a command wrote, ``None`` if it is not there."""
    try:
        data = read_json(path)
        return None if data is None else kind.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}", "Run the command that wrote it again.") from None


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
            try:
                meta = read_json(png.with_suffix(".json")) or {}
            except (OSError, ValueError):
                meta = {}  # a picture without a readable sidecar keeps a plain caption
            pictures.append(_picture(png, _caption(png, meta), f"{method}: {png.stem}"))
        if pictures:
            spec = METHODS.get(method)
            groups.append(GalleryGroup(method, spec.description if spec else "", pictures))
    return groups


def _is_heatmap(method: str) -> bool:
    """Heatmaps answer "why this decision?" and lead the page; the rest (activations, filters,
    class images) show what was learned and come later, folded."""
    spec = METHODS.get(method)
    return spec is None or spec.kind == "heatmap"


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
    elif isinstance(meta.get("classes"), list) and meta["classes"]:
        parts.append(plots.count(len(meta["classes"]), "class"))
    elif isinstance(meta.get("images"), list) and meta["images"]:
        parts.append(plots.count(len(meta["images"]), "image"))
    if meta.get("target") is not None and meta.get("method") not in ("filters", "activations"):
        parts.append(f"target {meta['target']}")
    if meta.get("checkpoint"):
        parts.append(f"{Path(str(meta['checkpoint'])).name}, epoch {meta.get('epoch', '?')}")
    return " · ".join(parts)


def _model_flags(source: dict[str, Any], run: Path) -> str:
    """MODEL and the options that put its outputs in ``run`` and name its classes, as the report's
    hints must repeat them: ``--weights`` and ``--runs-dir`` choose the directory (a hint without
    them writes where this report does not look), ``--classes`` the names a --data folder matches."""
    weights = str(source.get("weights", ""))
    flags = [str(source.get("model", "MODEL"))]
    # a program file holds its own weights: --weights is for library models only
    if source.get("kind", "library") == "library" and weights not in ("", "DEFAULT", "pretrained"):
        flags.append(f"--weights {'none' if weights == 'random' else shlex.quote(weights)}")
    named_from = str(source.get("class_names_from", ""))
    if named_from.startswith("--classes "):
        flags.append(f"--classes {shlex.quote(named_from.removeprefix('--classes '))}")
    if run.parent.resolve() != Path("runs").resolve():  # the default needs no flag
        flags.append(f"--runs-dir {shlex.quote(str(run.parent))}")
    return " ".join(flags)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == value else "–"
    return str(value)


def _percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def build_report(run_dir: str | Path, out: str | Path | None = None, weights: str | None = None,
                 runs_dir: str | Path = "runs") -> Report:
    """Render the run's report to ``out`` (default ``RUN/report.html``), written atomically. For a
    model that is not a run (``torchvision:NAME`` with ``weights``, a ``.pt2`` ...), the run-like
    directory ``visualize`` and ``evaluate`` wrote its outputs into (under ``runs_dir``)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, UndefinedError

    if not is_run_source(run_dir):
        found = output_dir(run_dir, weights, runs_dir)
        if not found.is_dir():
            given = "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in (
                ("--weights", weights), ("--runs-dir", runs_dir if found.parent.resolve() != Path("runs").resolve() else None))
                if value is not None)
            raise CheckpointError(f"no outputs of {run_dir} yet: {found} does not exist",
                                  f"Run `cnnvis visualize {run_dir}{given} --image FILE` or "
                                  f"`cnnvis evaluate {run_dir}{given} --data FOLDER` first.")
        run_dir = found
    run = Path(run_dir)
    if run.is_file() and run.parent.name == CHECKPOINT_DIR:  # a checkpoint path names its run
        run = run.parent.parent
    if not run.is_dir():
        raise CheckpointError(f"no such run directory: {run}")
    # a model that was not trained here (torchvision:, timm:, .pt2 ...) has a run-like directory with source.yaml
    library = not (run / CONFIG_FILE).is_file() and (run / SOURCE_FILE).is_file()
    if not (run / CONFIG_FILE).is_file() and not library:
        raise CheckpointError(f"{run} is not a cnnvis run (no {CONFIG_FILE} or {SOURCE_FILE})",
                              "Give the directory `cnnvis train` created, or the one `cnnvis visualize MODEL` wrote into.")
    config_text = (run / (SOURCE_FILE if library else CONFIG_FILE)).read_text(encoding="utf-8")
    metrics = read_metrics(run)
    notes = []
    if metrics.bad_lines:  # a kill mid-append cuts the last line; training itself skips it the same way
        lines = ", ".join(map(str, metrics.bad_lines))
        notes.append(f"{run / METRICS_FILE}: skipped {len(metrics.bad_lines)} unreadable line(s) ({lines}), "
                     "as training does; the other epochs are shown")
    history = metrics.rows
    epochs = [r for r in history if "train_loss" in r or "val_loss" in r]
    final = next((r for r in reversed(history) if "test_accuracy" in r), None)
    evaluation_dir = run / EVALUATION_DIR
    evaluation: Evaluation | None = _read_typed(evaluation_dir / EvaluationFiles.METRICS, Evaluation)
    faithfulness: FaithfulnessReport | None = _read_typed(evaluation_dir / EvaluationFiles.FAITHFULNESS, FaithfulnessReport)
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    model = config.get("model", {}) if isinstance(config, dict) else {}
    data = config.get("data", {}) if isinstance(config, dict) else {}

    if library:  # source.yaml: the model, its weights and preprocessing
        summary: list[tuple[str, str]] = [("model", str(config.get("model", "?"))), ("weights", str(config.get("weights", "?"))),
                                          ("classes", str(config.get("classes", "?")))]
    else:
        summary = [("architecture", str(model.get("arch", "?"))), ("dataset", str(data.get("dataset", "?")))]
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
        split = evaluation.set_name
        summary += [(f"{split} images evaluated", str(evaluation.count)),
                    (f"{split} macro F1", _fmt(evaluation.macro_f1)),
                    (f"{split} images misclassified", str(evaluation.wrong_count))]

    curves_png = plots.training_curves_figure(history)
    curves = Picture(_data_uri(curves_png), "loss and accuracy per epoch, from metrics.jsonl", "training curves", 1100) if curves_png else None
    confusion = wrong = faith_curves = None
    if (evaluation_dir / EvaluationFiles.CONFUSION_MATRIX).is_file():
        confusion = _picture(evaluation_dir / EvaluationFiles.CONFUSION_MATRIX, "rows: true class · columns: predicted class · colour: share of the true class", "confusion matrix")
    if (evaluation_dir / EvaluationFiles.CONFIDENTLY_WRONG).is_file():
        wrong = _picture(evaluation_dir / EvaluationFiles.CONFIDENTLY_WRONG, "the misclassified images the model was surest about", "confidently wrong images")
    if faithfulness and (evaluation_dir / EvaluationFiles.FAITHFULNESS_CURVES).is_file():
        faith_curves = _picture(evaluation_dir / EvaluationFiles.FAITHFULNESS_CURVES,
                                "mean target probability while pixels are deleted / inserted in each map's order; dashed: random order",
                                "deletion and insertion curves")
    gallery = _gallery(run / VISUALIZATIONS_DIR)
    per_class = [
        {"name": c.name, "support": c.support, "predicted": c.predicted,
         **{k: _fmt(getattr(c, k)) for k in ("precision", "recall", "f1", "accuracy")}}
        for c in (evaluation.per_class if evaluation else [])
    ]
    faith_rows = [
        {"rank": r.rank, "method": r.method, "layer": r.layer, "beats_random": r.beats_random, "passed": r.passed,
         "deletion": _fmt(r.deletion_auc), "insertion": _fmt(r.insertion_auc), "ssim": _fmt(r.randomization.ssim, 2),
         "road": _fmt(r.road), "road_parts": f"{_fmt(r.road_morf)} / {_fmt(r.road_lerf)}" if r.road == r.road else "",
         "sensitivity": _fmt(r.sensitivity, 2),
         "cascade_text": " → ".join(_fmt(step.spearman, 2) for step in r.randomization.steps)}
        for r in (faithfulness.rows if faithfulness else [])
    ]

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
    visualize_hint, curves_missing = f"cnnvis visualize {run}", f"No finished epoch yet: {hints['Training curves']}"
    if library:  # the commands that fill a section name the model and its weights as they were given
        name = _model_flags(config if isinstance(config, dict) else {}, run)
        visualize_hint, curves_missing = f"cnnvis visualize {name} --image FILE", "Not trained with cnnvis: no training curves"
        folder = shlex.quote(evaluation.data) if evaluation and evaluation.data else "FOLDER"  # the one evaluated on
        hints = {"Training curves": "a model not trained with cnnvis has none",
                 "Evaluation": f"cnnvis evaluate {name} --data FOLDER",
                 "Which map can I trust?": f"cnnvis evaluate {name} --data {folder} --explanations",
                 "Visualizations": visualize_hint}
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
            evaluation_checkpoint=Path(evaluation.checkpoint).name if evaluation else "",
            per_class=per_class,
            confusion=confusion,
            wrong=wrong,
            faithfulness=faithfulness,
            faith_rows=faith_rows,
            faith_curves=faith_curves,
            fmt=_fmt,
            explain_groups=[g for g in gallery if _is_heatmap(g.method)],
            learned_groups=[g for g in gallery if not _is_heatmap(g.method)],
            visualize_hint=visualize_hint,
            curves_missing=curves_missing,
            config_text=config_text,
            missing=dict(missing),
            sections=sections,
        )
    except UndefinedError as exc:  # a file in the run lacks a field this version writes
        raise DataError(f"{run / EVALUATION_DIR} holds files this version of cnnvis cannot read ({exc.message})",
                        "Run `cnnvis evaluate` again to rewrite them.") from None
    path = Path(out) if out is not None else run / REPORT_FILE
    data_bytes = html.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data_bytes)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    pictures = sum(p is not None for p in (curves, confusion, wrong, faith_curves)) + sum(len(g.pictures) for g in gallery)
    return Report(path, sections, missing, pictures, len(data_bytes), notes)
