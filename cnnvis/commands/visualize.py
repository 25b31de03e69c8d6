"""Every visualisation of a trained run, written as PNGs (+ JSON sidecars) and TensorBoard images.

The library behind ``cnnvis visualize``: pick the images (fixed ones from the run's data, or the
user's own files preprocessed exactly like evaluation), resolve the targets once, run each method
of :data:`cnnvis.vis.METHODS` on the whole batch through :func:`~cnnvis.vis.registry.run_method`,
and draw the results with :mod:`cnnvis.plots`, the drawing chosen by the method's kind.
Computing stays in :mod:`cnnvis.vis`; this module only orchestrates.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cnnvis import plots
from cnnvis.catalog import ALL_METHODS, default_methods
from cnnvis.classnames import parse_target
from cnnvis.commands.inputs import (
    DEFAULT_IMAGES,
    ImageBatch,
    dataset_images,
    file_images,
)
from cnnvis.commands.visualize_images import DRAW as DRAW_IMAGES
from cnnvis.device import resolve_device
from cnnvis.errors import ConfigError, UnsupportedModelError
from cnnvis.run import VISUALIZATIONS_DIR, LoadedRun
from cnnvis.sources import load_source, write_source_file
from cnnvis.vis import progress
from cnnvis.vis.activations import stage_layers
from cnnvis.vis.filters import first_conv
from cnnvis.vis.hooks import default_layer, get_layer, model_state
from cnnvis.vis.maps import FLAT_SPREAD, flat_maps
from cnnvis.vis.occlusion import OcclusionMaps
from cnnvis.vis.registry import (
    METHODS,
    MethodSpec,
    get_method,
    run_method,
    split_params,
)

SEED = 0  #: seeds of the stochastic methods (smoothgrad noise, maximize start, deepdream jitter), kept in every sidecar


@dataclass
class Written:
    """One file ``visualize`` wrote, for the summary table."""

    method: str
    layer: str | None
    path: Path
    detail: str
    seconds: float


@dataclass
class Skipped:
    method: str
    reason: str


@dataclass
class Result:
    written: list[Written] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    out_dir: Path | None = None
    run: LoadedRun | None = None  #: the run that was explained
    tensorboard: bool = False  #: whether the pictures also went to its TensorBoard events
    interrupted: str | None = None  #: the method Ctrl-C stopped (its finished pictures are kept)
    not_run: list[str] = field(default_factory=list)  #: methods never started because of the interrupt
    notes: list[str] = field(default_factory=list)  #: lines to state once (preprocessing, image counts ...)
    skipped_images: list[tuple[str, str]] = field(default_factory=list)  #: unreadable image files: (path, why)


def select_methods(methods: Sequence[str] | None) -> tuple[list[str], bool]:
    """``(names to run, whether they were asked for by name)``: none given means every method but
    :data:`~cnnvis.catalog.SLOW_METHODS`; ``"all"`` among them means every method. When every
    method asked for by name is unsupported, that is an error rather than an empty result."""
    if methods and ALL_METHODS in methods:
        for name in methods:
            if name != ALL_METHODS:
                get_method(name)  # a typo next to "all" still fails, listing the valid names
        return list(METHODS), False
    if methods:
        return list(dict.fromkeys(methods)), True
    return list(default_methods()), False


# ----------------------------------------------------------------------------------- the run


class Visualizer:
    """Runs methods on one batch of images and writes their pictures.

    ``on_written`` is called after each file; ``on_progress(method, fraction)`` as a method
    starts (0), advances and ends (1); the CLI draws its bars from them. ``writer`` is an
    optional ``SummaryWriter`` that receives every picture as an image under ``visualize/...``.
    Ctrl-C during a method keeps the pictures already written and returns the result with
    ``interrupted`` and ``not_run`` set.
    """

    def __init__(
        self,
        run: LoadedRun,
        batch: ImageBatch,
        out_dir: Path,
        target: str | int = "pred",
        writer: Any = None,
        on_written: Callable[[Written], None] | None = None,
        on_progress: Callable[[str, float], None] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.run, self.batch, self.out_dir, self.writer = run, batch, Path(out_dir), writer
        self.params = dict(params or {})  #: method parameters, each handed to the methods that take it
        self._method_params: dict[str, dict[str, Any]] = {}
        self.on_written = on_written or (lambda written: None)
        self.on_progress = on_progress or (lambda method, fraction: None)
        self._part = (0, 1)  # (index, count) of the layer a multi-layer method is drawing
        self.result = Result(out_dir=self.out_dir)
        self.images = batch.images.to(run.device)
        self.target_spec = target
        with torch.no_grad(), model_state(run.model, grad=False):
            probs = F.softmax(run.model(self.images).float(), dim=1)
        self.pred = probs.argmax(dim=1)
        if target == "true":
            if batch.labels is None:
                raise ConfigError("target true needs images with known labels; your own files have none",
                                  "Explain the predicted class or a named class instead.", parameter="target")
            self.targets = batch.labels.to(run.device)
        elif target == "pred":
            self.targets = self.pred
        else:
            self.targets = torch.full_like(self.pred, int(target))
        # one host copy of the few numbers the captions need
        self.pred_list = self.pred.tolist()
        self.target_list = self.targets.tolist()
        self.pred_prob = probs.gather(1, self.pred[:, None])[:, 0].tolist()
        self.target_prob = probs.gather(1, self.targets[:, None])[:, 0].tolist()

    # ------------------------------------------------------------------ public entry

    def run_methods(self, methods: Sequence[str] | None = None, layers: Sequence[str] = ()) -> Result:
        """Run ``methods`` (default: all registered but :data:`~cnnvis.catalog.SLOW_METHODS`; ``"all"``:
        every one). A method the model or layer cannot support (CAM without a GAP + linear head, guided
        backprop without ReLUs, a CAM on a layer that is no map) is skipped with its one-line reason in
        ``result.skipped`` and the others are drawn; only when every method asked for by name is
        unsupported does the first one's error propagate."""
        names, explicit = select_methods(methods)
        for name in names:
            get_method(name)  # an unknown name fails before any work, listing the valid ones
        self._method_params = split_params(names, self.params)  # a parameter no method takes fails here too
        for layer in layers:
            get_layer(self.run.model, layer)
        draw = {"heatmap": self._heatmaps, "activations": self._activations, "filters": self._filters,
                "images": self._images}
        unsupported: list[UnsupportedModelError] = []
        for index, name in enumerate(names):
            spec = METHODS[name]
            why_not = self.run.origin.unsupported(name) if self.run.origin is not None else None
            if why_not is not None:  # a compiled program: skipped even when asked for, with the reason
                self.result.skipped.append(Skipped(name, why_not))
                unsupported.append(UnsupportedModelError(why_not))
                continue
            self._part = (0, 1)
            try:
                self.on_progress(name, 0.0)
                with progress.reporting(lambda done, total, name=name: self._report(name, done, total)):
                    draw[spec.kind](spec, layers)
            except UnsupportedModelError as exc:
                self.result.skipped.append(Skipped(name, str(exc)))
                unsupported.append(exc)
            except RuntimeError as exc:  # only a .pt2 refusing an input size is a skip; anything else is a bug
                refused = self.run.origin.refused_input(name, exc) if self.run.origin is not None else None
                if refused is None:
                    raise
                self.result.skipped.append(Skipped(name, refused))
                unsupported.append(UnsupportedModelError(refused))
            except KeyboardInterrupt:  # keep what is drawn; say what is not
                self.result.interrupted, self.result.not_run = name, names[index + 1:]
                break
            self.on_progress(name, 1.0)
        if explicit and len(unsupported) == len(names):  # nothing asked for can be drawn: an error, not an empty result
            if len(unsupported) == 1:
                raise unsupported[0]
            raise UnsupportedModelError("; ".join(f"{s.method}: {s.reason.rstrip('.')}" for s in self.result.skipped))
        return self.result

    def _report(self, method: str, done: int, total: int) -> None:
        index, count = self._part
        self.on_progress(method, (index + done / max(total, 1)) / count)

    # ------------------------------------------------------------------ captions and output

    def _name(self, index: int) -> str:
        return self.run.spec.class_names[index]

    def _captions(self) -> tuple[list[str], list[str | None]]:
        captions, colors = [], []
        labels = self.batch.labels.tolist() if self.batch.labels is not None else None
        for i, pred in enumerate(self.pred_list):
            true = self._name(labels[i]) if labels is not None else None
            target = self.target_list[i]
            caption = plots.format_caption(true, self._name(pred), self.pred_prob[i])
            if target != pred:
                caption += f" · map for {self._name(target)} {plots.format_caption(prob=self.target_prob[i])}"
            captions.append(caption)
            colors.append(None if labels is None else ("#1a7f37" if labels[i] == pred else "#cf222e"))
        return captions, colors

    def _model_fields(self, method: str, layer: str | None, parameters: dict[str, Any]) -> dict[str, Any]:
        """What every sidecar says: the method and the model it explained."""
        return {
            "method": method,
            "layer": layer,
            "parameters": parameters,
            "seed": SEED,
            "checkpoint": self.run.weights,
            "epoch": self.run.epoch,
            "untrained": self.run.untrained,
            "architecture": self.run.architecture,
        }

    def _sidecar(self, method: str, layer: str | None, parameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """A sidecar of pictures of the explained images: the model, then each image's classes."""
        return {
            **self._model_fields(method, layer, parameters),
            "target": self.target_spec,
            "targets": [self._name(t) for t in self.target_list],
            "target_probability": self.target_prob,
            "predicted": [self._name(p) for p in self.pred_list],
            "predicted_probability": self.pred_prob,
            "true": None if self.batch.labels is None else [self._name(t) for t in self.batch.labels.tolist()],
            "images": self.batch.sources,
            **extra,
        }

    def _write(self, png: bytes, method: str, layer: str | None, stem: str, sidecar: dict[str, Any],
               detail: str, started: float) -> None:
        path = plots.save_png(png, self.out_dir / method / f"{stem}.png", sidecar)
        if self.writer is not None:
            tag = f"visualize/{method}" + (f"/{layer}" if layer else "") + (f"/{stem}" if stem != (layer or method) else "")
            self.writer.add_image(tag, plots.figure_to_tensor(png), self.run.epoch, dataformats="CHW")
        written = Written(method, layer, path, detail, time.perf_counter() - started)
        self.result.written.append(written)
        self.on_written(written)

    def _title(self, label: str, layer: str | None) -> str:
        where = f" · layer {layer}" if layer else ""
        return f"{label}{where} · {self.run.label}"

    # ------------------------------------------------------------------ one drawing per kind of result

    def _heatmaps(self, spec: MethodSpec, layers: Sequence[str]) -> None:
        chosen = (list(layers) or [default_layer(self.run.model, self.images)]) if spec.needs_layer else [None]
        params = {**({"seed": SEED} if "seed" in spec.defaults else {}), **self.method_params(spec.name)}
        captions, colors = self._captions()
        mode = spec.normalize  # the one normalisation: the picture is drawn with it and the sidecar names it
        for part, layer in enumerate(chosen):
            self._part = (part, len(chosen))
            started = time.perf_counter()
            result = run_method(spec.name, self.run.model, self.images, self.targets, layer, detailed=True, **params)
            details = result if isinstance(result, OcclusionMaps) else None
            maps = details.heatmap if details is not None else result
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a constant map is drawn flat; the raw range is printed under it
                png = plots.heatmap_figure(
                    self.batch.images, maps.detach().float().cpu(), mean=self.run.spec.mean, std=self.run.spec.std,
                    captions=captions, caption_colors=colors, title=self._title(spec.description, layer),
                    map_label=spec.name, normalize=mode,
                )
            parameters = {**spec.defaults, **params}
            if details is not None:
                parameters |= {"window": list(details.window), "stride": list(details.stride)}
            # occlusion: incremental or full forward passes, and why a full forward (an unsupported layer)
            extra = {"computation": details.computation} if details is not None else {}
            sidecar = self._sidecar(spec.name, layer, parameters, normalization=mode,
                                    flat_maps=flat_maps(maps).tolist(), flat_spread=FLAT_SPREAD, **extra)
            self._write(png, spec.name, layer, layer or spec.name, sidecar, plots.count(len(captions), "image"), started)
            if details is not None:
                self._occlusion_classes(details, captions, colors, parameters)

    def _occlusion_classes(self, found: OcclusionMaps, captions: list[str], colors: list[str | None],
                           parameters: dict[str, Any]) -> None:
        """Which class the model predicts while each window is covered, as a colour per position."""
        started = time.perf_counter()
        predicted = found.predicted.cpu()
        png = plots.occlusion_classes_figure(
            self.batch.images, predicted, self.pred, self.run.spec.class_names, captions,
            self._title("class predicted with each window covered", None), mean=self.run.spec.mean,
            std=self.run.spec.std, caption_colors=colors)
        sidecar = self._sidecar("occlusion", None, parameters, predicted_per_window=[
            [[self._name(int(c)) for c in row] for row in grid] for grid in predicted.tolist()
        ], prediction_changed_per_window=plots.changed_windows(predicted, self.pred).tolist(),
            legend=[self._name(c) for c in plots.changed_classes(predicted, self.pred)],
            computation=found.computation)
        self._write(png, "occlusion", None, "predicted-class", sidecar, plots.count(len(captions), "image"), started)

    def _activations(self, spec: MethodSpec, layers: Sequence[str]) -> None:
        names = list(layers) or stage_layers(self.run.model, images=self.images)
        started = time.perf_counter()
        acts = run_method(spec.name, self.run.model, self.images, self.targets, names)
        acts = {k: v.float().cpu() for k, v in acts.items()}
        for i, source in enumerate(self.batch.sources):
            png = plots.activation_grid_figure(
                {k: v[i] for k, v in acts.items()}, self._title(f"activations of {source}", None),
                image=self.batch.images[i], mean=self.run.spec.mean, std=self.run.spec.std,
            )
            sidecar = self._sidecar(spec.name, None, {"layers": names}, image=source)
            self._write(png, spec.name, None, f"image-{i}", sidecar, plots.count(len(names), "layer"), started)
            started = time.perf_counter()

    def _filters(self, spec: MethodSpec, layers: Sequence[str]) -> None:
        model = self.run.model
        names = list(layers) or list(dict.fromkeys([first_conv(model), *self._conv_inside(default_layer(model, self.images))]))
        for layer in names:
            started = time.perf_counter()
            weights = run_method(spec.name, model, self.images, self.targets, layer).float().cpu()
            png = plots.filter_grid_figure(weights, layer, title=self._title("convolution filters", layer))
            sidecar = self._sidecar(spec.name, layer, {"shape": list(weights.shape)})
            self._write(png, spec.name, layer, layer, sidecar, "x".join(map(str, weights.shape)), started)

    def _conv_inside(self, layer: str) -> list[str]:
        """The last conv at or inside ``layer`` (the default layer may be a ReLU or a block)."""
        convs = [n for n, m in self.run.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        inside = [n for n in convs if n == layer or n.startswith(layer + ".")]
        return inside[-1:] or convs[-1:]

    def method_params(self, name: str) -> dict[str, Any]:
        """The ``params`` method ``name`` takes (``--param KEY=VALUE`` on the command line)."""
        return self._method_params.get(name, {})

    def _images(self, spec: MethodSpec, layers: Sequence[str]) -> None:
        DRAW_IMAGES[spec.name](self, spec, layers)


def visualize_command(
    source: LoadedRun | str | Path,
    *,
    methods: Sequence[str] = (),
    layers: Sequence[str] = (),
    images: int = DEFAULT_IMAGES,
    files: Sequence[str | Path] = (),
    split: str = "test",
    target: str = "pred",
    out_dir: str | Path | None = None,
    device: str = "auto",
    tensorboard: bool = False,
    allow_untrained: bool = False,
    crop: bool = True,
    params: Mapping[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    on_written: Callable[[Written], None] | None = None,
    on_progress: Callable[[str, float], None] | None = None,
    on_ready: Callable[[Result], None] | None = None,
) -> Result:
    """What ``cnnvis visualize`` does: explain ``files`` (files, folders, globs; or ``images`` fixed
    images of ``split``) with every method in ``methods`` (default: all but the slow ones; ``["all"]``:
    every one), writing PNGs + sidecars to ``out_dir`` (default ``RUN/visualizations``) and, with
    ``tensorboard``, to the run's TensorBoard events. ``params`` go to every method that takes them
    (``{"aug_smooth": True}``: every CAM method; ``{"over": "guided-backprop"}``: the noise tunnels).

    ``source`` is a loaded run, or any MODEL :func:`cnnvis.sources.load_source` takes (a run,
    ``torchvision:NAME``, ``timm:NAME``, a ``.pt2`` or TorchScript file), loaded onto ``device``
    with ``model_options`` (``weights``, ``classes``, ``size``, ``mean``, ``std``, ``runs_dir``).
    A model that is not a run explains only ``files`` and writes into its run-like directory.
    Ctrl-C while the methods run returns what was drawn (see :class:`Visualizer`). ``on_ready`` gets
    the result before the first method runs, its ``run``, ``notes`` and ``skipped_images`` filled in,
    so that random weights, assumed preprocessing or dropped files are known before the long part.
    """
    from cnnvis.training.summaries import LazyWriter

    run = source if isinstance(source, LoadedRun) else load_source(
        source, device=resolve_device(device), allow_untrained=allow_untrained, **(model_options or {}))
    if run.origin is not None and not files:
        raise ConfigError(f"{run.architecture} has no data of its own: give images to explain",
                          "Pass --image FILE, --image FOLDER or --image 'photos/*.jpg'.")
    batch = file_images(run, files, crop) if files else dataset_images(run, split, images)
    out = Path(out_dir) if out_dir is not None else run.run_dir / VISUALIZATIONS_DIR
    write_source_file(run)
    ready = Result(run=run, tensorboard=tensorboard, skipped_images=batch.skipped, notes=[
        *run.notes, *batch.notes,
        *([] if crop else [f"--no-crop: each whole picture resized to {'x'.join(map(str, run.preprocessing.crop))} px"])])
    targets = parse_target(target, run.class_aliases)
    if on_ready is not None:
        on_ready(ready)
    writer = LazyWriter(run.run_dir) if tensorboard else None
    try:
        visualizer = Visualizer(run, batch, out, targets, writer, on_written, on_progress, params)
        result = visualizer.run_methods(list(methods), list(layers))
    finally:
        if writer is not None:
            writer.close()
    result.run, result.tensorboard, result.notes, result.skipped_images = run, tensorboard, ready.notes, ready.skipped_images
    return result
