"""The pictures of the ``images`` kind of methods for ``cnnvis visualize``: synthetic class images
(``maximize``, made from noise) and dreamed versions of the explained images (``deepdream``).

Each function takes the :class:`~cnnvis.commands.visualize.Visualizer` (its run, images, captions
and writer) and the method's spec; computing stays in :mod:`cnnvis.vis`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cnnvis import plots
from cnnvis.vis.activations import activations
from cnnvis.vis.deepdream import dream_layer, mean_square, octave_sizes
from cnnvis.vis.hooks import model_state
from cnnvis.vis.maximize import maximize_settings
from cnnvis.vis.registry import MethodSpec, run_method

if TYPE_CHECKING:
    from cnnvis.commands.visualize import Visualizer

MAX_MAXIMIZE_CLASSES = 16  #: "the network's idea of each class", for up to this many classes


def draw_maximize(v: Visualizer, spec: MethodSpec, layers: Sequence[str]) -> None:
    """One synthetic image per class (all of up to :data:`MAX_MAXIMIZE_CLASSES`, else the classes the
    images are explained for; or the named target);
    with ``layers``, one per channel of each layer (the first :data:`MAX_MAXIMIZE_CLASSES`) instead."""
    if layers:
        for part, layer in enumerate(layers):
            v._part = (part, len(layers))
            _draw_channels(v, spec, layer)
        return
    from cnnvis.commands.visualize import SEED

    started = time.perf_counter()
    run = v.run
    names = run.spec.class_names
    if isinstance(v.target_spec, int):
        classes = [int(v.target_spec)]
    elif len(names) <= MAX_MAXIMIZE_CLASSES:
        classes = list(range(len(names)))
    else:  # too many to draw each (ImageNet's 1000): the classes the images are explained for
        classes = list(dict.fromkeys(v.target_list))[:MAX_MAXIMIZE_CLASSES]
    shape_of_each = torch.zeros(len(classes), *v.images.shape[1:], device=run.device)
    settings = {"mean": list(run.spec.mean), "std": list(run.spec.std), **v.method_params(spec.name)}
    made = run_method(spec.name, run.model, shape_of_each, classes, seed=SEED, **settings)
    with torch.no_grad(), model_state(run.model, grad=False):
        probs = F.softmax(run.model(made).float(), dim=1).cpu()
    captions = [f"{v._name(c)}: {plots.format_caption(prob=float(probs[i, c]))}" for i, c in enumerate(classes)]
    recipe = maximize_settings(tuple(v.images.shape[1:]), settings.get("param", spec.defaults["param"]))
    how = "decorrelated Fourier image, robust to jitter/scale/rotation" if recipe["param"] == "fourier" else "pixels"
    png = plots.image_grid_figure(made.detach().float().cpu(), captions,
                                  v._title(f"the network's idea of each class (activation maximisation, {how})", None),
                                  mean=run.spec.mean, std=run.spec.std)
    # made from noise, not from the explained images: the sidecar names the classes drawn, nothing per image
    parameters = {**spec.defaults, **settings, "seed": SEED, "recipe": recipe}
    sidecar = {**v._model_fields(spec.name, None, parameters),
               "classes": [v._name(c) for c in classes],
               "probability": [float(probs[i, c]) for i, c in enumerate(classes)]}
    v._write(png, spec.name, None, "classes", sidecar, plots.count(len(classes), "class"), started)


def _draw_channels(v: Visualizer, spec: MethodSpec, layer: str) -> None:
    """What each of the first channels of ``layer`` responds to: its mean activation maximised."""
    from cnnvis.commands.visualize import SEED

    started = time.perf_counter()
    run = v.run
    channels = list(range(min(activations(run.model, v.images[:1], layer)[layer].shape[1], MAX_MAXIMIZE_CLASSES)))
    settings = {"mean": list(run.spec.mean), "std": list(run.spec.std), **v.method_params(spec.name)}
    shape_of_each = torch.zeros(len(channels), *v.images.shape[1:], device=run.device)
    made = run_method(spec.name, run.model, shape_of_each, channels, layer, seed=SEED, **settings)
    recipe = maximize_settings(tuple(v.images.shape[1:]), settings.get("param", spec.defaults["param"]), layer)
    png = plots.image_grid_figure(made.detach().float().cpu(), [f"channel {c}" for c in channels],
                                  v._title("what each channel responds to (its mean activation maximised)", layer),
                                  mean=run.spec.mean, std=run.spec.std)
    parameters = {**spec.defaults, **settings, "seed": SEED, "recipe": recipe}
    sidecar = {**v._model_fields(spec.name, layer, parameters), "objective": "channel", "channels": channels}
    v._write(png, spec.name, layer, layer, sidecar, plots.count(len(channels), "channel"), started)


def draw_deepdream(v: Visualizer, spec: MethodSpec, layers: Sequence[str]) -> None:
    """Each explained image above its dream, one picture per layer (default :func:`dream_layer`)."""
    from cnnvis.commands.visualize import SEED

    run = v.run
    chosen = list(layers) or [dream_layer(run.model, v.images[:1])]
    captions, colors = v._captions()
    settings = {"mean": list(run.spec.mean), "std": list(run.spec.std), **v.method_params(spec.name)}
    for part, layer in enumerate(chosen):
        v._part = (part, len(chosen))
        started = time.perf_counter()
        dreams = run_method(spec.name, run.model, v.images, v.targets, layer, seed=SEED, **settings)
        before, after = mean_square(run.model, v.images, layer).tolist(), mean_square(run.model, dreams, layer).tolist()
        gains = [f"dream: mean square x{a / b:.1f}" if b > 0 else "dream" for a, b in zip(after, before)]
        png = plots.image_grid_figure(
            torch.cat([v.batch.images, dreams.detach().float().cpu()]), [*captions, *gains],
            v._title("DeepDream: each image (top) changed to amplify what the layer detects (below)", layer),
            mean=run.spec.mean, std=run.spec.std, columns=len(captions), caption_colors=[*colors, *[None] * len(gains)])
        parameters = {**spec.defaults, **settings, "seed": SEED}
        h, w = v.images.shape[2:]
        sidecar = v._sidecar(spec.name, layer, parameters,
                             octave_sizes=[list(s) for s in octave_sizes(h, w, spec.defaults["octaves"],
                                                                          spec.defaults["octave_scale"])],
                             layer_mean_square_before=before, layer_mean_square_after=after)
        v._write(png, spec.name, layer, layer, sidecar, plots.count(len(captions), "image"), started)


#: method name -> its drawing
DRAW: dict[str, Callable[[Any, MethodSpec, Sequence[str]], None]] = {
    "maximize": draw_maximize, "deepdream": draw_deepdream,
}
