"""TensorBoard's embedding projector: where the model puts each test image just before it decides.

The features are the input of the model's last ``nn.Linear`` (the classifier head; for the
project's CNNs and torchvision's ResNets the pooled penultimate activations), caught with a
forward pre-hook during one ordinary forward pass, so any model with a linear head works without
knowing its layer names. :func:`log_embedding` writes them with each image as a sprite thumbnail
and its true and predicted class names as labels; TensorBoard's *Projector* tab then shows
whether the classes form clusters (PCA, t-SNE or UMAP, computed in the browser).

Used at the end of training (``log.embeddings`` test images, 0: off) and by
``cnnvis evaluate RUN --embeddings``. Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from cnnvis import plots
from cnnvis.errors import ConfigError, UnsupportedModelError
from cnnvis.vis.hooks import model_state

DEFAULT_IMAGES = 1000  #: test images in the projector
SPRITE_SIDE = 32  #: thumbnail side in pixels: 1000 of them make a 1024-pixel sprite sheet
BATCH = 64
TAG = "penultimate"


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` registered in the model (its classifier head), with its name."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UnsupportedModelError("the model has no nn.Linear layer: no penultimate features to project")
    return found[-1]


@dataclass
class Embedding:
    features: Tensor  #: [M, D] float, CPU: the final linear layer's input
    labels: Tensor  #: [M] true classes
    predicted: Tensor  #: [M]
    thumbnails: Tensor  #: [M, 3, s, s] in [0, 1]: the sprite images
    sources: list[str]  #: ``"test #i"``: where each row came from
    layer: str  #: the linear layer whose input the features are


def penultimate_features(model: nn.Module, dataset: Dataset, *, limit: int = DEFAULT_IMAGES, device: torch.device | str = "cpu",
                         mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), split: str = "test") -> Embedding:
    """The final linear layer's input for ``limit`` images spread evenly over ``dataset`` (the
    rule of :meth:`~cnnvis.data.DataBundle.fixed_batch`), ``BATCH`` at a time on ``device``.
    ``mean`` / ``std`` undo the normalisation for the thumbnails."""
    if limit < 1:
        raise ConfigError(f"embedding images {limit}: give at least 1", parameter="embedding_images")
    name, head = final_linear(model)
    count = min(limit, len(dataset))
    step = max(len(dataset) // max(count, 1), 1)
    indices = [i * step for i in range(count)]
    caught: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: caught.append(args[0].detach().flatten(1).float()))
    features, labels, predicted, thumbs = [], [], [], []
    try:
        with model_state(model, grad=False):
            for first in range(0, count, BATCH):
                items = [dataset[i] for i in indices[first : first + BATCH]]
                images = torch.stack([x for x, _ in items]).to(device)
                caught.clear()
                logits = model(images)
                if len(caught) != 1:
                    raise UnsupportedModelError(f"the model's last linear layer {name} ran {len(caught)} times in one "
                                                "forward pass: it is not a classifier head")
                features.append(caught[0].cpu())
                predicted.append(logits.argmax(1).cpu())
                labels.append(torch.tensor([int(y) for _, y in items]))
                thumbs.append(_thumbnails(images.float().cpu(), mean, std))
    finally:
        handle.remove()
    return Embedding(torch.cat(features), torch.cat(labels), torch.cat(predicted), torch.cat(thumbs),
                     [f"{split} #{i}" for i in indices], name)


def _thumbnails(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """RGB in [0, 1], at most :data:`SPRITE_SIDE` pixels a side (area-averaged, not aliased)."""
    shown = plots.to_rgb(plots.denormalize(images, mean, std)).float().clamp(0, 1)
    side = max(shown.shape[-2:])
    if side > SPRITE_SIDE:
        size = tuple(max(1, round(s * SPRITE_SIDE / side)) for s in shown.shape[-2:])
        shown = F.interpolate(shown, size=size, mode="area")
    return shown


def write_embedding(writer: Any, embedding: Embedding, class_names: Sequence[str], step: int = 0, tag: str = TAG) -> None:
    """The projector files (``projector_config.pbtxt``, ``tensors.tsv``, ``metadata.tsv``,
    ``sprite.png``) through ``writer`` (a ``SummaryWriter``): one row per image, labelled with its
    true and predicted class names and where it came from."""
    names = list(class_names)
    metadata = [[names[t], names[p], source] for t, p, source in
                zip(embedding.labels.tolist(), embedding.predicted.tolist(), embedding.sources)]
    writer.add_embedding(embedding.features, metadata=metadata, label_img=embedding.thumbnails, global_step=step,
                         tag=tag, metadata_header=["class", "predicted", "image"])


def log_embedding(writer: Any, model: nn.Module, dataset: Dataset, class_names: Sequence[str], *,
                  limit: int = DEFAULT_IMAGES, device: torch.device | str = "cpu", mean: Sequence[float] = (0.0,),
                  std: Sequence[float] = (1.0,), step: int = 0, split: str = "test", tag: str = TAG) -> Embedding:
    """:func:`penultimate_features` of ``dataset`` written with :func:`write_embedding`; returns them."""
    embedding = penultimate_features(model, dataset, limit=limit, device=device, mean=mean, std=std, split=split)
    write_embedding(writer, embedding, class_names, step, tag)
    return embedding
