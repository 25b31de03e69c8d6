"""How good is a trained run? Test-set metrics, a confusion matrix and the most confidently wrong images.

The library behind ``cnnvis evaluate``. :func:`evaluate_run` computes (one pass over the split,
on the run's device); :func:`write_evaluation` writes into the run::

    RUN/evaluation/
      metrics.json              accuracy, loss, per-class table, confusion counts, the wrong images
      per_class.csv             class, support, predicted, precision, recall, f1, accuracy (one-vs-rest)
      confusion_matrix.png      rows: true class, columns: predicted (+ .json sidecar)
      confidently_wrong.png     the misclassified images with the highest predicted probability (+ .json)

and, given a ``SummaryWriter``, the same pictures and the accuracy to the run's TensorBoard log
under ``evaluate/...``. Nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnvis import plots
from cnnvis.catalog import ALL_METHODS, SLOW_METHODS
from cnnvis.commands.trust import (
    FaithfulnessFiles,
    check_explanations,
    write_faithfulness,
)
from cnnvis.data import DataBundle, check_split
from cnnvis.device import amp_dtype, resolve_device
from cnnvis.errors import ConfigError, DataError
from cnnvis.io import csv_number, to_jsonable, write_csv, write_json
from cnnvis.metrics.classification import ClassMetrics, class_metrics, confusion_matrix
from cnnvis.metrics.faithfulness import (
    DEFAULT_SENSITIVITY_SAMPLES,
    DEFAULT_SUBSET,
    FaithfulnessReport,
    heatmap_methods,
)
from cnnvis.projector import DEFAULT_IMAGES as DEFAULT_EMBEDDING_IMAGES
from cnnvis.run import EVALUATION_DIR, EvaluationFiles, LoadedRun
from cnnvis.sources import load_source, write_source_file
from cnnvis.training.loop import predict_split
from cnnvis.vis.hooks import get_layer
from cnnvis.vis.registry import get_method

DEFAULT_WRONG = 16  #: confidently wrong images shown


@dataclass
class WrongImage:
    index: int  #: position in the split (``test #index``)
    true: int  #: row of :attr:`Evaluation.class_names`
    predicted: int  #: column of :attr:`Evaluation.class_names` (:data:`OTHER` for a class the data lacks)
    probability: float  #: the predicted (wrong) class's softmax probability
    source: str = ""  #: the image file (a ``--data`` folder), else ``"test #index"``
    #: the class the model predicted, by name, also where the table counts it as :data:`OTHER`
    predicted_name: str = ""

    @property
    def where(self) -> str:
        return self.source or f"#{self.index}"


@dataclass
class Evaluation:
    """Everything :func:`evaluate_run` measured on one split."""

    split: str
    count: int
    accuracy: float
    loss: float
    class_names: list[str]
    confusion: Tensor  #: [k, k] int64; rows: true class, columns: predicted class
    per_class: list[ClassMetrics]
    wrong_count: int  #: all misclassified images of the split
    confidently_wrong: list[WrongImage]  #: the most confident mistakes, most confident first
    wrong_images: Tensor = field(repr=False)  #: [m, C, H, W] those images, normalised, on the CPU
    checkpoint: str = ""
    epoch: int = 0
    architecture: str = ""
    untrained: bool = False  #: the model had finished no epoch (random start-up weights)
    data: str = ""  #: the labelled folder evaluated on (``--data``); empty: the run's own split

    @property
    def set_name(self) -> str:
        """What outputs call the images: the split, or the ``--data`` folder's name (its images are
        the model's "test" split only in name)."""
        return (Path(self.data).resolve().name or self.data) if self.data else self.split  # "--data ." too

    @property
    def images_text(self) -> str:
        """``"test images"`` / ``"images of folder flowers"``, for titles."""
        return f"images of folder {self.set_name}" if self.data else f"{self.split} images"

    def predicted_name(self, wrong: WrongImage) -> str:
        return wrong.predicted_name or self.class_names[wrong.predicted]

    @property
    def macro_f1(self) -> float:
        values = [c.f1 for c in self.per_class if math.isfinite(c.f1)]
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes ``null`` through :func:`cnnvis.io.to_jsonable`)."""
        names = self.class_names
        return to_jsonable({
            "split": self.split,
            "images": self.count,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "macro_f1": self.macro_f1,
            "misclassified": self.wrong_count,
            "class_names": names,
            "per_class": self.per_class,
            "confusion_matrix": {"rows": "true class", "columns": "predicted class", "counts": self.confusion.tolist()},
            "data": self.data,
            "confidently_wrong": [
                {"image": w.source or f"{self.split} #{w.index}", "index": w.index, "true": names[w.true],
                 "predicted": self.predicted_name(w), "probability": w.probability}
                for w in self.confidently_wrong
            ],
            "checkpoint": self.checkpoint,
            "epoch": self.epoch,
            "untrained": self.untrained,
            "architecture": self.architecture,
        })

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        """The evaluation :meth:`to_dict` wrote (``metrics.json``; the images themselves are not in
        it: ``wrong_images`` comes back empty). A missing field is a ``KeyError``."""
        names = list(data["class_names"])
        nan = float("nan")
        number = lambda v: nan if v is None else float(v)  # noqa: E731 - null is how NaN was written
        return cls(
            split=data["split"], count=int(data["images"]), accuracy=float(data["accuracy"]), loss=number(data["loss"]),
            class_names=names, confusion=torch.tensor(data["confusion_matrix"]["counts"], dtype=torch.int64),
            per_class=[ClassMetrics(c["name"], int(c["support"]), int(c["predicted"]), number(c["precision"]),
                                    number(c["recall"]), number(c["f1"]), number(c["accuracy"])) for c in data["per_class"]],
            wrong_count=int(data["misclassified"]),
            confidently_wrong=[WrongImage(int(w["index"]), names.index(w["true"]), _column(names, w["predicted"]),
                                          float(w["probability"]), str(w.get("image", "")), str(w["predicted"]))
                               for w in data["confidently_wrong"]],
            wrong_images=torch.zeros(0), checkpoint=str(data.get("checkpoint", "")), epoch=int(data.get("epoch", 0)),
            architecture=str(data.get("architecture", "")), untrained=bool(data.get("untrained", False)),
            data=str(data.get("data") or ""),
        )


def _column(names: list[str], predicted: str) -> int:
    """The table column of a predicted class: its own, or :data:`OTHER` (a class the folder lacks)."""
    return names.index(predicted) if predicted in names else names.index(OTHER)


@dataclass
class EvaluationPaths:
    metrics: Path
    per_class: Path
    confusion_matrix: Path
    confidently_wrong: Path | None  #: None when nothing was misclassified


# ----------------------------------------------------------------------------------- computing


def evaluate_run(run: LoadedRun, split: str = "test", wrong: int = DEFAULT_WRONG, bundle: DataBundle | None = None) -> Evaluation:
    """Accuracy, loss, confusion matrix, per-class metrics and the ``wrong`` most confident mistakes
    of ``split``, with the same weights and mixed precision as the trainer's own test."""
    if wrong < 0:
        raise ConfigError(f"wrong {wrong}: give 0 or more", parameter="wrong")
    check_split(split)
    bundle = bundle or run.data()
    # the same weights, precision and test-time flip as the trainer's own test (another model: as it is)
    amp, flip = (run.config.train.amp, run.config.train.tta_flip) if run.config is not None else ("off", False)
    logits, targets = predict_split(run.model, bundle.split(split), run.device, amp_dtype(amp, run.device), flip)
    if targets.numel() == 0:
        raise DataError(f"the {split} split of {run.run_dir} is empty: nothing to evaluate")
    names = list(run.spec.class_names)
    probs = logits.softmax(1)
    loss = float(F.cross_entropy(logits, targets))
    confidence, predicted = probs.max(1)
    model_names, model_predicted = names, predicted  # the wrong images name the class, even one counted as other
    if bundle.label_subset is not None:  # a few of many classes: tables of those, every other prediction "other"
        names, targets, predicted = _focus(names, bundle.label_subset, targets, predicted)
    k = len(names)
    matrix = confusion_matrix(targets, predicted, k)
    mistakes = (predicted != targets).nonzero().flatten()
    # Most confident first; the split order breaks ties so the pick is the same on every call.
    order = mistakes[torch.argsort(-confidence[mistakes], stable=True)][:wrong].tolist()
    dataset = bundle.eval_sets[split]  # indexed in the loader's (unshuffled) order
    shown = [WrongImage(i, int(targets[i]), int(predicted[i]), float(confidence[i]), bundle.source(split, i),
                        model_names[int(model_predicted[i])]) for i in order]
    images = torch.stack([dataset[i][0] for i in order]).float() if order else torch.zeros(0)
    return Evaluation(
        split=split,
        count=int(targets.numel()),
        accuracy=float((predicted == targets).double().mean()),
        loss=loss,
        class_names=names,
        confusion=matrix,
        per_class=class_metrics(matrix, names),
        wrong_count=int(mistakes.numel()),
        confidently_wrong=shown,
        wrong_images=images,
        checkpoint=run.weights,
        epoch=run.epoch,
        architecture=run.architecture,
        untrained=run.untrained,
        data=str(bundle.folder) if bundle.folder is not None else "",
    )


OTHER = "other"  #: the column of predictions outside a labelled folder's classes


def _focus(names: list[str], present: list[int], targets: Tensor, predicted: Tensor) -> tuple[list[str], Tensor, Tensor]:
    """Class names and labels re-indexed to the ``present`` classes plus :data:`OTHER` (predictions
    of any class the data does not have): a 1000-class model on five folders gets a 6x6 matrix."""
    index = torch.full((len(names),), len(present), dtype=torch.long)
    index[torch.tensor(present)] = torch.arange(len(present))
    index = index.to(targets.device)
    return [names[i] for i in present] + [OTHER], index[targets], index[predicted]


# ----------------------------------------------------------------------------------- writing


def _short_source(path: str) -> str:
    """``daisy/img_3.jpg``: a caption under a small picture has room for the class folder and the
    file name; metrics.json and the sidecar keep the whole path."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def write_evaluation(evaluation: Evaluation, run: LoadedRun, out_dir: str | Path | None = None, writer: Any = None) -> EvaluationPaths:
    """Write the files listed in the module docstring to ``out_dir`` (default ``RUN/evaluation``);
    with ``writer`` (a ``SummaryWriter``) also the pictures and scalars to TensorBoard."""
    ev = evaluation
    out = Path(out_dir) if out_dir is not None else run.run_dir / EVALUATION_DIR
    names = ev.class_names
    where = run.label
    common = {"split": ev.split, **({"data": ev.data} if ev.data else {}), "checkpoint": ev.checkpoint, "epoch": ev.epoch, "untrained": ev.untrained,
              "architecture": ev.architecture}

    # short title: the figure is sized by the class count and a long title would be cut off
    label = f"folder {ev.set_name}" if ev.data else f"{ev.split} set"
    matrix_image = plots.confusion_matrix_image(ev.confusion, names, f"{label}, {plots.count(ev.count, 'image')}"
                                                + (" · UNTRAINED" if ev.untrained else ""))
    confusion_png = plots.save_png(plots.tensor_to_png(matrix_image), out / EvaluationFiles.CONFUSION_MATRIX,
                                   {**common, "rows": "true class", "columns": "predicted class",
                                    "class_names": names, "counts": ev.confusion.tolist()})
    wrong_png = None
    if ev.confidently_wrong:
        captions = [f"{_short_source(w.where) if w.source else f'{ev.split} #{w.index}'}\n"
                    + plots.format_caption(names[w.true], ev.predicted_name(w), w.probability) for w in ev.confidently_wrong]
        title = (f"the {len(ev.confidently_wrong)} most confidently wrong of {ev.wrong_count} misclassified "
                 f"{ev.images_text} · {where}")
        png = plots.image_grid_figure(ev.wrong_images, captions, title, mean=run.spec.mean, std=run.spec.std,
                                      columns=min(8, len(captions)), caption_colors=["#cf222e"] * len(captions))
        wrong_png = plots.save_png(png, out / EvaluationFiles.CONFIDENTLY_WRONG,
                                   {**common, "images": ev.to_dict()["confidently_wrong"], "misclassified": ev.wrong_count})
        if writer is not None:
            writer.add_image("evaluate/confidently_wrong", plots.figure_to_tensor(png), run.epoch, dataformats="CHW")

    rows = [[c.name, c.support, c.predicted, *(csv_number(v) for v in (c.precision, c.recall, c.f1, c.accuracy))]
            for c in ev.per_class]
    try:
        per_class = write_csv(out / EvaluationFiles.PER_CLASS,
                              ["class", "support", "predicted", "precision", "recall", "f1", "accuracy_one_vs_rest"], rows)
        metrics = write_json(out / EvaluationFiles.METRICS, ev.to_dict())
    except OSError as exc:
        raise DataError(f"cannot write the evaluation into {out}: {exc.strerror or exc}") from None

    if writer is not None:
        writer.add_image("evaluate/confusion_matrix", matrix_image, run.epoch, dataformats="CHW")
        writer.add_scalar(f"evaluate/accuracy_{ev.split}", ev.accuracy, run.epoch)
        writer.add_scalar(f"evaluate/loss_{ev.split}", ev.loss, run.epoch)
    return EvaluationPaths(metrics, per_class, confusion_png, wrong_png)


# ----------------------------------------------------------------------------------- the command


@dataclass
class EvaluateOutcome:
    """Everything ``cnnvis evaluate`` computed and wrote."""

    evaluation: Evaluation
    files: EvaluationPaths
    faithfulness: FaithfulnessReport | None = None  #: with ``explanations``
    faithfulness_files: FaithfulnessFiles | None = None
    out_dir: Path | None = None
    run: LoadedRun | None = None  #: the run that was evaluated
    tensorboard: bool = False  #: whether pictures and scalars also went to TensorBoard
    embedding: Any = None  #: with ``embeddings``: the :class:`cnnvis.projector.Embedding` written
    skipped_images: list[tuple[str, str]] = field(default_factory=list)  #: unreadable files of a --data folder


def evaluate_command(
    source: LoadedRun | str | Path,
    *,
    split: str = "test",
    wrong: int = DEFAULT_WRONG,
    out_dir: str | Path | None = None,
    writer: Any = None,
    explanations: bool = False,
    images: int = 32,
    methods: list[str] | None = None,
    layer: str | None = None,
    steps: int = 16,
    device: str = "auto",
    tensorboard: bool = False,
    allow_untrained: bool = False,
    subset_images: int = DEFAULT_SUBSET,
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES,
    road: bool = True,
    embeddings: bool = False,
    embedding_images: int = DEFAULT_EMBEDDING_IMAGES,
    model_options: dict[str, Any] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> EvaluateOutcome:
    """What ``cnnvis evaluate`` does: metrics and pictures, then (``explanations``) the faithfulness
    table, all written to ``out_dir`` (default ``RUN/evaluation``) and to ``writer`` (or, with
    ``tensorboard``, to the run's own TensorBoard events).

    ``source`` is a loaded run, or any MODEL :func:`cnnvis.sources.load_source` takes, loaded onto
    ``device`` with ``model_options`` (``weights``, ``classes``, ``size``, ``mean``, ``std``,
    ``data``: the labelled image folder a model that is not a run is evaluated on, ``runs_dir``).
    ``subset_images``, ``sensitivity_samples`` (0: off) and ``road`` as for
    :func:`cnnvis.metrics.faithfulness`. ``embeddings``: also the penultimate features of
    ``embedding_images`` images of the split to TensorBoard's projector (:mod:`cnnvis.projector`),
    into ``writer`` or the run's own events.
    """
    from cnnvis.training.summaries import LazyWriter

    if embeddings and embedding_images < 1:
        raise ConfigError(f"embedding images {embedding_images}: give at least 1", parameter="embedding_images")
    run = source if isinstance(source, LoadedRun) else load_source(
        source, device=resolve_device(device), allow_untrained=allow_untrained, **(model_options or {}))
    write_source_file(run)
    own_writer = LazyWriter(run.run_dir) if (tensorboard or embeddings) and writer is None else None
    trust = {"subset_images": subset_images, "sensitivity_samples": sensitivity_samples}
    if not road:
        trust["road_fractions"] = ()
    logs = writer or (own_writer if tensorboard else None)  # --embeddings writes there even without --tensorboard
    projector = (writer or own_writer, embedding_images) if embeddings else None
    try:
        return _evaluate(run, split, wrong, out_dir, logs, explanations, images, methods, layer, steps, on_progress,
                         trust, projector)
    finally:
        if own_writer is not None:
            own_writer.close()


def _evaluate(run: LoadedRun, split: str, wrong: int, out_dir: str | Path | None, writer: Any, explanations: bool,
              images: int, methods: list[str] | None, layer: str | None, steps: int,
              on_progress: Callable[[str], None] | None, trust: dict[str, Any],
              projector: tuple[Any, int] | None) -> EvaluateOutcome:
    progress = on_progress or (lambda text: None)
    out = Path(out_dir) if out_dir is not None else run.run_dir / EVALUATION_DIR
    check_split(split)
    if explanations:  # fail on a bad option before the evaluation pass, not after it
        if images < 1:
            raise ConfigError(f"images {images}: give at least 1", parameter="images")
        if trust["subset_images"] < 1:
            raise ConfigError(f"subset images {trust['subset_images']}: give at least 1", parameter="subset_images")
        if trust["sensitivity_samples"] < 0:
            raise ConfigError(f"sensitivity samples {trust['sensitivity_samples']}: give 0 (off) or more",
                              parameter="sensitivity_samples")
        for name in methods or []:
            if name != ALL_METHODS and name not in heatmap_methods():
                get_method(name)  # a mistyped name: one line with the nearest names, as in visualize
                raise ConfigError(f"method {name}: not a heatmap method; the faithfulness checks apply to: "
                                  f"{', '.join(heatmap_methods())}", parameter="method")
        if not methods:  # as visualize: every heatmap method but the slow ones; "all": every one
            methods = [m for m in heatmap_methods() if m not in SLOW_METHODS]
        elif ALL_METHODS in methods:
            methods = heatmap_methods()
        if layer is not None:
            get_layer(run.model, layer)
    progress("reading the data")
    bundle = run.data()
    progress(f"evaluating the images of {bundle.folder}" if bundle.folder is not None else f"evaluating the {split} split")
    evaluation = evaluate_run(run, split, wrong, bundle)
    files = write_evaluation(evaluation, run, out, writer)
    outcome = EvaluateOutcome(evaluation, files, out_dir=out, run=run, tensorboard=writer is not None,
                              skipped_images=list(bundle.skipped) if bundle.folder is not None else [])
    if explanations:
        report = check_explanations(run, bundle, split, images, methods=methods or None, layer=layer, steps=steps, on_progress=progress,
                                    **trust)
        title = f"deletion and insertion on {report.images} {evaluation.images_text} · {run.label}"
        outcome.faithfulness = report
        outcome.faithfulness_files = write_faithfulness(report, out, writer, run.epoch, title)
    if projector is not None:
        from cnnvis.projector import log_embedding

        progress(f"projector: penultimate features of {split} images")
        outcome.embedding = log_embedding(projector[0], run.model, bundle.eval_sets[split], run.spec.class_names,
                                          limit=projector[1], device=run.device, mean=run.spec.mean, std=run.spec.std,
                                          step=run.epoch, split=split)
    return outcome
