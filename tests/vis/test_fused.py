"""The fused, channels-last stand-in for input-gradient passes: same maps, model untouched, never stale."""

from __future__ import annotations

import torch
from torch import nn
from vis_helpers import assert_untouched, snapshot

from cnnvis.models import build_model
from cnnvis.vis import integrated_gradients, saliency
from cnnvis.vis.fused import gradient_copy
from cnnvis.vis.rectifier_rules import rectifier_rule


def test_the_copy_gives_the_models_gradients_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10, 1, 28).eval()
    for m in model.modules():  # BatchNorm statistics far from the identity: folding them must matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    images = torch.randn(5, 1, 28, 28)
    before = snapshot(model)
    fast, laid_out = gradient_copy(model, images)
    assert fast is not model and laid_out.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded into the convolutions
    assert_untouched(model, before)
    plain = torch.func.grad(lambda x: model(x)[:, 3].sum())(images)
    torch.testing.assert_close(saliency(model, images, 3, reduce=None), plain, rtol=1e-4, atol=1e-6)
    assert gradient_copy(model, images)[0] is fast  # made once per model


def test_changed_weights_are_never_explained_with_a_stale_copy() -> None:
    torch.manual_seed(1)
    model = build_model("mnist_cnn", 10, 1, 28).eval()
    images = torch.randn(3, 1, 28, 28)
    first = integrated_gradients(model, images, 2, steps=8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    fast, _ = gradient_copy(model, images)
    torch.testing.assert_close(fast(images), model(images), rtol=1e-4, atol=1e-5)  # rebuilt for the new weights
    assert not torch.allclose(integrated_gradients(model, images, 2, steps=8), first)


def test_no_copy_is_traced_under_a_torch_function_mode_or_off_the_cpu_path() -> None:
    model = build_model("mnist_cnn", 10, 1, 28).eval()
    images = torch.randn(2, 1, 28, 28)
    with rectifier_rule("guided"):
        assert gradient_copy(model, images)[0] is model  # would bake guided ReLUs into the copy
    assert gradient_copy(model, images.double())[0] is model
    assert gradient_copy(model, images)[0] is not model


def test_untraceable_models_are_used_as_they_are() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))  # control flow on values: fx cannot trace

    model = DataDependent().eval()
    assert gradient_copy(model, torch.randn(2, 1, 8, 8))[0] is model
