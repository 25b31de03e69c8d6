"""The visualisation method names in display order, importable without torch.

The CLI's help lists them before anything heavy loads (``cnnvis.vis`` imports torch);
``vis/registry.py`` builds one spec per name and refuses to import if the two lists differ.
``SLOW_METHODS`` are those ``cnnvis visualize`` leaves out unless asked for (``-m NAME`` or ``-m all``).
"""

METHOD_NAMES: tuple[str, ...] = (
    "activations", "filters", "occlusion", "cam", "gradcam", "gradcam++", "guided-gradcam", "saliency",
    "guided-backprop", "smoothgrad", "integrated-gradients", "maximize",
    # gradient family
    "deconvnet", "input-x-gradient", "smoothgrad-sq", "vargrad",
    "deepdream",
    # the CAM family beyond Grad-CAM
    "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam", "fullgrad",
)

#: the ``-m`` value that asks ``cnnvis visualize`` for every method, the slow ones included
ALL_METHODS = "all"

#: methods ``cnnvis visualize`` draws only when asked for by name or with ``-m all``: name -> why,
#: with its time for the default 8 images on a 2-core CPU. None at present: on the digit net and on
#: flowers5's resnet_small every method takes seconds (``benchmarks/RESULTS.md``, section 12)
SLOW_METHODS: dict[str, str] = {}

def default_methods() -> tuple[str, ...]:
    """What ``cnnvis visualize`` draws without ``-m``: every method except :data:`SLOW_METHODS`."""
    return tuple(name for name in METHOD_NAMES if name not in SLOW_METHODS)
