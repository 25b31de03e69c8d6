"""Errors raised by the visualisation methods (all are user-fixable ``CnnvisError`` s)."""

from __future__ import annotations

from cnnvis.errors import CnnvisError


class VisError(CnnvisError):
    """A visualisation request that cannot be served as asked (bad target, bad parameter ...)."""


class LayerNotFoundError(VisError):
    """A layer name that is not a submodule of the model; the message lists the valid names."""


class UnsupportedModelError(VisError):
    """The method does not apply to this model (e.g. CAM without GAP + linear, no ReLU for guided backprop)."""


class UnknownMethodError(VisError):
    """A method name that is not in :data:`cnnvis.vis.registry.METHODS`."""
