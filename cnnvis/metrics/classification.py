"""How good a classifier is: the confusion matrix and per-class precision, recall, F1 and accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ClassMetrics:
    """One row of the per-class table.

    ``accuracy`` is the one-vs-rest accuracy ``(TP + TN) / N`` of "is it this class?": the usual
    "per-class accuracy" (correct / images of the class) is already the ``recall`` column.
    Undefined ratios (a class never predicted has no precision) are NaN.
    """

    name: str
    support: int  #: test images of this class
    predicted: int  #: test images predicted as this class
    precision: float
    recall: float
    f1: float
    accuracy: float


def confusion_matrix(targets: Tensor, predicted: Tensor, num_classes: int) -> Tensor:
    """``[k, k]`` counts, rows: true class, columns: predicted class."""
    k = num_classes
    return torch.bincount(targets.long() * k + predicted.long(), minlength=k * k).reshape(k, k)


def class_metrics(matrix: Tensor, class_names: list[str]) -> list[ClassMetrics]:
    """Precision, recall, F1 and one-vs-rest accuracy of every class from a confusion matrix."""
    m = matrix.double()
    total = float(m.sum())
    tp = m.diagonal()
    support = m.sum(1)
    predicted = m.sum(0)
    nan = float("nan")
    rows = []
    for i, name in enumerate(class_names):
        t, s, p = float(tp[i]), float(support[i]), float(predicted[i])
        precision = t / p if p else nan
        recall = t / s if s else nan
        f1 = 2 * t / (s + p) if s + p else nan  # = harmonic mean of precision and recall, defined more often
        tn = total - s - p + t
        rows.append(ClassMetrics(name, int(s), int(p), precision, recall, f1, (t + tn) / total if total else nan))
    return rows
