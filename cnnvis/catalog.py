"""The visualisation method names in display order, importable without torch.

The CLI's help lists them before anything heavy loads (``cnnvis.vis`` imports torch);
``vis/registry.py`` builds one spec per name and refuses to import if the two lists differ.
"""

METHOD_NAMES: tuple[str, ...] = (
    "activations", "filters", "occlusion", "cam", "gradcam", "gradcam++", "guided-gradcam", "saliency",
    "guided-backprop", "smoothgrad", "integrated-gradients", "maximize",
    # gradient family
    "deconvnet", "input-x-gradient", "smoothgrad-sq", "vargrad",
    "deepdream",
)
