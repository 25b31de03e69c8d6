"""The gradient family agrees with Captum on the same model, inputs and noise.

Noise tunnel: Captum draws its noise inside ``NoiseTunnel._add_noise_to_input`` with an unseeded
``torch.normal``; the tests replace that one function so that it adds *our* noise (the seeded
draws ``eps_s`` of ``noise_tunnel``, scaled by each image's sigma), row ``i * samples + s`` for
image ``i`` and sample ``s`` as Captum's ``repeat_interleave`` orders them. Everything after the
draw -- the base attribution of every noisy copy, the sums, the mean, mean square and variance --
is Captum's own code.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

captum_attr = pytest.importorskip("captum.attr")
from captum.attr._core.noise_tunnel import NoiseTunnel  # noqa: E402
from vis_helpers import PlainNet, randomize_batchnorm, scaled_plain_net  # noqa: E402

from cnnvis.vis import (  # noqa: E402
    deconvnet,
    guided_backprop,
    input_x_gradient,
    noise_tunnel,
    saliency,
)

TARGETS = torch.tensor([0, 3, 1])
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")


@pytest.fixture
def plain() -> PlainNet:
    return scaled_plain_net()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 10, 14)


def close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    theirs = torch.as_tensor(theirs, dtype=ours.dtype).detach()
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol * max(1.0, float(theirs.abs().max())))


def test_deconvnet_matches_captum_deconvolution(plain, images) -> None:
    ref = captum_attr.Deconvolution(plain).attribute(images, target=TARGETS)
    close(deconvnet(plain, images, TARGETS, reduce=None), ref)  # raw signed reconstruction
    close(deconvnet(plain, images, TARGETS), ref.abs().amax(dim=1))
    # a different map from both its relatives: not gated by the forward sign, not the plain gradient
    assert not torch.allclose(ref, guided_backprop(plain, images, TARGETS, reduce=None), atol=1e-3)
    assert not torch.allclose(ref, saliency(plain, images, TARGETS, reduce=None), atol=1e-3)


def test_input_x_gradient_matches_captum(plain, images) -> None:
    ref = captum_attr.InputXGradient(plain).attribute(images, target=TARGETS)
    close(input_x_gradient(plain, images, TARGETS, reduce=None), ref)
    close(input_x_gradient(plain, images, TARGETS), ref.sum(dim=1))  # default: signed sum over channels


def test_input_x_gradient_matches_captum_on_resnet18_through_the_fused_copy() -> None:
    torch.manual_seed(1)
    model = randomize_batchnorm(resnet18(weights=None, num_classes=6)).eval()
    images, t = torch.randn(2, 3, 32, 24), torch.tensor([2, 5])
    ref = captum_attr.InputXGradient(model).attribute(images, target=t)
    close(input_x_gradient(model, images, t, reduce=None), ref, atol=1e-5)


def _captum_base(over: str, model: torch.nn.Module, absolute: bool) -> tuple[object, dict]:
    if over == "saliency":
        return captum_attr.Saliency(model), {"abs": absolute}
    if over == "input-x-gradient":
        return captum_attr.InputXGradient(model), {}
    if over == "guided-backprop":
        return captum_attr.GuidedBackprop(model), {}
    if over == "deconvnet":
        return captum_attr.Deconvolution(model), {}
    return captum_attr.IntegratedGradients(model), {"n_steps": 5, "baselines": -0.5, "method": "gausslegendre"}


@pytest.mark.parametrize("over", ["saliency", "input-x-gradient", "guided-backprop", "deconvnet",
                                  "integrated-gradients"])
@pytest.mark.parametrize("tunnel", ["smoothgrad", "smoothgrad-sq", "vargrad"])
def test_noise_tunnel_matches_captum_with_the_same_noise(plain, images, monkeypatch, tunnel: str, over: str) -> None:
    samples, noise, seed = 4, 0.2, 3
    # our noise, drawn as noise_tunnel documents it: seeded N(0, 1) per sample, scaled per image
    flat = images.reshape(len(images), -1)
    sigma = (noise * (flat.amax(dim=1) - flat.amin(dim=1))).view(-1, 1, 1, 1)
    eps = torch.randn((samples, *images.shape[1:]), generator=torch.Generator().manual_seed(seed))
    drawn = (sigma[:, None] * eps[None]).reshape(-1, *images.shape[1:])  # row i * samples + s
    monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(
        lambda x, stdev, k: x.repeat_interleave(k, dim=0) + drawn))
    absolute = tunnel == "smoothgrad" and over == "saliency"  # smoothgrad's default |gradient|, Captum's abs=True
    base, kwargs = _captum_base(over, plain, absolute)
    ref = NoiseTunnel(base).attribute(images, nt_type=tunnel.replace("-", "_"), nt_samples=samples, stdevs=1.0,
                                      target=TARGETS, **kwargs)
    over_params = {"steps": 5, "baseline": -0.5} if over == "integrated-gradients" else None
    ours = noise_tunnel(plain, images, TARGETS, tunnel=tunnel, samples=samples, noise=noise, over=over,
                        over_params=over_params, absolute=absolute, reduce=None, seed=seed, batch_size=5)
    close(ours, ref, atol=1e-5)
