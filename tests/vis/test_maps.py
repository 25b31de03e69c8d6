"""The one normalisation of maps for display (``cnnvis.vis.maps.normalize_maps``) and the shared blur."""

from __future__ import annotations

import pytest
import torch

from cnnvis.vis.maps import gaussian_blur, normalize_maps


def test_normalize_maps_per_image_batch_and_signed():
    maps = torch.stack([torch.linspace(-2, 6, 16).view(4, 4), torch.linspace(0, 1, 16).view(4, 4)])
    per_image = normalize_maps(maps)
    assert per_image.shape == (2, 4, 4)
    for m in per_image:
        assert m.min() == 0 and m.max() == 1
    batch = normalize_maps(maps, scale="batch")
    assert batch[1].max() < 0.5 and batch[0].max() == 1
    signed = normalize_maps(torch.tensor([[[-1.0, 0.0, 4.0]]]), "signed")
    torch.testing.assert_close(signed[0, 0], torch.tensor([0.375, 0.5, 1.0]))
    tiny = normalize_maps(torch.tensor([[[1e-9, 3e-9]]]))  # small gradients are real maps
    torch.testing.assert_close(tiny[0, 0], torch.tensor([0.0, 1.0]))


def test_constant_and_non_finite_maps_are_drawn_without_nan():
    maps = torch.stack([torch.full((7, 7), 3.0), torch.rand(7, 7)])
    with pytest.warns(RuntimeWarning, match="constant"):
        out = normalize_maps(maps)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], torch.zeros(7, 7))
    assert out[1].max() == 1
    with pytest.warns(RuntimeWarning, match="NaN"):
        out = normalize_maps(torch.tensor([[[float("nan"), 1.0, 2.0]]]))
    assert not torch.isnan(out).any()


def test_every_mode_scales_to_the_unit_interval_as_documented():
    m = torch.tensor([[[-2.0, 0.0, 1.0, 4.0]]])
    torch.testing.assert_close(normalize_maps(m, "minmax")[0, 0], torch.tensor([0.0, 1 / 3, 0.5, 1.0]))
    torch.testing.assert_close(normalize_maps(m, "maxabs")[0, 0], torch.tensor([0.5, 0.0, 0.25, 1.0]))
    torch.testing.assert_close(normalize_maps(m, "signed")[0, 0], torch.tensor([0.25, 0.5, 0.625, 1.0]))
    torch.testing.assert_close(normalize_maps(m, "positive")[0, 0], torch.tensor([0.0, 0.0, 0.25, 1.0]))
    spiky = torch.linspace(0, 1, 100)
    spiky[-1] = 1000.0
    assert normalize_maps(spiky.view(1, 10, 10), "maxabs").flatten()[-2] < 0.01  # the spike sets the scale ...
    clipped = normalize_maps(spiky.view(1, 10, 10), "maxabs", clip_percentile=98).flatten()
    assert clipped[-1] == 1 and clipped[-2] > 0.95  # ... unless it is clipped


def test_gaussian_blur_keeps_constant_images_and_fits_tiny_ones():
    flat = torch.full((2, 3, 9, 9), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)  # reflected borders: no darkening at the edge
    tiny = torch.rand(1, 1, 3, 3)
    assert gaussian_blur(tiny, 5.0).shape == tiny.shape  # the radius shrinks to fit instead of failing
    assert torch.equal(gaussian_blur(tiny, 0.0), tiny)


def test_uninformative_maps_become_zeros_with_a_warning_per_mode() -> None:
    maps = torch.stack([torch.full((4, 5), 3.0), torch.arange(20.0).view(4, 5), -torch.rand(4, 5) - 1])
    with pytest.warns(RuntimeWarning, match="1 of 3 maps are constant"):
        out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(4, 5)) and out[1].max() == 1 and out[1].min() == 0
    with pytest.warns(RuntimeWarning, match="2 of 3 maps are without positive values"):
        out = normalize_maps(maps * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1), mode="positive")
    assert torch.equal(out[0], torch.zeros(4, 5)) and torch.equal(out[2], torch.zeros(4, 5)) and out[1].max() == 1
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out = normalize_maps(torch.tensor([[float("nan"), 1.0], [2.0, float("inf")]]), mode="maxabs")
    assert torch.isfinite(out).all()


def test_a_flat_map_is_drawn_flat_and_an_informative_one_at_full_contrast() -> None:
    from cnnvis.vis.maps import flat_maps

    torch.manual_seed(0)
    flat = 0.731 + 0.029 * torch.rand(7, 7)  # a CAM of 0.731 ... 0.76: a solid block, not a pattern
    blob = torch.exp(-((torch.arange(7.0) - 3) ** 2)[:, None] - ((torch.arange(7.0) - 3) ** 2)[None])
    low = -(0.5 + 0.01 * torch.rand(7, 7))  # flat and negative: drawn near 0, not stretched
    maps = torch.stack([flat, blob, low])
    assert flat_maps(maps).tolist() == [True, False, True]
    out = normalize_maps(maps)
    assert out[0].min() > 0.95 and out[0].max() == 1  # the few percent of variation stay a few percent
    assert out[1].min() == 0 and out[1].max() == 1
    assert out[2].max() < 0.05
    stretched = normalize_maps(maps, flat_spread=None)  # the old contrast stretch, on request
    assert stretched[0].min() == 0 and stretched[0].max() == 1
