"""Method-specific knobs: batching never changes results, seeds reproduce, optimisation does its job."""

from __future__ import annotations

import pytest
import torch
from vis_helpers import PlainNet, TinyCNN

from cnnvis.errors import UnsupportedModelError, VisError
from cnnvis.vis import (
    filters,
    integrated_gradients,
    maximize,
    occlusion_maps,
    smoothgrad,
)
from cnnvis.vis.maps import gaussian_blur


@pytest.fixture
def model() -> PlainNet:
    return PlainNet().eval()


def test_integrated_gradients_batched_equals_one_at_a_time(model) -> None:
    images = torch.randn(3, 3, 8, 10)
    batched = integrated_gradients(model, images, [0, 1, 2], steps=16, reduce=None)  # all 48 in one pass
    single = integrated_gradients(model, images, [0, 1, 2], steps=16, batch_size=1, reduce=None)
    odd = integrated_gradients(model, images, [0, 1, 2], steps=16, batch_size=5, reduce=None)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(batched, odd, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_rejects_bad_settings(model) -> None:
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(VisError, match="unknown integration method"):
        integrated_gradients(model, images, method="simpson")
    with pytest.raises(VisError, match="does not broadcast"):
        integrated_gradients(model, images, baseline=torch.zeros(2, 8, 8))


def test_smoothgrad_is_seeded_and_independent_of_batch_size(model) -> None:
    images = torch.randn(2, 3, 8, 8)
    a = smoothgrad(model, images, [0, 1], samples=6, batch_size=5)
    b = smoothgrad(model, images, [0, 1], samples=6, batch_size=1)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, smoothgrad(model, images, [0, 1], samples=6, seed=1))


def test_occlusion_batch_size_and_fast_path_do_not_change_results() -> None:
    model = TinyCNN()
    images = torch.randn(3, 1, 14, 11)
    ref = occlusion_maps(model, images, window=3, stride=2, optimize=False, batch_size=1)
    for kw in ({"batch_size": 7}, {"batch_size": 1000}, {"optimize": True}):
        other = occlusion_maps(model, images, window=3, stride=2, **kw)
        torch.testing.assert_close(other.heatmap, ref.heatmap, rtol=1e-4, atol=1e-6)
        assert torch.equal(other.predicted, ref.predicted)


def test_occlusion_rejects_bad_windows() -> None:
    model, images = TinyCNN(), torch.randn(1, 1, 8, 8)
    with pytest.raises(VisError, match="larger than the image"):
        occlusion_maps(model, images, window=9)
    with pytest.raises(VisError, match="uncovered"):
        occlusion_maps(model, images, window=2, stride=3)
    with pytest.raises(VisError, match="'prob' or 'logit'"):
        occlusion_maps(model, images, score="loss")


def test_maximize_raises_the_target_logit_and_is_seeded(model) -> None:
    with torch.no_grad():  # an untrained net at default init barely reacts to its input
        for p in model.parameters():
            p.mul_(3.0)
    start = maximize(model, [2, 4], (3, 12, 12), steps=1, lr=0.0)  # lr 0: the seeded starting noise
    out = maximize(model, [2, 4], (3, 12, 12), steps=40)
    with torch.no_grad():
        before, after = model(start), model(out)
    gain = after[[0, 1], [2, 4]] - before[[0, 1], [2, 4]]
    assert (gain > 0.05).all() and gain.sum() > 1.0
    assert torch.equal(out, maximize(model, [2, 4], (3, 12, 12), steps=40))
    assert not torch.equal(out, maximize(model, [2, 4], (3, 12, 12), steps=40, seed=3))
    clamped = maximize(model, [2], (3, 12, 12), steps=5, clamp=(-0.2, 0.2))
    assert clamped.abs().max() <= 0.2


def test_maximize_a_channel(model) -> None:
    out = maximize(model, [0, 5], (3, 12, 12), layer="conv2", steps=30)
    feats = {}
    handle = model.conv2.register_forward_hook(lambda _m, _i, o: feats.setdefault("a", o.detach()))
    with torch.no_grad():
        model(out)
    handle.remove()
    assert feats["a"][0, 0].mean() > feats["a"][1, 0].mean()  # image 0 was optimised for channel 0
    assert feats["a"][1, 5].mean() > feats["a"][0, 5].mean()


def test_maximize_warns_about_a_dead_channel(model) -> None:
    with torch.no_grad():
        model.conv1.bias.fill_(-100.0)  # relu1 is off everywhere
    with pytest.warns(UserWarning, match="zero gradient"):
        maximize(model, [0], (3, 8, 8), layer="relu1", steps=2)


def test_gaussian_blur_keeps_the_mean_and_smooths() -> None:
    x = torch.zeros(1, 2, 9, 9)
    x[:, :, 4, 4] = 1.0
    y = gaussian_blur(x, 1.0)
    torch.testing.assert_close(y.sum(dim=(2, 3)), torch.ones(1, 2))
    assert y[0, 0, 4, 4] < 0.5 and y[0, 0, 4, 5] > 0


def test_filters_are_a_copy_of_the_conv_weights() -> None:
    model = TinyCNN()
    w = filters(model)
    assert torch.equal(w, model.features[0].weight) and w.shape == (6, 1, 3, 3)
    w.zero_()
    assert model.features[0].weight.abs().sum() > 0
    assert filters(model, "features.4").shape == (6, 6, 3, 3)
    with pytest.raises(UnsupportedModelError, match="not a Conv2d; conv layers: features.0, features.4"):
        filters(model, "features.1")


def test_stage_layers_show_each_conv_block_after_its_activation() -> None:
    from torch import nn

    from cnnvis.models import build_model
    from cnnvis.vis.activations import stage_layers

    assert stage_layers(build_model("mnist_cnn", 10, 1)) == ["features.2", "features.6", "features.10", "features.13"]
    assert stage_layers(build_model("mnist_classic", 10, 1)) == ["features.1", "features.3", "features.6"]
    # conv, pool, BN, ReLU: the block's output is after the ReLU, not the raw conv output
    pooled_first = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2))
    assert stage_layers(pooled_first) == ["3", "4"]
