"""The visualisation method names in display order, importable without torch.

The CLI's help lists them before anything heavy loads (``cnnvis.vis`` imports torch);
``vis/registry.py`` builds one spec per name and refuses to import if the two lists differ.
``SLOW_METHODS`` are those ``cnnvis visualize`` leaves out unless asked for (``-m NAME`` or ``-m all``).
"""

METHOD_NAMES: tuple[str, ...] = (
    # what the network computes and learned
    "activations", "filters",
    # perturbation
    "occlusion",
    # the CAM family: a layer's maps weighted per channel
    "cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam",
    "fullgrad", "guided-gradcam",
    # the gradient family: input gradients, their rules and their noise tunnels
    "saliency", "guided-backprop", "deconvnet", "input-x-gradient", "smoothgrad", "smoothgrad-sq", "vargrad",
    "integrated-gradients",
    # feature visualization: images made for the network
    "maximize", "deepdream",
)

#: the ``-m`` value that asks ``cnnvis visualize`` for every method, the slow ones included
ALL_METHODS = "all"

#: methods ``cnnvis visualize`` draws only when asked for by name or with ``-m all``: name -> why,
#: measured on a 2-core CPU (2026-12-03). On the shipped configs' nets every method takes seconds
#: (``benchmarks/RESULTS.md``, section 12); Score-CAM's one forward pass per channel of the layer does
#: not scale to ImageNet models.
SLOW_METHODS: dict[str, str] = {
    "scorecam": "one forward pass per channel: 15 s per 224 px image on ResNet-18, 138 s on ResNet-50",
}

def default_methods() -> tuple[str, ...]:
    """What ``cnnvis visualize`` draws without ``-m``: every method except :data:`SLOW_METHODS`."""
    return tuple(name for name in METHOD_NAMES if name not in SLOW_METHODS)
