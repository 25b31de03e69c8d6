"""The one list of visualisation methods; the CLI and the config take their choices from here.

``run_method(name, model, images, targets, layer, **params)`` calls any of them the same way.
Each spec's ``defaults`` are read from the keyword-only parameters of the method's function, so
they cannot drift from the code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cnnvis.catalog import METHOD_NAMES
from cnnvis.errors import UnknownMethodError, VisError, did_you_mean
from cnnvis.vis.ablationcam import ablationcam
from cnnvis.vis.activations import activations
from cnnvis.vis.cam import cam
from cnnvis.vis.deconvnet import deconvnet
from cnnvis.vis.deepdream import deepdream
from cnnvis.vis.eigencam import eigencam
from cnnvis.vis.filters import filters
from cnnvis.vis.fullgrad import fullgrad
from cnnvis.vis.gradcam import gradcam
from cnnvis.vis.gradcampp import gradcampp
from cnnvis.vis.guided_backprop import guided_backprop
from cnnvis.vis.guided_gradcam import guided_gradcam
from cnnvis.vis.hirescam import hirescam
from cnnvis.vis.hooks import Targets, capture, check_images, predict, resolve_targets
from cnnvis.vis.input_x_gradient import input_x_gradient
from cnnvis.vis.integrated_gradients import integrated_gradients
from cnnvis.vis.layercam import layercam
from cnnvis.vis.maps import NormalizeMode
from cnnvis.vis.maximize import maximize
from cnnvis.vis.noise_tunnel import smoothgrad, smoothgrad_sq, vargrad
from cnnvis.vis.occlusion import occlusion, occlusion_maps
from cnnvis.vis.params import convert
from cnnvis.vis.saliency import saliency
from cnnvis.vis.scorecam import scorecam
from cnnvis.vis.xgradcam import xgradcam

Kind = Literal["heatmap", "activations", "filters", "images"]
#: runner(model, images, targets, layer, **params) -> the method's result
Runner = Callable[..., Any]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    function: Callable[..., Any]  #: the public function (its own, natural signature)
    kind: Kind  #: heatmap: Tensor[N,H,W]; activations: dict layer -> Tensor; filters / images: Tensor
    description: str
    needs_layer: bool  #: works on a layer (``layer=None`` picks a sensible default)
    accepts_layer: bool  #: a ``layer`` may be passed (maximize: optional channel objective)
    requires_gap_linear: bool  #: only for models ending in global average pooling + one linear layer
    #: the :func:`~cnnvis.vis.maps.normalize_maps` mode its heatmaps are drawn with (``signed``:
    #: negative values mean something, drawn on a diverging colour map); None for other kinds
    normalize: NormalizeMode | None
    runner: Runner = field(repr=False)
    defaults: Mapping[str, Any] = field(default_factory=dict)  #: parameters ``run_method`` accepts
    #: runner of the method's full result, where it has more than its heatmap (occlusion: ``OcclusionMaps``)
    detailed_runner: Runner | None = field(default=None, repr=False)


def _keyword_defaults(fn: Callable[..., Any]) -> Mapping[str, Any]:
    params = inspect.signature(fn).parameters.values()
    return MappingProxyType({p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY})


def _no_layer(fn: Callable[..., Any]) -> Runner:
    return lambda model, images, targets, layer, **p: fn(model, images, targets, **p)


def _with_layer(fn: Callable[..., Any]) -> Runner:
    return lambda model, images, targets, layer, **p: fn(model, images, targets, layer, **p)


def _run_maximize(model: nn.Module, images: Tensor, targets: Targets, layer: str | None, **params: Any) -> Tensor:
    """One image per target; ``targets="pred"``: each image's predicted class, or with a layer the
    channel of that layer with the highest mean activation on the image. ``images`` give shape and device."""
    check_images(model, images)
    if isinstance(targets, str) and targets == "pred":
        if layer is None:
            with capture(model, []):
                t = predict(model, images).argmax(dim=1)
        else:
            with capture(model, layer) as cap:
                predict(model, images)
                t = cap.value(layer).flatten(2).mean(dim=2).argmax(dim=1)
    elif layer is None:
        with capture(model, []):
            t = resolve_targets(targets, predict(model, images[:1]).expand(len(images), -1))
    else:
        t = torch.as_tensor(targets).long().reshape(-1).expand(len(images))
    return maximize(model, t, tuple(images.shape[1:]), layer=layer, device=images.device, **params)


def _spec(name: str, fn: Callable[..., Any], kind: Kind, description: str, runner: Runner, *, needs_layer: bool,
          accepts_layer: bool | None = None, requires_gap_linear: bool = False,
          normalize: NormalizeMode | None = None, detailed_runner: Runner | None = None,
          exclude: tuple[str, ...] = ()) -> MethodSpec:
    defaults = MappingProxyType({k: v for k, v in _keyword_defaults(fn).items() if k not in exclude})
    return MethodSpec(name, fn, kind, description, needs_layer,
                      needs_layer if accepts_layer is None else accepts_layer,
                      requires_gap_linear, normalize, runner, defaults, detailed_runner)


_SPECS = [
    _spec("activations", activations, "activations", "feature maps of a layer for each image",
          lambda model, images, targets, layer: activations(model, images, layer), needs_layer=True),
    _spec("filters", filters, "filters", "convolution weights of a layer (default: the first conv)",
          lambda model, images, targets, layer: filters(model, layer), needs_layer=True),
    _spec("occlusion", occlusion, "heatmap",
          "drop in the target's probability when a square is covered (Zeiler & Fergus 2014)",
          _no_layer(occlusion), needs_layer=False, normalize="signed", detailed_runner=_no_layer(occlusion_maps)),
    _spec("cam", cam, "heatmap", "class activation map from GAP features and head weights (Zhou et al. 2016)",
          _no_layer(cam), needs_layer=False, requires_gap_linear=True, normalize="signed"),
    _spec("gradcam", gradcam, "heatmap", "layer activations weighted by pooled gradients (Selvaraju et al. 2017)",
          _with_layer(gradcam), needs_layer=True, normalize="minmax"),
    _spec("gradcam++", gradcampp, "heatmap", "Grad-CAM with higher-order pixel weights (Chattopadhay et al. 2018)",
          _with_layer(gradcampp), needs_layer=True, normalize="minmax"),
    _spec("guided-gradcam", guided_gradcam, "heatmap",
          "guided backprop times upsampled Grad-CAM (Selvaraju et al. 2017)",
          _with_layer(guided_gradcam), needs_layer=True, normalize="maxabs"),
    _spec("saliency", saliency, "heatmap", "absolute input gradient of the target logit (Simonyan et al. 2014)",
          _no_layer(saliency), needs_layer=False, normalize="maxabs"),
    _spec("guided-backprop", guided_backprop, "heatmap",
          "input gradient passing only positive signals through ReLUs (Springenberg et al. 2014)",
          _no_layer(guided_backprop), needs_layer=False, normalize="maxabs"),
    _spec("smoothgrad", smoothgrad, "heatmap", "input gradients averaged over noisy copies (Smilkov et al. 2017)",
          _no_layer(smoothgrad), needs_layer=False, normalize="maxabs"),
    _spec("integrated-gradients", integrated_gradients, "heatmap",
          "gradients integrated along a path from a baseline image (Sundararajan et al. 2017)",
          _no_layer(integrated_gradients), needs_layer=False, normalize="signed"),
    _spec("maximize", maximize, "images",
          "synthetic input maximising a class logit or a layer channel (Erhan et al. 2009; Olah et al. 2017)",
          _run_maximize, needs_layer=False, accepts_layer=True, exclude=("layer", "device")),
    # gradient family. Normalisation: deconvnet's reconstruction is read by magnitude like guided
    # backprop's (maxabs); input x gradient is signed (evidence for and against); the squared mean and
    # the variance are non-negative with a meaningful zero (no attribution, no variation), so they
    # are scaled from 0 (maxabs) -- minmax would paint the least-varying pixel black however large it is.
    _spec("deconvnet", deconvnet, "heatmap",
          "input gradient with ReLUs that pass the positive backward signal (Zeiler & Fergus 2014)",
          _no_layer(deconvnet), needs_layer=False, normalize="maxabs"),
    _spec("input-x-gradient", input_x_gradient, "heatmap", "input times its gradient, signed (Shrikumar et al. 2016)",
          _no_layer(input_x_gradient), needs_layer=False, normalize="signed"),
    _spec("smoothgrad-sq", smoothgrad_sq, "heatmap",
          "squared gradients averaged over noisy copies (Hooker et al. 2019)",
          _no_layer(smoothgrad_sq), needs_layer=False, normalize="maxabs"),
    _spec("vargrad", vargrad, "heatmap", "variance of the gradient over noisy copies (Adebayo et al. 2018)",
          _no_layer(vargrad), needs_layer=False, normalize="maxabs"),
    _spec("deepdream", deepdream, "images",
          "the images changed to amplify a layer's activations, over several scales (Mordvintsev et al. 2015)",
          lambda model, images, targets, layer, **p: deepdream(model, images, layer, **p), needs_layer=True),
    # the CAM family beyond Grad-CAM
    _spec("xgradcam", xgradcam, "heatmap", "activations weighted by activation-scaled gradients (Fu et al. 2020)",
          _with_layer(xgradcam), needs_layer=True, normalize="minmax"),
    _spec("layercam", layercam, "heatmap", "activations weighted by their own positive gradients (Jiang et al. 2021)",
          _with_layer(layercam), needs_layer=True, normalize="minmax"),
    _spec("hirescam", hirescam, "heatmap", "element-wise gradient times activation, summed (Draelos & Carin 2020)",
          _with_layer(hirescam), needs_layer=True, normalize="minmax"),
    _spec("eigencam", eigencam, "heatmap", "first principal component of the activations (Muhammad & Yeasin 2020)",
          _with_layer(eigencam), needs_layer=True, normalize="minmax"),
    _spec("scorecam", scorecam, "heatmap", "channels weighted by the score of the image they mask (Wang et al. 2020)",
          _with_layer(scorecam), needs_layer=True, normalize="minmax"),
    _spec("ablationcam", ablationcam, "heatmap", "channels weighted by the score drop when removed (Desai & Ramaswamy 2020)",
          _with_layer(ablationcam), needs_layer=True, normalize="minmax"),
    _spec("fullgrad", fullgrad, "heatmap", "input and bias gradients of every layer (Srinivas & Fleuret 2019)",
          _no_layer(fullgrad), needs_layer=False, normalize="minmax"),
]

_BY_NAME = {s.name: s for s in _SPECS}
# the CLI lists methods from the catalog without importing this module: the two must name the same methods
if sorted(_BY_NAME) != sorted(METHOD_NAMES) or len(_SPECS) != len(METHOD_NAMES):
    raise ImportError(f"catalog.py lists {METHOD_NAMES}, the registry has {tuple(_BY_NAME)}")
#: name -> spec, in the catalog's display order (families together)
METHODS: Mapping[str, MethodSpec] = MappingProxyType({name: _BY_NAME[name] for name in METHOD_NAMES})


def method_names() -> list[str]:
    """All registered method names, in display order."""
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown visualisation method {name!r}; {did_you_mean(str(name), list(METHODS), 3)}"
                                 f"choose one of: {', '.join(METHODS)}") from None


def split_params(names: Sequence[str], params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``params`` handed to each of ``names`` that takes them (``aug_smooth`` to every CAM method,
    ``over`` to the noise tunnels, ``samples`` to every sampling method); a parameter none of them takes
    is an error naming the methods that would. Each value is checked against, and converted to, the
    type the method's function declares (:func:`cnnvis.vis.params.convert`): ``aug_smooth="maybe"`` is
    an error, ``aug_smooth=1`` is ``True``."""
    per_method: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, value in params.items():
        takers = [(n, get_method(n).function, get_method(n).defaults[key]) for n in names if key in get_method(n).defaults]
        if not takers:
            known = [n for n, spec in METHODS.items() if key in spec.defaults]
            where = f"it is a parameter of {', '.join(known)}" if known else "no method takes it"
            raise VisError(f"parameter {key!r} applies to none of the methods drawn ({', '.join(names)}); {where}",
                           parameter="param")
        for name, fitted in convert(key, value, takers).items():
            per_method[name][key] = fitted
    return per_method


def run_method(
    name: str,
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    layer: str | None = None,
    *,
    detailed: bool = False,
    **params: Any,
) -> Any:
    """Run method ``name`` with the common calling convention (see :class:`MethodSpec` for result kinds).

    ``detailed=True`` returns the method's full result where it has one (occlusion: an
    ``OcclusionMaps`` with the predicted class per window besides ``.heatmap``); otherwise the same.
    """
    spec = get_method(name)
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "none"
        raise VisError(f"{name} does not take parameter(s) {', '.join(unknown)}; valid parameters: {valid}")
    if layer is not None and not spec.accepts_layer:
        raise VisError(f"{name} does not work on a chosen layer; leave layer unset "
                       f"(layer-based methods: {', '.join(n for n, s in METHODS.items() if s.needs_layer)})")
    runner = spec.detailed_runner if detailed and spec.detailed_runner is not None else spec.runner
    return runner(model, images, targets, layer, **params)

