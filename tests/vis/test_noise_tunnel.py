"""The noise tunnel over every gradient method: exact at zero noise, batching-invariant, seeded,
non-negative where it must be, and clear about bad requests."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from vis_helpers import PlainNet

from cnnvis.errors import UnsupportedModelError, VisError, VisWarning
from cnnvis.vis import (
    deconvnet,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    noise_tunnel,
    saliency,
    smoothgrad,
    smoothgrad_sq,
    vargrad,
)
from cnnvis.vis.progress import reporting

IG = {"steps": 5, "baseline": -0.5}
BASES = {  # over: the base method's raw signed attributions
    "saliency": lambda m, x, t: saliency(m, x, t, reduce=None),
    "input-x-gradient": lambda m, x, t: input_x_gradient(m, x, t, reduce=None),
    "guided-backprop": lambda m, x, t: guided_backprop(m, x, t, reduce=None),
    "deconvnet": lambda m, x, t: deconvnet(m, x, t, reduce=None),
    "integrated-gradients": lambda m, x, t: integrated_gradients(m, x, t, steps=5, baseline=-0.5, reduce=None),
}


@pytest.fixture
def model() -> PlainNet:
    return PlainNet().eval()


@pytest.mark.parametrize("over", list(BASES))
def test_without_noise_the_tunnel_is_its_base_method(model, over: str) -> None:
    images, t = torch.randn(2, 3, 8, 10), [1, 4]
    params = IG if over == "integrated-gradients" else None
    base = BASES[over](model, images, t)
    kw = {"samples": 3, "noise": 0.0, "over": over, "over_params": params, "reduce": None}
    torch.testing.assert_close(smoothgrad(model, images, t, absolute=False, **kw), base)
    torch.testing.assert_close(smoothgrad(model, images, t, **kw), base.abs())
    torch.testing.assert_close(smoothgrad_sq(model, images, t, **kw), base * base)
    assert vargrad(model, images, t, **kw).abs().max() <= 1e-6 * float(base.abs().max()) ** 2


def test_vargrad_is_the_variance_and_sq_the_mean_square_of_the_samples(model) -> None:
    images, t = torch.randn(2, 3, 8, 8), [0, 2]
    kw = {"samples": 6, "seed": 5, "reduce": None}
    mean = smoothgrad(model, images, t, absolute=False, **kw)
    sq = smoothgrad_sq(model, images, t, **kw)
    var = vargrad(model, images, t, **kw)
    assert (var >= 0).all() and var.amax() > 0
    torch.testing.assert_close(var, sq - mean * mean, rtol=1e-4, atol=1e-6 * float(sq.max()))


def test_batching_never_changes_results_not_even_across_integration_steps(model) -> None:
    images, t = torch.randn(3, 3, 8, 8), [0, 1, 2]
    kw = {"samples": 4, "over": "integrated-gradients", "over_params": IG, "reduce": None}
    whole = vargrad(model, images, t, **kw)  # 3 x 4 copies x 5 steps in one pass
    torch.testing.assert_close(vargrad(model, images, t, batch_size=3, **kw), whole)  # steps split over passes
    torch.testing.assert_close(vargrad(model, images, t, batch_size=11, **kw), whole)
    one = torch.cat([vargrad(model, images[i : i + 1], t[i], **kw) for i in range(3)])
    torch.testing.assert_close(one, whole)  # an image's noise does not depend on its batch
    assert not torch.allclose(vargrad(model, images, t, seed=1, **kw), whole)


def test_progress_reaches_the_end(model) -> None:
    seen: list[tuple[int, int]] = []
    with reporting(lambda done, total: seen.append((done, total))):
        smoothgrad_sq(model, torch.randn(3, 3, 8, 8), samples=5, batch_size=4)
    assert seen[-1] == (15, 15) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bad_requests_name_the_choices(model) -> None:
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(VisError, match="vargrad over 'gradcam': choose one of saliency, input-x-gradient"):
        vargrad(model, images, over="gradcam")
    with pytest.raises(VisError, match=r"does not take step; its parameters: steps=50, baseline=0.0"):
        smoothgrad(model, images, over="integrated-gradients", over_params={"step": 3})
    with pytest.raises(VisError, match="over saliency does not take steps; its parameters: none"):
        smoothgrad(model, images, over_params={"steps": 3})
    with pytest.raises(VisError, match="samples >= 1"):
        noise_tunnel(model, images, tunnel="vargrad", samples=0)


def test_over_a_rectifier_rule_refuses_or_warns_once_before_the_samples() -> None:
    smooth = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.Flatten(), nn.Linear(18, 2))
    with pytest.raises(UnsupportedModelError, match="guided backprop found no ReLU"):
        smoothgrad(smooth, torch.randn(1, 1, 5, 5), over="guided-backprop")
    mixed = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.GELU(), nn.Flatten(), nn.Linear(18, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vargrad(mixed, torch.randn(2, 1, 5, 5), over="deconvnet", samples=6, batch_size=2)  # 6 passes
    (warning,) = [w for w in caught if issubclass(w.category, VisWarning)]
    assert "deconvnet applied at 1 ReLU call; 1 GELU call passes the plain gradient" in str(warning.message)
