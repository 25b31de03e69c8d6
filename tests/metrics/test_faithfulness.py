"""Faithfulness checks: deletion / insertion on a model whose true evidence is known, rank
correlation and SSIM, and the cascading randomization test on a trained tiny model."""

from __future__ import annotations

import pytest
import scipy.stats
import torch
from cli_helpers import single_thread
from evaluation_helpers import train_tiny_run
from torch import nn

from cnnvis.data import build_data
from cnnvis.errors import ConfigError
from cnnvis.metrics.faithfulness import faithfulness, method_explainer
from cnnvis.metrics.perturbation import (
    auc,
    importance_order,
    perturbation_curves,
    random_order,
)
from cnnvis.metrics.randomization import (
    SANITY_THRESHOLD,
    cascade_stops,
    cascading_randomization,
    randomizable_layers,
    randomization_check,
)
from cnnvis.metrics.similarity import spearman, ssim
from cnnvis.models import MnistCNN
from cnnvis.run import load_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second intra-op thread only waits


class LinearEvidence(nn.Module):
    """Two classes; class 0's logit is ``sum(weight * x)``, class 1's is 0. Each pixel's true
    contribution to the decision is exactly ``weight * x``: the perfect importance map."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = (x * self.weight).flatten(1).sum(1)
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


@pytest.fixture
def linear_case() -> tuple[LinearEvidence, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(1, 8, 8, generator=g) ** 3 * 0.2  # a few pixels carry most of the evidence
    images = torch.rand(5, 1, 8, 8, generator=g) + 0.5
    model = LinearEvidence(weight)
    contributions = (images * weight)[:, 0]  # [N, H, W]
    return model, images, torch.zeros(5, dtype=torch.long), contributions


def test_perfect_ranking_deletes_and_inserts_better_than_random(linear_case):
    model, images, targets, perfect = linear_case
    steps = 16

    def aucs(order: torch.Tensor) -> tuple[float, float]:
        deletion = perturbation_curves(model, images, targets, order, mode="deletion", steps=steps)
        insertion = perturbation_curves(model, images, targets, order, mode="insertion", steps=steps,
                                        start=torch.zeros_like(images))
        return float(auc(deletion).mean()), float(auc(insertion).mean())

    best_del, best_ins = aucs(importance_order(perfect))
    random_del, random_ins = aucs(random_order(images.shape, torch.Generator().manual_seed(0)))
    worst_del, worst_ins = aucs(importance_order(-perfect))
    # (about 0.64 < 0.81 < 0.91 and 0.91 > 0.80 > 0.64)
    assert best_del + 0.1 < random_del and random_del + 0.05 < worst_del, (best_del, random_del, worst_del)
    assert best_ins - 0.1 > random_ins and random_ins - 0.05 > worst_ins, (best_ins, random_ins, worst_ins)


def test_deletion_curve_is_the_probability_of_the_evidence_left(linear_case):
    model, images, targets, perfect = linear_case
    steps = 8
    order = importance_order(perfect)
    curves = perturbation_curves(model, images, targets, order, mode="deletion", steps=steps, batch_size=7)
    inserted = perturbation_curves(model, images, targets, order, mode="insertion", steps=steps,
                                   start=torch.zeros_like(images), batch_size=3)
    flat = perfect.flatten(1)
    ranked = flat.gather(1, order)  # contributions, most important first
    counts = torch.round(torch.linspace(0, 1, steps + 1) * flat.shape[1]).long()
    kept = torch.stack([ranked[:, c:].sum(1) for c in counts], 1)  # evidence left after deleting the first c
    added = torch.stack([ranked[:, :c].sum(1) for c in counts], 1)
    torch.testing.assert_close(curves, torch.sigmoid(kept), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inserted, torch.sigmoid(added), atol=1e-5, rtol=1e-5)
    assert curves[:, -1].allclose(torch.full((5,), 0.5))  # everything deleted: no evidence either way
    # trapezoid over [0, 1]
    torch.testing.assert_close(auc(curves), (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * steps))


def test_ties_are_broken_randomly_and_reproducibly():
    flat_map = torch.zeros(2, 6, 6)
    first = importance_order(flat_map, torch.Generator().manual_seed(3))
    again = importance_order(flat_map, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert not torch.equal(first[0], torch.arange(36)), "a constant map must not delete top-left first"
    assert torch.equal(first.sort(1).values, torch.arange(36).expand(2, 36))  # a permutation of all pixels
    peaked = flat_map.clone()
    peaked[:, 4, 1] = 1.0
    assert importance_order(peaked)[:, 0].tolist() == [4 * 6 + 1] * 2


def test_spearman_matches_scipy_with_ties_and_ssim_basics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 12, 12, generator=g)
    b = a + 0.3 * torch.rand(3, 12, 12, generator=g)
    a[:, :5] = 0.0  # a ReLU'd map: a large tied region
    b[:, 8:] = 0.0
    ours = spearman(a, b)
    for i in range(3):
        expected = scipy.stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(expected, abs=1e-5)
    assert spearman(a, a ** 3).tolist() == pytest.approx([1.0] * 3)
    assert spearman(a, -a).tolist() == pytest.approx([-1.0] * 3)
    assert spearman(a, torch.zeros_like(a)).tolist() == [0.0] * 3  # nothing ranked: no shared ranking
    assert ssim(a, 3 * a + 1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)  # maps are compared as [0, 1] images
    noise = torch.rand(3, 12, 12, generator=g)
    assert (ssim(a, noise) < 0.3).all()
    assert (ssim(a, b) > ssim(a, noise)).all()


def test_cascade_goes_from_the_head_down_and_leaves_the_model_alone():
    model = MnistCNN(num_classes=3, in_channels=3, width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = randomizable_layers(model)
    assert layers[0] == "fc" and layers[-1] == "features.0"
    assert cascade_stops(len(layers), 3) == [1, 5, 9] and cascade_stops(len(layers), 1) == [9]
    seen = []
    for lowest, count, randomized in cascading_randomization(model, points=3, seed=0):
        changed = [name for name in layers
                   if not torch.equal(dict(randomized.named_modules())[name].weight, dict(model.named_modules())[name].weight)]
        seen.append((lowest, count))
        # exactly the top `count` layers differ (BatchNorm's weight is reset to ones: the fresh model's own)
        assert set(changed) <= set(layers[:count]) and "fc" in changed
        assert layers[count - 1] == lowest
    assert seen == [("fc", 1), ("features.8", 5), ("features.0", 9)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    first = next(cascading_randomization(model, 1, seed=5))[2].state_dict()
    second = next(cascading_randomization(model, 1, seed=5))[2].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded: the same random weights again


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    with single_thread():
        run = load_run(train_tiny_run(tmp_path_factory.mktemp("faithfulness")))
        images = build_data(run.config).fixed_batch("test", 8).images
    return run, images


def test_input_as_map_fails_the_randomization_check_while_gradcam_and_saliency_pass(trained):
    run, images = trained
    # a "map" that is the image itself cannot depend on the weights: it must fail
    input_map = randomization_check(run.model, images, "pred", lambda model, x, targets: x.mean(dim=1))
    assert input_map.spearman == pytest.approx(1.0) and not input_map.passed
    for name in ("gradcam", "saliency"):
        result = randomization_check(run.model, images, "pred", method_explainer(name))
        assert result.passed, (name, result.steps)
        assert result.spearman < SANITY_THRESHOLD
        assert [step.layer for step in result.steps] == ["fc", "features.8", "features.0"]


def test_faithfulness_report_on_the_trained_model(trained):
    run, images = trained
    report = faithfulness(run.model, images, methods=["gradcam", "saliency", "cam"], steps=8, cascade_points=2)
    assert [r.rank for r in report.rows] == [1, 2, 3]
    assert {r.method for r in report.rows} == {"gradcam", "saliency", "cam"}
    for row in report.rows:
        assert len(row.deletion_curve) == len(row.insertion_curve) == 9
        assert len(row.randomization.steps) == 2 and row.randomization.steps[-1].layer == "features.0"
        assert 0.0 <= row.deletion_auc <= 1.0 and 0.0 <= row.insertion_auc <= 1.0
    assert {r.layer for r in report.rows if r.method == "gradcam"} == {"features.13"}
    # every image's own probability is the start of its deletion curve, the same for every method
    assert len({round(r.deletion_curve[0], 5) for r in report.rows}) == 1
    data = report.to_dict()
    assert data["parameters"]["steps"] == 8 and len(data["methods"]) == 3
    with pytest.raises(ConfigError, match="does not make a heatmap"):
        faithfulness(run.model, images, methods=["maximize"])
