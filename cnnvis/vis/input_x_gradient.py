"""Input x gradient (Shrikumar et al. 2016, "Not Just a Black Box: Learning Important Features
Through Propagating Activation Differences", the gradient * input baseline): ``A_i = x_i * dS/dx_i``, signed.

For a model that is linear in its input this is each pixel's exact contribution to the logit;
it equals integrated gradients from a zero baseline when the gradient is constant along the path.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnvis.vis.gradients import input_gradients
from cnnvis.vis.hooks import Targets
from cnnvis.vis.maps import Reduce, reduce_channels


def input_x_gradient(model: nn.Module, images: Tensor, targets: Targets = "pred", *, reduce: Reduce = "sum") -> Tensor:
    """Signed ``x * dS/dx`` maps ``[N, H, W]``, summed over channels by default
    (``reduce=None``: ``[N, C, H, W]`` = Captum ``InputXGradient``)."""
    grads = input_gradients(model, images, targets)
    return reduce_channels(images.detach() * grads, reduce)
