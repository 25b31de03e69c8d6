"""Incremental occlusion (cnnvis.vis.incremental) against full forward passes.

Exact means: equal to the full computation to float tolerance. The engine folds eval-mode
BatchNorm into the convolutions and sums in a different order, so logits may differ in the last
bits; every comparison allows 1e-4 of the largest |value| (absolute) plus 1e-4 relative.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, vgg11
from vis_helpers import TinyCNN, randomize_batchnorm

from cnnvis.errors import VisError
from cnnvis.models import build_model
from cnnvis.vis import occlusion_maps
from cnnvis.vis.incremental import IncrementalOcclusion


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def same_maps(a, b) -> None:
    close(a.score, b.score)
    close(a.heatmap, b.heatmap)
    assert torch.equal(a.base_score, b.base_score) and torch.equal(a.targets, b.targets)
    # a class whose logit ties another within float noise may flip; none of these random nets have one
    assert (a.predicted == b.predicted).float().mean() == 1.0


@functools.cache
def _vgg11() -> nn.Module:
    torch.manual_seed(0)
    return vgg11(num_classes=10).eval()  # 133 M parameters: built once (2 s)


def _net(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return randomize_batchnorm(resnet18(num_classes=10)).eval()
    if name == "vgg11":
        return _vgg11()
    channels = 1 if name.startswith("mnist") else 3
    return randomize_batchnorm(build_model(name, 10, channels)).eval()


# (model, image shape N C H W, window, stride, the full path's fused copy): whole sweeps, small
# enough for a few seconds in all. VGG's reference is the plain model: its fused copy is slow.
SWEEPS = [
    ("mnist_cnn", (2, 1, 28, 28), 4, 1, True),
    ("mnist_cnn", (1, 1, 28, 20), (5, 3), (3, 2), False),
    ("mnist_classic", (2, 1, 28, 28), 4, 2, True),
    ("resnet_small", (1, 3, 64, 48), 8, 4, True),
    ("resnet_small", (2, 3, 56, 56), 12, 12, False),
    ("resnet18", (1, 3, 96, 128), 16, 16, True),
    ("vgg11", (1, 3, 64, 96), 16, 12, False),
]


@pytest.mark.parametrize(("name", "shape", "window", "stride", "optimize"), SWEEPS)
def test_incremental_sweep_equals_full_forward(name: str, shape: tuple[int, ...], window, stride, optimize) -> None:
    model = _net(name)
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    full = occlusion_maps(model, images, window=window, stride=stride, score="logit", incremental=False,
                          optimize=optimize)
    inc = occlusion_maps(model, images, window=window, stride=stride, score="logit", incremental=True)
    assert full.computation == "full forward: incremental=False"
    assert inc.computation.startswith("incremental (exact")
    same_maps(inc, full)


@pytest.mark.parametrize(("name", "window", "stride"), [("resnet18", 16, 8), ("resnet18", 24, 20), ("vgg11", 16, 8)])
def test_engine_at_224_px_on_corner_edge_and_inner_positions(name: str, window: int, stride: int) -> None:
    """The issue's size, on a few positions: the top-left corner, edges, the inside, the cut-off last one."""
    model = _net(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        engine = IncrementalOcclusion(model, x, torch.zeros_like(x), (window, window), (stride, stride))
        last = len(engine.window_rows.lo) - 1
        rows, cols = torch.tensor([0, 0, 5, last, last]), torch.tensor([0, 7, 3, 1, last])
        got = engine.logits(rows, cols, torch.zeros(5, dtype=torch.long))
        copies = x.repeat(5, 1, 1, 1)
        for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
            copies[k, :, i * stride : i * stride + window, j * stride : j * stride + window] = 0.0
        close(got, model(copies))


def test_non_square_windows_and_a_tensor_baseline() -> None:
    model = _net("resnet_small")
    images = torch.randn(2, 3, 40, 72)
    baseline = torch.linspace(-1, 1, 72).expand(3, 40, 72)  # a per-pixel fill
    args = {"window": (6, 10), "stride": (5, 7), "baseline": baseline, "score": "prob"}
    same_maps(occlusion_maps(model, images, incremental=True, **args),
              occlusion_maps(model, images, incremental=False, **args))


class WithGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)  # statistics over the whole map: a local change moves every pixel
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).relu().mean(dim=(2, 3)))


class WithConstant(WithGroupNorm):
    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv(x) + self.shift).relu().mean(dim=(2, 3)))


class DataDependent(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
            x = x * 1.0
        return super().forward(x)


@pytest.mark.parametrize(("model", "reason"), [(WithGroupNorm(), r"norm \(GroupNorm\) is not supported"),
                                               (WithConstant(), "add mixes a constant tensor"),
                                               (DataDependent(), "cannot be traced")])
def test_unsupported_model_falls_back_with_the_reason(model: nn.Module, reason: str) -> None:
    model.eval()
    images = torch.randn(2, 1, 12, 12)
    auto = occlusion_maps(model, images, window=3, stride=2, score="logit")
    full = occlusion_maps(model, images, window=3, stride=2, score="logit", incremental=False)
    assert auto.computation.startswith("full forward: ")
    assert re.search(reason, auto.computation), auto.computation
    same_maps(auto, full)
    with pytest.raises(VisError, match="incremental occlusion cannot run on"):
        occlusion_maps(model, images, window=3, stride=2, incremental=True)


def test_model_state_hooks_and_inputs_are_left_as_they_were() -> None:
    model = _net("resnet_small").train()
    model.layer1[0].bn1.eval()  # a mixed state must come back as it was
    calls: list[int] = []
    handle = model.layer2.register_forward_hook(lambda m, i, o: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 32, 32)
    kept = images.clone()
    found = occlusion_maps(model, images, window=8, stride=8)
    assert found.computation.startswith("incremental")
    assert model.training and not model.layer1[0].bn1.training and model.layer2[0].training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    assert torch.equal(images, kept)  # in-place ReLUs never reach the caller's tensors
    assert len(model.layer2._forward_hooks) == 1 and all(p.requires_grad for p in model.parameters())
    handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_batch_of_images_equals_each_image_alone_at_any_batch_size() -> None:
    model = TinyCNN().eval()
    images = torch.randn(3, 1, 16, 20)
    together = occlusion_maps(model, images, [0, 3, 1], window=4, stride=3, incremental=True, batch_size=7)
    for i in range(3):
        alone = occlusion_maps(model, images[i : i + 1], [[0, 3, 1][i]], window=4, stride=3, incremental=True,
                               batch_size=5 + i)
        close(together.heatmap[i : i + 1], alone.heatmap)
        close(together.score[i : i + 1], alone.score)


def test_images_beyond_one_cache_are_swept_in_turns(monkeypatch) -> None:
    from cnnvis.vis import incremental

    model = TinyCNN().eval()
    images = torch.randn(5, 1, 16, 16)
    one_cache = occlusion_maps(model, images, window=4, stride=4)
    monkeypatch.setattr(incremental, "CACHE_ELEMENTS", 1)  # one image per cache
    in_turns = occlusion_maps(model, images, window=4, stride=4, batch_size=3)
    same_maps(in_turns, one_cache)


def test_approximate_mode_is_off_by_default_and_close_to_exact() -> None:
    model = _net("resnet_small")
    images = torch.randn(1, 3, 64, 64)
    exact = occlusion_maps(model, images, window=8, stride=4, score="logit")
    whole = occlusion_maps(model, images, window=8, stride=4, score="logit", approximate=1.0)  # no cap at all
    rough = occlusion_maps(model, images, window=8, stride=4, score="logit", approximate=0.5)
    assert "exact" in exact.computation and "approximate, tau=0.5" in rough.computation
    same_maps(whole, exact)
    assert not torch.allclose(rough.score, exact.score)  # the cap drops part of the change ...
    assert float((rough.drop - exact.drop).abs().max()) < float(exact.drop.abs().max())  # ... not all of it
    with pytest.raises(VisError, match="approximate needs the incremental engine"):
        occlusion_maps(model, images, window=8, approximate=0.5, incremental=False)
    with pytest.raises(VisError, match="approximate must be"):
        occlusion_maps(model, images, window=8, approximate=1.5)
