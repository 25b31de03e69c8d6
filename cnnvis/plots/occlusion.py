"""The class an occluded image is predicted as, for each window position, with its key."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from matplotlib import colormaps

from cnnvis.plots.base import PNG
from cnnvis.plots.color import Stats, images01, to_rgb
from cnnvis.plots.grids import image_grid_figure

UNCHANGED_NOTE = "no tint: covering that window leaves the prediction unchanged"


def class_palette(count: int) -> torch.Tensor:
    """``[count, 3]`` distinct colours (tab10, tab20 beyond ten classes, repeating beyond twenty)."""
    palette = colormaps["tab20" if count > 10 else "tab10"]
    return torch.tensor([palette(i % palette.N)[:3] for i in range(count)], dtype=torch.float32)


def changed_windows(predicted: torch.Tensor, unoccluded: torch.Tensor) -> torch.Tensor:
    """``[N, nh, nw]`` bool: where covering the window changes the prediction of the whole image."""
    return predicted != unoccluded.to(predicted.device).view(-1, 1, 1)


def changed_classes(predicted: torch.Tensor, unoccluded: torch.Tensor) -> list[int]:
    """The classes some window's cover changes a prediction to: the picture's key."""
    return sorted(set(predicted[changed_windows(predicted, unoccluded)].tolist()))


def occlusion_classes_figure(
    images: torch.Tensor,
    predicted: torch.Tensor,
    unoccluded: torch.Tensor,
    class_names: Sequence[str],
    captions: Sequence[str],
    title: str,
    *,
    mean: Stats = None,
    std: Stats = None,
    caption_colors: Sequence[str | None] | None = None,
) -> PNG:
    """Each image tinted, at every window position where covering it changes the prediction, in
    the colour of the class predicted instead; positions where the prediction stays
    ``unoccluded`` (the class of the whole image) are left untinted. A key of the classes shown
    comes under the grid.

    ``predicted`` is ``[N, nh, nw]`` class indices (one per window position), ``unoccluded`` ``[N]``.
    """
    predicted, unoccluded = predicted.cpu(), unoccluded.cpu()
    colours = class_palette(len(class_names))
    shown = to_rgb(images01(images, mean, std))
    h, w = shown.shape[-2:]
    changed = changed_windows(predicted, unoccluded).float()[:, None]  # [N, 1, nh, nw]
    painted = colours[predicted].permute(0, 3, 1, 2)  # [N, 3, nh, nw]
    painted = F.interpolate(painted, size=(h, w), mode="nearest")
    changed = F.interpolate(changed, size=(h, w), mode="nearest")
    blended = torch.where(changed > 0.5, 0.4 * shown + 0.6 * painted, 0.8 * shown + 0.2)  # unchanged: faded
    lines = []
    for i, caption in enumerate(captions):
        moved = predicted[i][predicted[i] != unoccluded[i]]  # this image's changed windows
        if moved.numel() == 0:
            lines.append(f"{caption}\nno window changes the prediction")
            continue
        classes, counts = moved.unique(return_counts=True)
        order = counts.argsort(descending=True)[:3]
        share = ", ".join(f"{class_names[int(classes[j])]} {int(counts[j]) / predicted[i].numel():.0%}" for j in order)
        lines.append(f"{caption}\nchanged to: {share}")
    legend = [(class_names[c], tuple(colours[c].tolist())) for c in changed_classes(predicted, unoccluded)]
    return image_grid_figure(blended, lines, title, caption_colors=caption_colors, columns=4, legend=legend,
                             legend_note=UNCHANGED_NOTE)
