"""Pictures from tensors: heatmaps, grids, charts, written as PNG with a JSON sidecar.

Computing lives in :mod:`cnnvis.vis` and :mod:`cnnvis.metrics`; everything here is a function of
tensors and numbers that returns pixels. Each ``*_figure`` renders to PNG, releases its figure and
returns :class:`PNG` bytes; pass ``path=`` to also write the file (atomically) with a sidecar.

* ``base.py``      -- :class:`PNG`, the canvas, captions, ``figure_to_png`` / ``figure_to_tensor``, ``save_png``
* ``color.py``     -- denormalising images, colour maps, overlays
* ``heatmaps.py``  -- input | map | overlay figures
* ``grids.py``     -- captioned image grids, feature maps per layer
* ``filters.py``   -- convolution filters (figure, and a tile grid for TensorBoard)
* ``charts.py``    -- confusion matrix, training curves, deletion / insertion curves
"""

from cnnvis.plots.base import (
    PNG,
    count,
    figure_to_png,
    figure_to_tensor,
    format_caption,
    save_png,
    tensor_to_png,
)
from cnnvis.plots.charts import (
    confusion_matrix_image,
    faithfulness_curves_figure,
    training_curves_figure,
)
from cnnvis.plots.color import (
    DEFAULT_CMAP,
    DIVERGING_CMAP,
    colorize,
    denormalize,
    overlay,
    to_rgb,
)
from cnnvis.plots.filters import filter_grid_figure, filter_tiles
from cnnvis.plots.grids import activation_grid_figure, image_grid_figure
from cnnvis.plots.heatmaps import heatmap_figure
from cnnvis.plots.occlusion import (
    changed_classes,
    changed_windows,
    class_palette,
    occlusion_classes_figure,
)

__all__ = [
    "DEFAULT_CMAP", "DIVERGING_CMAP", "PNG", "activation_grid_figure", "changed_classes", "changed_windows", "class_palette", "colorize",
    "confusion_matrix_image", "count", "denormalize", "faithfulness_curves_figure", "figure_to_png", "figure_to_tensor",
    "filter_grid_figure", "filter_tiles", "format_caption", "heatmap_figure", "image_grid_figure",
    "occlusion_classes_figure", "overlay", "save_png", "tensor_to_png", "to_rgb", "training_curves_figure",
]
