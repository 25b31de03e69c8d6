"""DeepDream: amplifies the layer it dreams on, over several octaves, reproducibly, without side effects."""

from __future__ import annotations

import pytest
import torch
from vis_helpers import PlainNet, assert_untouched, snapshot

from cnnvis.models import build_model
from cnnvis.vis import VisError, deepdream, dream_layer
from cnnvis.vis.deepdream import mean_square, octave_sizes

MEAN, STD = (0.5, 0.4, 0.45), (0.25, 0.2, 0.3)


@pytest.fixture
def model() -> PlainNet:
    torch.manual_seed(0)
    return PlainNet().eval()


def test_dream_amplifies_the_layer_keeps_size_and_valid_pixels(model) -> None:
    images = torch.randn(2, 3, 48, 40) * 0.5
    out = deepdream(model, images, "relu2", steps=8, mean=MEAN, std=STD)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert (mean_square(model, out, "relu2") > 2 * mean_square(model, images, "relu2")).all()
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # it changes the picture, not replaces it: the dream stays closer to its own image than to the other
    assert (out[0] - images[0]).norm() < (out[0] - images[1]).norm()


def test_octaves_are_used_and_small_ones_are_left_out() -> None:
    assert octave_sizes(96, 96, 3, 1.4) == [(96, 96), (69, 69), (49, 49)]
    assert octave_sizes(48, 40, 4, 1.4) == [(48, 40)]  # 34 x 29 would be under 32 px
    assert octave_sizes(12, 10, 3, 1.4) == [(12, 10)]


def test_more_octaves_change_the_dream_and_seeds_reproduce_it(model) -> None:
    images = torch.randn(1, 3, 64, 64) * 0.5
    one = deepdream(model, images, "relu2", octaves=1, steps=4)
    two = deepdream(model, images, "relu2", octaves=2, steps=4)
    assert not torch.allclose(one, two, atol=1e-3)
    assert torch.equal(two, deepdream(model, images, "relu2", octaves=2, steps=4))
    assert not torch.equal(two, deepdream(model, images, "relu2", octaves=2, steps=4, seed=1))


def test_batch_equals_single_images_over_octaves_and_model_is_left_alone(model) -> None:
    model.train()
    before = snapshot(model)
    images = torch.randn(3, 3, 48, 48) * 0.5
    kw = dict(layer="relu3", octaves=2, steps=3, mean=MEAN, std=STD)
    whole = deepdream(model, images, **kw)
    assert_untouched(model, before)
    parts = torch.cat([deepdream(model, images[i : i + 1], **kw) for i in range(3)])
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-5)


def test_default_layer_is_two_thirds_through_the_stages() -> None:
    assert dream_layer(build_model("resnet_small", 5, 3)) == "layer3"
    assert dream_layer(build_model("mnist_cnn", 10, 1)) == "features.10"


def test_bad_settings_raise(model) -> None:
    with pytest.raises(VisError, match="octaves >= 1"):
        deepdream(model, torch.randn(1, 3, 16, 16), "relu1", octaves=0)
    with pytest.raises(VisError, match="std has 2 values"):
        deepdream(model, torch.randn(1, 3, 16, 16), "relu1", std=(0.2, 0.2))
