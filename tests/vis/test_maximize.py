"""Feature visualisation: the Fourier + robustness recipe finds what a unit detects, and behaves."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from vis_helpers import PlainNet, TinyCNN, assert_untouched, mixed_state, snapshot

from cnnvis.vis import VisError, maximize, maximize_settings
from cnnvis.vis.penalties import l2_distance, total_variation

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def stripe_detectors(period: int = 4, size: int = 7) -> nn.Module:
    """Channel 0 responds to vertical stripes (brightness varying along x), channel 1 to horizontal ones."""
    conv = nn.Conv2d(3, 2, size, bias=False)
    wave = torch.cos(2 * torch.pi * torch.arange(size) / period)
    with torch.no_grad():
        conv.weight[0] = wave[None, None, :].expand(3, size, size)
        conv.weight[1] = wave[None, :, None].expand(3, size, size)
    return nn.Sequential(conv, nn.ReLU()).eval()


def direction_power(images: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` spectral power of each grey image along x (|fx| > |fy|) and along y (|fy| > |fx|)."""
    grey = images.mean(dim=1)
    power = torch.fft.fft2(grey - grey.mean(dim=(1, 2), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(grey.shape[1]).abs()[:, None]
    fx = torch.fft.fftfreq(grey.shape[2]).abs()[None, :]
    return torch.stack([(power * (fx > fy)).sum(dim=(1, 2)), (power * (fy > fx)).sum(dim=(1, 2))], dim=1)


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_a_stripe_detector_gets_a_picture_of_its_stripes(param: str) -> None:
    model = stripe_detectors()
    out = maximize(model, [0, 1], (3, 32, 32), layer="0", param=param, steps=48, mean=MEAN, std=STD)
    along_x, along_y = direction_power(out).unbind(dim=1)
    assert along_x[0] > 3 * along_y[0]  # the vertical-stripe channel: brightness varies along x
    assert along_y[1] > 3 * along_x[1]


def test_objective_rises_over_steps_and_each_image_is_specific() -> None:
    torch.manual_seed(0)
    model = PlainNet().eval()
    with torch.no_grad():  # larger weights: classes that differ more than a random init's
        for p in model.parameters():
            p.mul_(3.0)
    targets = torch.tensor([1, 3])
    logits = []
    for steps in (1, 12, 40):
        out = maximize(model, targets, (3, 64, 64), steps=steps, mean=MEAN, std=STD)  # auto: the Fourier recipe
        with torch.no_grad():
            scores = model(out)
        logits.append(scores.gather(1, targets[:, None]).squeeze(1))
    assert (logits[1] > logits[0]).all() and (logits[2] > logits[1]).all()
    # each image is specific: class 1 scores higher on its own image than on class 3's, and vice versa
    assert scores[0, 1] > scores[1, 1] and scores[1, 3] > scores[0, 3]


def test_fourier_images_are_valid_pixels_in_the_models_normalisation() -> None:
    out = maximize(PlainNet().eval(), [0], (3, 24, 24), param="fourier", steps=10, mean=MEAN, std=STD)
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.01


def test_neuron_objective_changes_only_the_centre_neurons_receptive_field() -> None:
    model = stripe_detectors()
    kw = dict(layer="0", param="pixel", steps=10, jitter=0, blur_every=0)
    start = maximize(model, [0], (3, 32, 32), **kw, lr=0.0, l2=0.0)
    neuron = maximize(model, [0], (3, 32, 32), **kw, objective="neuron", l2=0.0) - start
    channel = maximize(model, [0], (3, 32, 32), **kw, objective="channel", l2=0.0) - start
    # conv output 26 x 26, centre (13, 13): input rows and columns 13 .. 19
    field = torch.zeros(32, 32, dtype=torch.bool)
    field[13:20, 13:20] = True
    assert neuron[..., ~field].abs().max() == 0 and neuron[..., field].abs().max() > 0.1
    assert channel[..., ~field].abs().mean() > 0.1


def test_penalties_pull_towards_smooth_grey_images() -> None:
    model = PlainNet().eval()
    kw = dict(param="fourier", steps=30, seed=1)
    plain, smooth, grey = (maximize(model, [2], (3, 32, 32), **kw, **extra)
                           for extra in ({}, {"tv": 0.05}, {"l2": 2.0}))
    assert total_variation(smooth) < 0.7 * total_variation(plain)
    assert l2_distance(grey, 0.5) < 0.7 * l2_distance(plain, 0.5)  # no normalisation: pixels in [0, 1]


def test_fourier_recipe_is_seeded_batch_invariant_and_leaves_the_model_alone() -> None:
    model = mixed_state(TinyCNN(in_channels=3))
    before = snapshot(model)
    kw = dict(param="fourier", steps=6, mean=MEAN, std=STD)
    both = maximize(model, [1, 2], (3, 20, 18), **kw)
    assert_untouched(model, before)
    single = torch.cat([maximize(model, [t], (3, 20, 18), **kw) for t in (1, 2)])
    torch.testing.assert_close(both, single, rtol=1e-4, atol=1e-5)
    assert torch.equal(both, maximize(model, [1, 2], (3, 20, 18), **kw))
    assert not torch.allclose(both, maximize(model, [1, 2], (3, 20, 18), **kw, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(maximize(model, [1, 2], (3, 20, 18), **kw), both)


def test_auto_recipe_is_fourier_for_photos_only() -> None:
    assert maximize_settings((3, 96, 96))["param"] == "fourier"
    assert maximize_settings((3, 96, 96))["transforms"] == {"pad": 6, "jitter": 8, "scale": 0.1, "rotate": 10.0}
    assert maximize_settings((1, 96, 96))["param"] == "pixel"  # digits: no colours to decorrelate
    assert maximize_settings((3, 32, 32))["param"] == "pixel"
    assert maximize_settings((3, 32, 32), "fourier", steps=7, jitter=3)["transforms"]["jitter"] == 3
    assert maximize_settings((3, 96, 96), steps=7, tv=0.1)["steps"] == 7
    assert maximize_settings((3, 96, 96))["init_std"] == 0.01  # classes: Lucid's grey start
    assert maximize_settings((3, 96, 96), layer="layer3")["init_std"] == 0.5  # units: a start that wakes them
    with pytest.raises(VisError, match="param must be"):
        maximize_settings((3, 96, 96), "fft")


def test_bad_requests_raise_clear_errors() -> None:
    model = PlainNet().eval()
    with pytest.raises(VisError, match="objective 'neuron' needs a layer"):
        maximize(model, [0], (3, 16, 16), objective="neuron")
    with pytest.raises(VisError, match="objective 'logit' takes no layer"):
        maximize(model, [0], (3, 16, 16), layer="conv1", objective="logit")
    with pytest.raises(VisError, match="mean has 2 values for images with 3 channels"):
        maximize(model, [0], (3, 16, 16), mean=(0.5, 0.5))
    with pytest.raises(VisError, match="channel index out of range"):
        maximize(model, [7], (3, 16, 16), layer="conv1", param="fourier", steps=1)


def test_the_fourier_recipes_adam_equals_torch_optim_adam_on_the_negated_objective() -> None:
    from cnnvis.vis.maximize import _Adam

    torch.manual_seed(0)
    theirs = torch.randn(40, requires_grad=True)
    ours = theirs.detach().clone()
    optimizer, adam = torch.optim.Adam([theirs], lr=0.05), _Adam(ours, 0.05)
    for _ in range(15):
        grad = torch.randn(40)
        theirs.grad = -grad
        optimizer.step()
        adam.ascend(grad)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
