"""Every registered method: right shapes, the user's model left exactly as it was, batch-size invariance."""

from __future__ import annotations

import pytest
import torch
from vis_helpers import FailingNet, TinyCNN, assert_untouched, mixed_state, snapshot

from cnnvis.vis import METHODS, LayerNotFoundError, method_names, run_method

NAMES = method_names()
# small settings so the whole matrix stays fast; the defaults are exercised in test_registry
FAST = {
    "smoothgrad": {"samples": 4},
    "smoothgrad-sq": {"samples": 4},
    "vargrad": {"samples": 4},
    "integrated-gradients": {"steps": 6},
    "maximize": {"steps": 4},
    "occlusion": {"window": 3, "stride": 2},
    "deepdream": {"steps": 3},
}
TARGETS = [0, 1, 2, 3]


def run(name: str, model: torch.nn.Module, images: torch.Tensor, targets="pred", **kw):
    return run_method(name, model, images, targets, **{**FAST.get(name, {}), **kw})


def assert_same(a, b, atol: float = 1e-5) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k], atol)
    else:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def test_registry_has_the_documented_methods() -> None:
    assert NAMES == ["activations", "filters", "occlusion", "cam", "gradcam", "gradcam++", "xgradcam", "layercam",
                     "hirescam", "eigencam", "scorecam", "ablationcam", "fullgrad", "guided-gradcam", "saliency",
                     "guided-backprop", "deconvnet", "input-x-gradient", "smoothgrad", "smoothgrad-sq", "vargrad",
                     "integrated-gradients", "maximize", "deepdream"]


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_device_and_model_untouched(name: str) -> None:
    model = mixed_state(TinyCNN())
    before = snapshot(model)
    images = torch.randn(3, 1, 12, 10)  # non-square on purpose
    out = run(name, model, images)
    kind = METHODS[name].kind
    if kind == "heatmap":
        assert out.shape == (3, 12, 10)
    elif kind == "activations":
        (maps,) = out.values()
        assert maps.shape == (3, 6, 6, 5)
    elif kind == "filters":
        assert out.shape == (6, 1, 3, 3)
    else:
        assert out.shape == images.shape
    values = torch.cat([v.flatten() for v in out.values()]) if isinstance(out, dict) else out
    assert values.device == images.device and torch.isfinite(values).all()
    assert not values.requires_grad
    assert_untouched(model, before)  # hooks gone, train/eval per submodule, requires_grad, BN stats


@pytest.mark.parametrize("fail_on", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_model_untouched_when_forward_raises(name: str, fail_on: int) -> None:
    model = mixed_state(FailingNet(fail_on))
    before = snapshot(model)
    try:
        run(name, model, torch.randn(2, 1, 12, 12))
    except RuntimeError as exc:
        assert "boom" in str(exc)
    assert_untouched(model, before)


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS[n].accepts_layer])
def test_bad_layer_name_lists_valid_names_and_leaves_model_alone(name: str) -> None:
    model = mixed_state(TinyCNN())
    before = snapshot(model)
    with pytest.raises(LayerNotFoundError, match=r"no layer 'features\.99'.*valid layer names: features, features\.0"):
        run(name, model, torch.randn(2, 1, 12, 12), layer="features.99")
    assert_untouched(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_four_equals_single_images(name: str) -> None:
    model = TinyCNN()
    images = torch.randn(4, 1, 12, 10)
    whole = run(name, model, images, TARGETS)
    parts = [run(name, model, images[i : i + 1], [TARGETS[i]]) for i in range(4)]
    if isinstance(whole, dict):
        assert_same(whole, {k: torch.cat([p[k] for p in parts]) for k in whole})
    elif METHODS[name].kind == "filters":
        assert all(torch.equal(whole, p) for p in parts)
    else:
        assert_same(whole, torch.cat(parts))


@pytest.mark.parametrize("name", NAMES)
def test_works_under_no_grad_inference_mode_and_frozen_backbone(name: str) -> None:
    model = TinyCNN()
    images = torch.randn(2, 1, 12, 12)
    reference = run(name, model, images, [1, 2])
    with torch.no_grad():
        assert_same(run(name, model, images, [1, 2]), reference)
    with torch.inference_mode():
        assert_same(run(name, model, images.clone(), [1, 2]), reference)
    for p in model.features.parameters():  # cnnvis.models.freeze_backbone style
        p.requires_grad_(False)
    assert_same(run(name, model, images, [1, 2]), reference)
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 2
    for p in model.parameters():
        p.requires_grad_(False)
    assert_same(run(name, model, images, [1, 2]), reference)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS[n].kind == "heatmap"])
def test_user_grad_fields_are_not_touched(name: str) -> None:
    model = TinyCNN()
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    run(name, model, torch.randn(2, 1, 12, 12))
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[n]), n
