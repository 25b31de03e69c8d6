"""Rendering: tensors -> pictures (no display, no pyplot state)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import Normalize

from cnnvis import plots as R
from cnnvis.errors import CnnvisError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blobs(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Raw (un-normalised) maps with one gaussian blob each, values roughly 0.2..3.2."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    out = []
    for _ in range(n):
        cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
        out.append(3.0 * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (0.2 * h) ** 2)) + 0.2)
    return torch.stack(out)


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


# ------------------------------------------------------------------ tensors


@pytest.mark.parametrize("mean,std", [(MNIST_MEAN, MNIST_STD), (RGB_MEAN, RGB_STD)])
def test_denormalize_inverts_normalize(mean, std):
    x = torch.rand(4, len(mean), 9, 7)
    back = R.denormalize(Normalize(mean, std)(x), mean, std)
    assert back.shape == x.shape and back.dtype == torch.float32
    torch.testing.assert_close(back, x, atol=1e-6, rtol=0)
    # a single image [C,H,W] becomes a batch of one; a torch tensor of stats works too
    one = R.denormalize(Normalize(mean, std)(x[0]), torch.tensor(mean), torch.tensor(std))
    torch.testing.assert_close(one[0], x[0], atol=1e-6, rtol=0)


def test_denormalize_clamps_and_checks_channels():
    out = R.denormalize(torch.tensor([[[[10.0, -10.0]]]]), (0.5,), (0.5,))
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(CnnvisError, match="3 channel"):
        R.denormalize(torch.zeros(1, 3, 4, 4), (0.1, 0.2), (0.3, 0.3))


def test_grey_images_become_rgb():
    grey = torch.rand(2, 1, 5, 5)
    rgb = R.to_rgb(grey)
    assert rgb.shape == (2, 3, 5, 5)
    assert torch.equal(rgb[:, 0], rgb[:, 2])


def test_colorize_uses_the_colour_map():
    maps = torch.tensor([[[0.0, 1.0]]])
    rgb = R.colorize(maps, "inferno")
    assert rgb.shape == (1, 3, 1, 2)
    import matplotlib

    top = torch.tensor(matplotlib.colormaps["inferno"](1.0)[:3], dtype=torch.float32)
    torch.testing.assert_close(rgb[0, :, 0, 1], top)


def test_overlay_shape_range_and_colour_where_map_is_high():
    images = torch.full((2, 1, 16, 16), 0.5)  # flat grey, one channel
    maps = torch.zeros(2, 4, 4)
    maps[:, 0, 0] = 1.0  # hot top-left corner, smaller than the image: must be upsampled
    out = R.overlay(images, maps, alpha=0.6)
    assert out.shape == (2, 3, 16, 16)
    assert out.min() >= 0 and out.max() <= 1 and not torch.isnan(out).any()
    hot, cold = out[:, :, 0, 0], out[:, :, -1, -1]
    assert (hot[:, 0] - hot[:, 2] > 0.2).all()  # inferno's top is yellow: red >> blue
    assert (hot.sum(1) > cold.sum(1) + 0.5).all()
    assert torch.allclose(cold[:, 0], cold[:, 1], atol=0.05)  # cold stays near grey/dark
    # alpha = 0 leaves the image alone
    torch.testing.assert_close(R.overlay(images, maps, alpha=0.0), R.to_rgb(images))


def test_signed_overlay_keeps_image_where_map_is_zero():
    images = torch.rand(1, 3, 8, 8)
    out = R.overlay(images, torch.full((1, 8, 8), 0.5), alpha=0.7, cmap=R.DIVERGING_CMAP, signed=True)
    torch.testing.assert_close(out, images)


def test_constant_map_figure_has_no_red_map_panel():
    with pytest.warns(RuntimeWarning, match="constant"):
        png = R.heatmap_figure(torch.rand(1, 3, 16, 16), torch.zeros(1, 4, 4), panel_size=1.0)
    px = _pixels(png)
    assert not np.isnan(px).any()
    red = (px[..., 0] > 200) & (px[..., 1] < 80) & (px[..., 2] < 80)
    assert red.mean() < 0.01


# ------------------------------------------------------------------ figures


def test_heatmap_figure_mnist_sized_with_sidecar(tmp_path: Path):
    digits = torch.zeros(8, 1, 28, 28)
    digits[:, :, 6:22, 12:16] = 1.0
    images = Normalize(MNIST_MEAN, MNIST_STD)(digits)
    captions = [R.format_caption(str(i), str(i), 0.9, str(i)) for i in range(8)]
    sidecar = {
        "method": "gradcam",
        "layer": "features.9",
        "target": [3, 1],
        "score": torch.tensor(0.25),
        "maps_max": np.array([1.5, 2.0]),
        "checkpoint": tmp_path / "best.pt",
        "params": {"alpha": 0.5, "size": (28, 28)},
        "nan": float("nan"),
    }
    out = tmp_path / "deep" / "er" / "gradcam.png"
    png = R.heatmap_figure(
        images, _blobs(8, 7, 7), mean=MNIST_MEAN, std=MNIST_STD, captions=captions,
        title="Grad-CAM · features.9", map_label="Grad-CAM", path=out, sidecar=sidecar,
    )
    assert out.read_bytes() == png
    width, height = png.size
    assert 800 <= width <= 1600 and 600 <= height <= 1600  # 8 groups of 3 readable panels
    assert sorted(p.name for p in out.parent.iterdir()) == ["gradcam.json", "gradcam.png"]  # no temp files
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta == {
        "method": "gradcam",
        "layer": "features.9",
        "target": [3, 1],
        "score": 0.25,
        "maps_max": [1.5, 2.0],
        "checkpoint": str(tmp_path / "best.pt"),
        "params": {"alpha": 0.5, "size": [28, 28]},
        "nan": None,
    }


def test_heatmap_figure_rgb_non_square(tmp_path: Path):
    images = Normalize(RGB_MEAN, RGB_STD)(torch.rand(3, 3, 64, 80))
    png = R.heatmap_figure(
        images, torch.randn(3, 8, 10), mean=RGB_MEAN, std=RGB_STD,
        captions=["true: rose · pred: rose 97% · target: rose"] * 3, normalize="signed", clip_percentile=99,
    )
    width, height = png.size
    assert 450 <= width <= 1400 and 400 <= height <= 1400
    path = R.save_png(png, tmp_path / "sal", {"method": "saliency"})
    assert path == tmp_path / "sal.png" and path.exists()
    assert json.loads((tmp_path / "sal.json").read_text()) == {"method": "saliency"}


def test_heatmap_figure_checks_counts():
    with pytest.raises(ValueError, match="map"):
        R.heatmap_figure(torch.rand(2, 1, 8, 8), torch.rand(3, 8, 8))


def test_filter_grid_colour_for_rgb_first_layer_and_grey_deeper():
    torch.manual_seed(0)
    rgb = _pixels(R.filter_grid_figure(torch.randn(16, 3, 5, 5), "conv1"))
    chroma = rgb.max(-1) - rgb.min(-1)
    coloured = chroma > 40
    assert coloured.mean() > 0.05  # R, G and B differ over a good part of the picture
    assert ((rgb[..., 0] > rgb[..., 2] + 40) & coloured).sum() > 100  # reddish tiles ...
    assert ((rgb[..., 2] > rgb[..., 0] + 40) & coloured).sum() > 100  # ... and bluish ones

    for weights in (torch.randn(8, 4, 3, 3), torch.randn(12, 1, 5, 5)):  # deeper layer, grey input
        grey = _pixels(R.filter_grid_figure(weights, "features.4"))
        chroma = grey.max(-1) - grey.min(-1)
        mid = (chroma < 3) & (grey[..., 0] > 30) & (grey[..., 0] < 225)
        assert mid.mean() > 0.03  # grey weights are there
        tinted = chroma > 3  # only the bluish separator between tiles has colour
        assert (grey[..., 2][tinted] >= grey[..., 0][tinted]).all()


def test_filter_grid_caps_and_accepts_modules():
    conv = torch.nn.Conv2d(64, 128, 3)
    png = R.filter_grid_figure(conv, "layer1.0.conv1", title="Filters", max_filters=8, max_inputs=8)
    assert png.width > 300 and png.height > 300


def test_activation_grid_figure():
    acts = {
        "features.2": torch.rand(1, 32, 28, 28),
        "features.13": torch.rand(100, 7, 7),  # capped at 64 channels
        "avgpool": torch.rand(1, 100, 1, 1),  # vector: bars
        "dead": torch.zeros(4, 5, 5),  # constant maps must not break anything
    }
    png = R.activation_grid_figure(acts, "Activations", image=torch.rand(1, 28, 28))
    px = _pixels(png)
    assert png.width >= 700 and png.height >= 700
    assert (px.max(-1) - px.min(-1) > 40).mean() > 0.05  # viridis colours


def test_image_grid_figure_and_tensor_for_tensorboard():
    images = Normalize(MNIST_MEAN, MNIST_STD)(torch.rand(10, 1, 28, 28))
    captions = [f"true {i} / pred {(i + 1) % 10} (83%)" for i in range(10)]
    png = R.image_grid_figure(images, captions, "Misclassified", mean=MNIST_MEAN, std=MNIST_STD)
    t = R.figure_to_tensor(png)
    assert t.dtype == torch.uint8 and t.shape == (3, png.height, png.width)
    assert png.width >= 8 * 100  # 8 columns of visibly upscaled digits


def test_figures_from_matplotlib_objects_and_no_pyplot_leak(tmp_path: Path):
    from matplotlib import _pylab_helpers
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    t = R.figure_to_tensor(fig, close=False)
    assert t.shape == (3, 50, 100)
    path = R.save_png(fig, tmp_path / "a" / "plot.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "a" / "plot.json").exists()
    for _ in range(3):
        R.image_grid_figure(torch.rand(2, 3, 8, 8))
    assert _pylab_helpers.Gcf.get_num_fig_managers() == 0


def test_format_caption():
    assert R.format_caption("rose", "rose", 0.97, "rose") == "true: rose · pred: rose 97% · target: rose"
    assert R.format_caption(pred="7", prob=0.999) == "pred: 7 100%"
    assert R.format_caption(true="1", pred="7", prob=0.083) == "true: 1 · pred: 7 8.3%"


def test_no_warnings_for_normal_maps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.heatmap_figure(torch.rand(2, 1, 12, 12), _blobs(2, 3, 3), panel_size=1.0)
