"""ROAD (remove and debias) and max-sensitivity: equal to pytorch-grad-cam's ROAD classes and
Captum's ``sensitivity_max`` on the same model, inputs, maps and noise, and right on cases whose
answer is known (a linear ramp is imputed exactly; a perfect map beats its reverse)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnvis.errors import ConfigError
from cnnvis.metrics.faithfulness import FaithfulnessRow, method_explainer, rank_rows
from cnnvis.metrics.randomization import CascadeStep, RandomizationResult
from cnnvis.metrics.road import (
    impute,
    kept_count,
    removal_masks,
    road_curves,
    road_score,
)
from cnnvis.metrics.sensitivity import max_sensitivity, perturbations

pytestmark = pytest.mark.usefixtures("one_thread")

FRACTIONS = (0.2, 0.5, 0.8)


def small_net(channels: int = 3, classes: int = 3) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes)).eval()


@pytest.fixture
def case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, 12, 12, generator=g)  # 144 pixels: no percentile index falls on an integer
    maps = torch.rand(3, 12, 12, generator=g)  # continuous: no ties, so the reference's threshold is exact
    return small_net(), images, torch.tensor([0, 1, 2]), maps


@pytest.mark.parametrize("channels", [1, 3])
def test_imputation_equals_pytorch_grad_cam_with_the_same_noise(channels):
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, channels, 10, 9, generator=g)
    removed = torch.rand(3, 90, generator=g) < 0.6
    mine = impute(images, removed, noise=0.01, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(5)  # the reference draws its noise from the global generator, image by image
    theirs = torch.stack([road.NoisyLinearImputer(noise=0.01)(images[i], (~removed[i]).float().view(10, 9)) for i in range(3)])
    assert torch.allclose(mine, theirs, atol=1e-6), (mine - theirs).abs().max()
    assert torch.equal(mine.view(3, channels, 90)[~removed[:, None].expand(-1, channels, -1)],
                       images.view(3, channels, 90)[~removed[:, None].expand(-1, channels, -1)])  # kept pixels untouched


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_curves_equal_pytorch_grad_cam_road(case, order):
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, images, targets, maps = case
    mine = road_curves(model, images, targets, maps, order, fractions=FRACTIONS, generator=torch.Generator().manual_seed(9))
    # the same stream: our generator draws the (unused) tie-breaks first, then the noise
    stream = torch.Generator().manual_seed(9)
    torch.rand(3, 144, generator=stream)
    torch.default_generator.set_state(stream.get_state())
    metric = road.ROADMostRelevantFirst if order == "morf" else road.ROADLeastRelevantFirst
    theirs = torch.stack([
        torch.from_numpy(metric(percentile=round(100 * (1 - f)))(images, maps.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in targets],
                                                                 model, return_diff=False))
        for f in FRACTIONS], dim=1)
    assert torch.allclose(mine, theirs, atol=1e-5), (mine, theirs)


def test_road_combined_equals_pytorch_grad_cam_without_noise(case):
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, images, targets, maps = case
    morf, lerf = (road_curves(model, images, targets, maps, o, fractions=FRACTIONS, noise=0.0) for o in ("morf", "lerf"))
    combined = road.ROADCombined(percentiles=[round(100 * (1 - f)) for f in FRACTIONS])
    for averager in (combined.morf_averager, combined.lerf_averager):  # their classes fix the noise at 0.01: turn it off
        averager.imputer = lambda p, cls=averager.imputer: _silent(cls(p))
    theirs = combined(images, maps.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in targets], model)
    assert torch.allclose(road_score(morf, lerf), torch.from_numpy(theirs), atol=1e-5)


def _silent(metric):
    metric.perturbation.imputer.noise = 0.0
    return metric


def test_a_linear_ramp_is_imputed_exactly():
    """Each removed pixel is the weighted mean of its neighbours, which a linear function already is."""
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (0.3 * y - 0.2 * x + 1).expand(2, 2, 16, 16).clone()
    removed = torch.zeros(2, 16, 16, dtype=torch.bool)
    removed[0, 3:12, 4:10] = True  # one hole inside
    removed[1, :, 8:] = True  # one reaching the edge: the edge pixels average the neighbours they have
    filled = impute(ramp, removed.view(2, -1), noise=0.0)
    assert torch.allclose(filled[0], ramp[0], atol=1e-5)
    assert torch.allclose(filled[1, :, :, :8], ramp[1, :, :, :8])  # what was kept is kept
    border = ramp[1, :, :, 7]  # the only known neighbours of the removed half
    fill = filled[1, :, :, 8:]
    assert border.min() - 1e-5 <= fill.min() and fill.max() <= border.max() + 1e-5  # a mean never overshoots
    noisy = impute(ramp, removed.view(2, -1), noise=0.5, generator=torch.Generator().manual_seed(0))
    assert 0.3 < (noisy - ramp)[0][:, removed[0]].std() < 0.7  # the noise goes where pixels were removed


def test_an_image_with_every_pixel_removed_becomes_the_mean():
    images = torch.randn(2, 1, 5, 5)
    removed = torch.zeros(2, 25, dtype=torch.bool)
    removed[0] = True
    removed[1, :5] = True
    filled = impute(images, removed, noise=0.0)
    assert torch.equal(filled[0], torch.zeros(1, 5, 5))
    assert torch.isfinite(filled[1]).all()


def test_removal_counts_follow_the_reference_percentile_and_orders_are_complements():
    maps = torch.rand(2, 9, 11)
    morf, lerf = removal_masks(maps, [0.3], "morf")[0], removal_masks(maps, [0.7], "lerf")[0]
    kept = kept_count(99, 0.3)
    assert kept == 69 and (morf.sum(1) == 99 - kept).all()
    top = maps.view(2, -1).argsort(dim=1, descending=True)[:, : 99 - kept]
    assert morf.gather(1, top).all()  # MoRF removes the highest values
    assert not lerf.gather(1, maps.view(2, -1).argsort(dim=1, descending=True)[:, :kept_count(99, 0.7)]).any()
    with pytest.raises(ConfigError):
        removal_masks(maps, [1.0], "morf")


def test_a_perfect_map_scores_better_road_than_its_reverse():
    """Bright spots on a flat background carry all the evidence: removing them (filled in from the
    dark neighbours) loses the class, removing background keeps it."""
    g = torch.Generator().manual_seed(0)

    class Spots(nn.Module):
        def forward(self, x):
            evidence = 0.1 * x.flatten(1).sum(1) - 1
            return torch.stack([evidence, torch.zeros_like(evidence)], 1)

    images = torch.zeros(4, 1, 12, 12)
    images.view(4, -1).scatter_(1, torch.rand(4, 144, generator=g).argsort(1)[:, :6], 3.0)
    perfect = images[:, 0] + 0.01 * torch.rand(4, 12, 12, generator=g)
    targets = torch.zeros(4, dtype=torch.long)

    def score(maps):
        curves = [road_curves(Spots(), images, targets, maps, o, fractions=FRACTIONS, noise=0.0) for o in ("morf", "lerf")]
        return float(road_score(*curves).mean())

    assert score(perfect) > 0.1 > -0.1 > score(-perfect), (score(perfect), score(-perfect))


def test_max_sensitivity_equals_captum_with_the_same_perturbations(case):
    captum_metrics = pytest.importorskip("captum.metrics")
    model, images, targets, _ = case
    explain = method_explainer("saliency")
    noise = perturbations(images, 4, 0.05, torch.Generator().manual_seed(2))
    mine = max_sensitivity(model, images, targets, explain, samples=4, noise=noise)
    theirs = captum_metrics.sensitivity_max(lambda x, target: (explain(model, x[0] if isinstance(x, tuple) else x, target),), images,
                                            perturb_func=lambda x: x + noise, n_perturb_samples=4, target=targets)
    assert torch.allclose(mine, theirs, atol=1e-5), (mine, theirs)
    in_chunks = max_sensitivity(model, images, targets, explain, samples=4, noise=noise, chunk=5)
    assert torch.allclose(in_chunks, mine, atol=1e-6)  # chunks of the perturbed copies change nothing
    assert (mine > 0).all()


def test_a_map_that_ignores_the_input_has_zero_sensitivity(case):
    model, images, targets, _ = case
    fixed = torch.rand(12, 12)
    stable = max_sensitivity(model, images, targets, lambda m, x, t: fixed.expand(x.shape[0], 12, 12), samples=3,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(stable, torch.zeros(3))
    with pytest.raises(ConfigError):
        perturbations(images, 0)


def _row(name: str, margin: float, road: float, passed: bool = True) -> FaithfulnessRow:
    rho = 0.1 if passed else 0.9
    return FaithfulnessRow(name, None, 0.5 - margin / 2, 0.5 + margin / 2, RandomizationResult([CascadeStep("x", 1, rho, 0.0)]),
                           [], [], True, 0.0, road_morf=0.5 - road, road_lerf=0.5 + road)


def test_ranking_weighs_insertion_minus_deletion_and_road_equally():
    rows = [_row("a", 0.30, 0.00), _row("b", 0.20, 0.20), _row("c", 0.10, 0.10), _row("bad", 0.9, 0.9, passed=False)]
    ranked = [r.method for r in rank_rows(rows)]
    # places (margin, ROAD): a (0, 2), b (1, 0), c (2, 1): b best on average; failing last whatever its scores
    assert ranked == ["b", "a", "c", "bad"]
    rows = [_row("a", 0.30, 0.00), _row("b", 0.25, 0.20), _row("c", 0.10, 0.10)]
    rows.append(_row("d", 0.05, 0.30))
    # places: a (0, 3) 1.5, b (1, 1) 1.0, c (2, 2) 2.0, d (3, 0) 1.5 -> b, then a and d by margin, then c
    assert [r.method for r in rank_rows(rows)] == ["b", "a", "d", "c"]
    unmeasured = [_row("a", 0.1, float("nan")), _row("b", 0.2, float("nan"))]
    assert [r.method for r in rank_rows(unmeasured)] == ["b", "a"]  # without ROAD: insertion - deletion alone
