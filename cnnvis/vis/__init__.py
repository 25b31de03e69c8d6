"""Visualisation methods: what a trained CNN looks at and what it has learned.

Every method is a function over a batch ``images: Tensor[N, C, H, W]`` (on the model's device,
any H x W) and ``targets`` (``"pred"``, one class index, or one per image). Heatmaps come back as
raw ``Tensor[N, H, W]`` on the input's device; :func:`normalize_maps` scales them to [0, 1].
The user's model is never changed: train/eval flags, ``requires_grad`` and hooks are restored.

Where things are:

* ``registry.py``   -- ``METHODS`` (name -> :class:`MethodSpec`) and ``run_method(name, model, images, targets, layer, **params)``
* ``params.py``     -- parameters given as text (``--param``) checked against, and converted to, each method's types
* ``hooks.py``      -- the shared helper: ``capture`` (forward hooks + gradients), ``model_state``,
  ``get_layer`` / ``default_layer`` (found by a probing forward pass) / ``layer_names``, ``resolve_targets``
* ``layouts.py``    -- how a layer's output reads as ``[N, C, h, w]``: transformer tokens on their patch
  grid, channels-last maps permuted (``capture`` applies it to values and gradients);
  ``layer_rule.py`` the default-layer rule over the probed calls
* ``maps.py``       -- ``normalize_maps`` (the one normalisation for display), ``reduce_channels``,
  ``upsample``, ``gaussian_blur``
* ``batching.py``   -- the one rule for how many samples go through the model per pass
* ``progress.py``   -- how far a long method has come (``advance``), for progress bars
* ``activations.py`` feature maps        * ``filters.py``  conv weights
* ``occlusion.py``  occlusion sensitivity (probability or logit drop, predicted class per position);
  ``incremental.py`` + ``incremental_graph.py`` recompute only what each window changes (Krypton)
* ``cam_base.py``   shared CAM computation; ``cam.py`` CAM, ``gradcam.py`` Grad-CAM,
  ``gradcampp.py`` Grad-CAM++, ``guided_gradcam.py`` Guided Grad-CAM
* more CAMs: ``xgradcam.py`` XGrad-CAM, ``layercam.py`` LayerCAM, ``hirescam.py`` HiResCAM,
  ``eigencam.py`` Eigen-CAM, ``scorecam.py`` Score-CAM, ``ablationcam.py`` Ablation-CAM,
  ``fullgrad.py`` FullGrad; ``aug_smooth.py`` test-time augmentation smoothing for all of them
* ``gradients.py``  input gradients; ``saliency.py``, ``guided_backprop.py``, ``integrated_gradients.py``
* ``rectifier_rules.py`` the guided / deconvnet backward rules at every rectifier (ReLU, ReLU6, clamps,
  LeakyReLU, PReLU); ``guided_backprop.py``, ``deconvnet.py``; ``input_x_gradient.py``
* ``noise_tunnel.py`` SmoothGrad, SmoothGrad-Sq and VarGrad over any gradient method (``over=``)
* ``maximize.py``   activation maximisation / feature visualisation (class logit, layer channel or neuron);
  ``fourier.py`` its decorrelated Fourier image, ``robustness.py`` its random pad/jitter/scale/rotate,
  ``penalties.py`` total variation and L2 priors
* ``deepdream.py``  DeepDream: real images changed to amplify a layer, over several octaves

Errors are :class:`cnnvis.errors.VisError` and its subclasses; a method that ran but not quite as its name
promises (guided backprop leaving GELUs with the plain gradient) warns with :class:`cnnvis.errors.VisWarning`;
drawing the results is :mod:`cnnvis.plots`.
"""

from cnnvis.errors import (
    LayerNotFoundError,
    UnknownMethodError,
    UnsupportedModelError,
    VisError,
    VisWarning,
)
from cnnvis.vis.ablationcam import ablationcam
from cnnvis.vis.activations import activations
from cnnvis.vis.aug_smooth import augmentation_smoothed
from cnnvis.vis.cam import cam
from cnnvis.vis.deconvnet import deconvnet
from cnnvis.vis.deepdream import deepdream, dream_layer
from cnnvis.vis.eigencam import eigencam
from cnnvis.vis.filters import filters
from cnnvis.vis.fullgrad import fullgrad
from cnnvis.vis.gradcam import gradcam
from cnnvis.vis.gradcampp import gradcampp
from cnnvis.vis.gradients import input_gradients
from cnnvis.vis.guided_backprop import guided_backprop, guided_backprop_gradients
from cnnvis.vis.guided_gradcam import guided_gradcam
from cnnvis.vis.hirescam import hirescam
from cnnvis.vis.hooks import (
    capture,
    default_layer,
    get_layer,
    layer_names,
    model_state,
    resolve_targets,
)
from cnnvis.vis.input_x_gradient import input_x_gradient
from cnnvis.vis.integrated_gradients import integrated_gradients
from cnnvis.vis.layercam import layercam
from cnnvis.vis.maps import gaussian_blur, normalize_maps, reduce_channels, upsample
from cnnvis.vis.maximize import maximize, maximize_settings
from cnnvis.vis.noise_tunnel import noise_tunnel, smoothgrad, smoothgrad_sq, vargrad
from cnnvis.vis.occlusion import OcclusionMaps, occlusion, occlusion_maps
from cnnvis.vis.registry import (
    METHODS,
    MethodSpec,
    get_method,
    method_names,
    run_method,
)
from cnnvis.vis.saliency import saliency
from cnnvis.vis.scorecam import scorecam
from cnnvis.vis.xgradcam import xgradcam

__all__ = [
    "METHODS", "LayerNotFoundError", "MethodSpec", "OcclusionMaps", "UnknownMethodError", "UnsupportedModelError",
    "VisError", "activations", "cam", "capture", "default_layer", "filters", "gaussian_blur", "get_layer", "get_method", "gradcam",
    "gradcampp", "guided_backprop", "guided_backprop_gradients", "guided_gradcam", "input_gradients",
    "integrated_gradients", "layer_names", "maximize", "method_names", "model_state", "normalize_maps", "occlusion",
    "occlusion_maps", "reduce_channels", "resolve_targets", "run_method", "saliency", "smoothgrad", "upsample",
    # gradient family
    "VisWarning", "deconvnet", "input_x_gradient", "noise_tunnel", "smoothgrad_sq", "vargrad",
    "deepdream", "dream_layer", "maximize_settings",
    "ablationcam", "augmentation_smoothed", "eigencam", "fullgrad", "hirescam", "layercam", "scorecam", "xgradcam",
]
