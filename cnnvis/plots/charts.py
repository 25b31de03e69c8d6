"""Charts: the confusion matrix, training curves, deletion / insertion curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from cnnvis.plots.base import PNG, figure_to_png, figure_to_tensor
from cnnvis.plots.occlusion import class_palette

if TYPE_CHECKING:
    from cnnvis.metrics.faithfulness import FaithfulnessReport


def confusion_matrix_image(matrix: Tensor, class_names: Sequence[str], title: str) -> Tensor:
    """Rows: true class, columns: predicted; colour = share of the row (recall), counts written in
    when there are few classes. Returns ``uint8 [3, H, W]``."""
    k = len(class_names)
    m = matrix.double()
    shares = (m / m.sum(1, keepdim=True).clamp_min(1)).numpy()
    side = min(16.0, max(4.0, 0.45 * k + 2.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    font = max(5.0, min(9.0, 140.0 / max(k, 1)))
    if k <= 40:
        ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=font)
        ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=font)
    if k <= 20:
        counts = matrix.long().numpy()
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if shares[i, j] > 0.5 else "black")
    accuracy = float(m.diagonal().sum() / m.sum().clamp_min(1))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}, accuracy {accuracy:.2%}", fontsize=10)
    fig.tight_layout()
    return figure_to_tensor(fig)


def training_curves_figure(history: Sequence[Mapping[str, Any]], title: str = "") -> PNG | None:
    """Loss and accuracy per epoch (train and validation) from ``metrics.jsonl`` epoch records
    as a PNG; ``None`` when no epoch finished."""
    fig = training_curves_plot(history, title)
    return None if fig is None else figure_to_png(fig)


def training_curves_plot(history: Sequence[Mapping[str, Any]], title: str = "") -> Figure | None:
    """The matplotlib figure :func:`training_curves_figure` draws."""
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.5" between two points
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if what == "accuracy":
            ax.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def faithfulness_curves_figure(report: FaithfulnessReport, title: str = "") -> PNG:
    """Mean deletion and insertion curves of every method, with the random order dashed."""
    # twenty methods: a legend inside the axes would hide the curves, so it goes under each panel
    legend_rows = math.ceil((len(report.rows) + 1) / 2)
    fig = Figure(figsize=(11, 4.0 + 0.2 * legend_rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    x = torch.linspace(0, 1, report.steps + 1).tolist()
    palette = [tuple(c) for c in class_palette(len(report.rows)).tolist()]  # distinct up to twenty methods
    for panel, (mode, random_curve, random_value, better) in enumerate((
        ("deletion", report.random_deletion_curve, report.random_deletion_auc, "lower is better"),
        ("insertion", report.random_insertion_curve, report.random_insertion_auc, "higher is better"),
    )):
        ax = fig.add_subplot(1, 2, panel + 1)
        for i, row in enumerate(report.rows):
            curve = row.deletion_curve if mode == "deletion" else row.insertion_curve
            value = row.deletion_auc if mode == "deletion" else row.insertion_auc
            ax.plot(x, curve, color=palette[i], linestyle="-" if row.passed else ":", linewidth=1.6,
                    label=f"{row.method} {value:.3f}" + ("" if row.passed else " (fails sanity)"))
        ax.plot(x, random_curve, color="black", linestyle="--", linewidth=1.2, label=f"random order {random_value:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"fraction of pixels {'deleted' if mode == 'deletion' else 'inserted'} (most important first)")
        ax.set_ylabel("target class probability (mean)")
        ax.set_title(f"{mode}: AUC, {better}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_to_png(fig)
