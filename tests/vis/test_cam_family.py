"""What the CAM variants promise beyond matching pytorch-grad-cam: their speed-ups are exact,
slow methods report progress, aug_smooth explains one class, odd models get clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vis_helpers import TinyCNN, assert_untouched, mixed_state, snapshot

from cnnvis.vis import (
    UnsupportedModelError,
    ablationcam,
    eigencam,
    fullgrad,
    gradcam,
    layercam,
    scorecam,
)
from cnnvis.vis.ablationcam import ablated_scores
from cnnvis.vis.cam_base import layer_activations
from cnnvis.vis.progress import reporting
from cnnvis.vis.scorecam import masked_scores


class ConcatNet(nn.Module):
    """A skip connection joined by ``torch.cat``: the layer's input cannot be one image for many
    ablated copies, so Ablation-CAM must fall back to repeating the image."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        return self.fc(torch.cat([s, self.block(s)], dim=1).mean(dim=(2, 3)))


def naive_scores(model: nn.Module, images: torch.Tensor, layer: str, targets: torch.Tensor, ablate: bool) -> torch.Tensor:
    """One plain forward per (image, channel), straight from the papers' definitions."""
    _, acts, _, _ = layer_activations(model, images, targets, layer)
    module = model.get_submodule(layer)
    out = torch.empty(acts.shape[:2])
    with torch.no_grad():
        for i in range(acts.shape[0]):
            for k in range(acts.shape[1]):
                if ablate:
                    a = acts[i : i + 1].clone()
                    a[:, k] = 0 if a.min() == 0 else a.min() - 1e7
                    handle = module.register_forward_hook(lambda _m, _i, _o, a=a: a)
                    out[i, k] = model.eval()(images[i : i + 1])[0, targets[i]]
                    handle.remove()
                else:
                    up = F.interpolate(acts[i : i + 1, k : k + 1], size=images.shape[-2:], mode="bilinear",
                                       align_corners=True)
                    mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                    out[i, k] = model.eval()(images[i : i + 1] * mask)[0, targets[i]]
    return out


def test_scorecam_skipping_dead_channels_and_the_fused_copy_change_nothing() -> None:
    model = TinyCNN(width=8).eval()
    with torch.no_grad():
        model.features[5].bias[:3] = -50.0  # three channels die after the ReLU: constant zero maps
    images, t = torch.randn(3, 1, 12, 10), torch.tensor([0, 1, 3])
    _, acts, _, _ = layer_activations(model, images, t, "features.6")
    assert (acts[:, :3] == 0).all()
    ours = masked_scores(model, images, acts, t, batch_size=4)
    torch.testing.assert_close(ours, naive_scores(model, images, "features.6", t, ablate=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model, layer", [(TinyCNN(width=5), "features.6"), (ConcatNet(), "block")])
def test_ablation_runs_only_the_rest_of_the_network_or_falls_back_exactly(model: nn.Module, layer: str) -> None:
    model.eval()
    images, t = torch.randn(3, 1, 12, 10), torch.tensor([2, 0, 1])
    _, acts, logits, _ = layer_activations(model, images, t, layer)
    ours = ablated_scores(model, images, layer, acts, logits, t, batch_size=3)
    torch.testing.assert_close(ours, naive_scores(model, images, layer, t, ablate=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [scorecam, ablationcam])
def test_slow_methods_report_progress_up_to_their_total(method) -> None:
    seen: list[tuple[int, int]] = []
    with reporting(lambda done, total: seen.append((done, total))):
        method(TinyCNN(), torch.randn(2, 1, 12, 12), batch_size=5)
    assert len(seen) > 1 and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_aug_smooth_explains_the_class_predicted_for_the_original_image() -> None:
    model = TinyCNN().eval()
    images = torch.randn(2, 1, 12, 12)
    pred = model(images).argmax(dim=1)
    smoothed = gradcam(model, images, aug_smooth=True)
    assert torch.equal(smoothed, gradcam(model, images, pred, aug_smooth=True))
    assert smoothed.shape == (2, 12, 12) and smoothed.min() >= 0 and smoothed.max() <= 1


def test_aug_smooth_averages_a_flip_back_into_place() -> None:
    model = TinyCNN().eval()
    image = torch.randn(1, 1, 12, 12)
    mirrored = image.flip(-1)
    # the six copies of a mirrored image are the six copies of the image, mirrored
    torch.testing.assert_close(layercam(model, mirrored, 1, aug_smooth=True),
                               layercam(model, image, 1, aug_smooth=True).flip(-1), rtol=1e-4, atol=1e-5)


def test_fullgrad_refuses_a_model_without_biases_and_leaves_it_alone() -> None:
    model = TinyCNN()  # its convs have no bias; without its BatchNorms nothing is left for FullGrad
    model.features[1] = model.features[5] = nn.Identity()
    model = mixed_state(model)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="FullGrad needs conv layers with biases"):
        fullgrad(model, torch.randn(2, 1, 6, 6))
    assert_untouched(model, before)


def test_eigencam_is_class_agnostic_and_its_sign_is_fixed() -> None:
    model = TinyCNN().eval()
    images = torch.randn(2, 1, 12, 12)
    raw = eigencam(model, images, 0, relu=False, upsample=False)
    assert torch.equal(raw, eigencam(model, images, 3, relu=False, upsample=False))
    # oriented so the component's channel weights sum >= 0: more activation in every channel scores higher
    _, acts, _, _ = layer_activations(model, images, 0, None)
    total = acts.sum(dim=1)
    centred = (total - total.mean(dim=(1, 2), keepdim=True)).flatten(1)
    assert ((raw.flatten(1) * centred).sum(dim=1) > 0).all()


def test_layercam_on_a_shallow_layer_keeps_its_resolution() -> None:
    model = TinyCNN().eval()
    maps = layercam(model, torch.randn(2, 1, 12, 10), 1, "features.2", upsample=False)
    assert maps.shape == (2, 12, 10) and (maps > 0).any()


@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam",
                                  "scorecam", "ablationcam", "fullgrad"])
def test_every_cam_method_takes_aug_smooth(name: str) -> None:
    from cnnvis.vis import METHODS, run_method

    assert METHODS[name].defaults["aug_smooth"] is False
    maps = run_method(name, TinyCNN(), torch.randn(2, 1, 12, 10), [1, 2], aug_smooth=True)
    assert maps.shape == (2, 12, 10) and maps.min() >= 0 and maps.max() <= 1 and (maps > 0).any()


def test_ablation_of_transformer_tokens_keeps_the_class_token_and_the_token_layout() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=3).eval()
    images, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    layer = "encoder.layers.encoder_layer_0.ln_1"
    _, acts, logits, _ = layer_activations(model, images, t, layer)
    assert acts.shape == (2, 8, 2, 2)  # tokens read as a 2 x 2 patch grid
    ours = ablated_scores(model, images, layer, acts, logits, t, batch_size=3)
    module = model.get_submodule(layer)
    for i in range(2):
        for k in range(8):
            def ablate(_m, _a, out, k=k, i=i):
                out = out.clone()
                low = acts[i].min()
                out[:, 1:, k] = 0 if low == 0 else low - 1e7  # the patch tokens only, not the class token
                return out
            handle = module.register_forward_hook(ablate)
            with torch.no_grad():
                want = model(images[i : i + 1])[0, t[i]]
            handle.remove()
            torch.testing.assert_close(ours[i, k], want, rtol=1e-4, atol=1e-3)


def test_ablation_of_a_whole_resnet_stage_feeds_a_small_crop_and_stays_exact() -> None:
    import sys

    from cnnvis.models import SmallResNet

    ablation_module = sys.modules["cnnvis.vis.ablationcam"]
    torch.manual_seed(0)
    model = SmallResNet(3, width=4).eval()
    images, t = torch.randn(2, 3, 64, 48), torch.tensor([1, 2])
    _, acts, logits, _ = layer_activations(model, images, t, "layer4")
    seen: list[tuple[int, ...]] = []
    handle = model.conv1.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    ours = ablation_module.ablated_scores(model, images, "layer4", acts, logits, t, batch_size=5)
    handle.remove()
    assert seen[-1] == (1, 3, 32, 32)  # the network before layer4 ran on a 32 px crop
    torch.testing.assert_close(ours, naive_scores(model, images, "layer4", t, ablate=True), rtol=1e-4, atol=1e-4)
