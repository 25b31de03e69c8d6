"""Plain functions over a split: the loss and accuracy, every logit, the misclassified images.

Each runs in eval mode under ``torch.inference_mode`` (the model's own train/eval flags are
restored), keeps sums on the device and copies to the host once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from cnnvis.device import autocast, eval_mode, memory_format
from cnnvis.training.distributed import reduce_sum

Batches = Iterable[tuple[Tensor, Tensor]]


def predict(model: nn.Module, images: Tensor, tta_flip: bool = False) -> Tensor:
    """Logits of a batch; with ``tta_flip`` the mean of the image's and its mirror image's logits."""
    logits = model(images)
    return (logits + model(images.flip(-1))) / 2 if tta_flip else logits


def evaluate(model: nn.Module, batches: Batches, device: torch.device, amp: torch.dtype | None = None,
             tta_flip: bool = False) -> dict[str, float]:
    """Cross-entropy (no label smoothing) and accuracy over a split; under torchrun, over every
    rank's share of it (each image counted once)."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    layout = memory_format(model)
    with eval_mode(model), torch.inference_mode(), autocast(device, amp):
        for images, labels in batches:
            images = images.to(device, non_blocking=True, memory_format=layout)
            labels = labels.to(device, non_blocking=True)
            logits = predict(model, images, tta_flip).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
            count += labels.shape[0]
    totals = reduce_sum(torch.stack([loss_sum, correct.double(), torch.tensor(float(count), device=device)]))
    loss, right, count = totals.tolist()  # the one copy to the host
    return {"loss": loss / max(count, 1), "accuracy": right / max(count, 1)}


def predict_split(model: nn.Module, batches: Batches, device: torch.device, amp: torch.dtype | None = None,
                  tta_flip: bool = False) -> tuple[Tensor, Tensor]:
    """``(logits [N, classes], targets [N])`` of a whole split: one pass, gathered on the device,
    moved to the CPU once."""
    logits, targets = [], []
    layout = memory_format(model)
    with eval_mode(model), torch.inference_mode(), autocast(device, amp):
        for images, labels in batches:
            logits.append(predict(model, images.to(device, non_blocking=True, memory_format=layout), tta_flip).float())
            targets.append(labels.to(device, non_blocking=True))
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits).cpu(), torch.cat(targets).long().cpu()


def split_scores(logits: Tensor, targets: Tensor, device: torch.device) -> dict[str, float]:
    """Cross-entropy and accuracy of a split's logits (from :func:`predict_split`); under torchrun,
    of every rank's share together."""
    zero = torch.zeros((), dtype=torch.float64)
    loss = nn.functional.cross_entropy(logits.double(), targets, reduction="sum") if targets.numel() else zero
    right = (logits.argmax(1) == targets).sum().double() if targets.numel() else zero
    totals = torch.stack([loss, right, torch.tensor(float(targets.numel()), dtype=torch.float64)]).to(device)
    loss, right, count = reduce_sum(totals).tolist()
    return {"loss": loss / max(count, 1), "accuracy": right / max(count, 1)}


def find_misclassified(
    model: nn.Module, batches: Batches, device: torch.device, limit: int, amp: torch.dtype | None = None,
    tta_flip: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Up to ``limit`` misclassified images of a split, in split order: ``(images [n,C,H,W] on the
    CPU, true [n], predicted [n], predicted probability [n])``. Stops reading once it has enough."""
    found: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    count = 0
    with eval_mode(model), torch.inference_mode(), autocast(device, amp):
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            prob, pred = predict(model, images, tta_flip).float().softmax(1).max(1)
            wrong = (pred != labels).nonzero().flatten()[: limit - count]  # one sync per batch
            if wrong.numel():
                found.append((images[wrong], labels[wrong], pred[wrong], prob[wrong]))
                count += wrong.numel()
            if count >= limit:
                break
    if not found:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    images, true, pred, prob = (torch.cat(parts).cpu() for parts in zip(*found))
    return images.float(), true, pred, prob
