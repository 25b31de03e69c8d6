"""Every method on models the project did not build: torchvision and timm CNNs and vision transformers.

Tiny untrained configurations (weights=None, 32-64 px, one image). For each model: the default layer
is the one a practitioner would pick, every heatmap method gives a finite map of the input's size or
says in one line why it does not apply, and transformer Grad-CAM equals pytorch-grad-cam's with its
documented ``reshape_transform``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import make_layers
from vis_helpers import randomize_batchnorm

from cnnvis.commands.summary import summarize
from cnnvis.errors import UnsupportedModelError
from cnnvis.vis import (
    METHODS,
    activations,
    default_layer,
    get_layer,
    gradcam,
    run_method,
)
from cnnvis.vis.layouts import infer_layout

timm = pytest.importorskip("timm")

GELU_MODELS = {"cam", "guided-backprop", "guided-gradcam", "deconvnet"}  # no GAP + linear head, no ReLU to guide
FAST = {"samples": 4, "steps": 8}  #: fewer passes for the sampling and path methods (what they compute is tested elsewhere)


def _random_heads(model: nn.Module) -> nn.Module:
    """Untrained torchvision ViTs start with an all-zero head (every gradient would be zero)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.5)
    return randomize_batchnorm(model).eval()


def _vgg() -> nn.Module:
    with torch.device("meta"):  # skip initialising VGG's 100M-parameter head; both parts are replaced below
        model = torchvision.models.VGG(make_layers([8, "M"]), num_classes=5)
    model.features = make_layers([8, "M", 16, "M", 32, 32, "M", 32, 32, "M"])  # vgg11's layout, narrower
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 5))
    return model


def _timm_vit(name: str, **kw: object) -> nn.Module:
    return timm.create_model(name, pretrained=False, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=5, **kw)


tv = torchvision.models
# name -> (builder, image size, default layer, methods expected to be unsupported)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, str, set[str]]] = {
    "resnet18": (lambda: tv.resnet18(num_classes=5), 64, "layer4", set()),
    "vgg11-style": (_vgg, 32, "features.14", {"cam"}),  # flat features: the last (in-place) ReLU
    "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=5), 64, "features", {"cam"}),  # ReLU6 (guided by its own rule), functional pool
    "densenet": (lambda: tv.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5),
                 32, "features", {"cam"}),  # functional final ReLU and pooling
    "vit": (lambda: tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                         mlp_dim=64, num_classes=5), 32, "encoder.layers.encoder_layer_1.ln_1",
            GELU_MODELS),
    "swin": (lambda: tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                        window_size=[4, 4], num_classes=5), 32, "features.3.1.norm1", GELU_MODELS),
    "timm-vit": (lambda: _timm_vit("vit_tiny_patch16_224", img_size=32), 32, "blocks.1.norm1", GELU_MODELS),
    "timm-deit-distilled": (lambda: _timm_vit("deit_tiny_distilled_patch16_224", img_size=32), 32,
                            "blocks.1.norm1", GELU_MODELS),
    "timm-swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                                            window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                                            num_classes=5), 32, "layers.1.blocks.1.norm1", GELU_MODELS),
}
_BUILT: dict[str, nn.Module] = {}


def model_for(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = _random_heads(MODELS[name][0]())
    size = MODELS[name][1]
    return _BUILT[name], torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODELS))
def test_default_layer_and_every_heatmap_method(name: str) -> None:
    model, images = model_for(name)
    _, size, expected_layer, expected_unsupported = MODELS[name]
    layer = default_layer(model, images)
    assert layer == expected_layer
    fmap = activations(model, images)[layer]
    assert fmap.ndim == 4 and fmap.shape[0] == 1 and min(fmap.shape[2:]) > 1, fmap.shape  # a grid, channels first
    unsupported = set()
    for method, spec in METHODS.items():
        if spec.kind != "heatmap":
            continue
        fast = {k: v for k, v in {**FAST, "window": size // 4, "stride": size // 4}.items() if k in spec.defaults}
        try:
            heat = run_method(method, model, images, **fast)
        except UnsupportedModelError as exc:
            unsupported.add(method)
            assert "\n" not in str(exc) and len(str(exc)) > 40, str(exc)
            continue
        assert heat.shape == (1, size, size) and torch.isfinite(heat).all(), method
        if method in ("gradcam", "saliency"):
            assert heat.abs().max() > 0, f"{method} on {name} is blank"
    assert expected_unsupported <= unsupported and unsupported <= expected_unsupported | (set(METHODS) - {
        "occlusion", "cam", "gradcam", "gradcam++", "guided-gradcam", "saliency", "guided-backprop", "smoothgrad",
        "integrated-gradients"}), unsupported  # methods added later may refuse too, with a reason
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _theirs(model: nn.Module, layer: str, images: torch.Tensor, targets: list[int],
            reshape: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = get_layer(model, layer)
    with grad_cam.GradCAM(model=model, target_layers=[module], reshape_transform=reshape) as method:
        final = method(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in targets])
        acts = method.activations_and_grads.activations[0].numpy()
        grads = method.activations_and_grads.gradients[0].numpy()
        return method.get_cam_image(images, module, None, acts, grads), final


@pytest.mark.parametrize("name, reshape", [
    ("vit", "vit_reshape_transform"), ("timm-vit", "vit_reshape_transform"), ("timm-swin", "swinT_reshape_transform"),
    ("swin", "swinT_reshape_transform"), ("timm-deit-distilled", None),
])
def test_transformer_gradcam_matches_pytorch_grad_cam_with_its_reshape_transform(name: str, reshape: str | None) -> None:
    from pytorch_grad_cam.utils import reshape_transforms
    from pytorch_grad_cam.utils.image import scale_cam_image

    model, _ = model_for(name)
    images = torch.randn(2, 3, 32, 32)
    targets = [3, 1]
    if reshape is None:  # DeiT: their ViT transform with the class and distillation tokens dropped
        transform = lambda t: reshape_transforms.vit_reshape_transform(t[:, 1:], 4, 4)  # noqa: E731
    elif reshape.startswith("swin"):  # today's Swins give [N, h, w, C]; their transform takes the h*w tokens
        transform = lambda t: reshape_transforms.swinT_reshape_transform(t.flatten(1, 2), 4, 4)  # noqa: E731
    else:
        transform = partial(getattr(reshape_transforms, reshape), height=4, width=4)
    their_raw, their_final = _theirs(model, MODELS[name][2], images, targets, transform)
    raw = gradcam(model, images, targets, relu=False, upsample=False)  # the default layer, the same as theirs
    torch.testing.assert_close(raw, torch.as_tensor(their_raw), rtol=1e-4, atol=1e-6 * float(np.abs(their_raw).max()))
    ours_final = scale_cam_image(scale_cam_image(np.maximum(raw.numpy(), 0), (32, 32)))
    np.testing.assert_allclose(ours_final, their_final, atol=1e-4)


def test_token_grids_follow_the_image_aspect_and_refuse_clearly() -> None:
    wide = _timm_vit("vit_tiny_patch16_224", img_size=(32, 48)).eval()
    images = torch.randn(1, 3, 32, 48)
    assert gradcam(wide, images).shape == (1, 32, 48)
    assert activations(wide, images, "blocks.1")["blocks.1"].shape == (1, 32, 4, 6)  # 4 x 6 patches, cls dropped
    # channels last is told from the shape; a tie (a 2 x 2 x 2 map) is settled by the layer: a LayerNorm is channels last
    assert infer_layout(wide, None, (1, 4, 6, 32), 1, (32, 48)).kind == "channels_last"
    assert infer_layout(wide, None, (1, 32, 4, 6), 1, (32, 48)).kind == "channels_first"
    assert infer_layout(wide, nn.LayerNorm(2), (1, 2, 2, 2), 1, (32, 32)).kind == "channels_last"
    assert infer_layout(wide, nn.Conv2d(2, 2, 1), (1, 2, 2, 2), 1, (32, 32)).kind == "channels_first"
    # strides that round (a ResNet's 40 x 32 input gives 2 x 1; a Swin's 224 x 200 gives 7 x 6)
    assert infer_layout(wide, None, (1, 512, 2, 1), 1, (40, 32)).kind == "channels_first"
    assert infer_layout(wide, None, (1, 7, 6, 768), 1, (224, 200)).kind == "channels_last"
    assert infer_layout(wide, None, (1, 28, 28, 29), 1, (224, 224)).kind == "channels_last"
    model, square = model_for("vit")
    # each patch token lands where its patch is: the encoder's input is the patch embedding plus positions
    got = activations(model, square, ["conv_proj", "encoder.dropout"])
    positions = model.encoder.pos_embedding[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(got["encoder.dropout"] - positions, got["conv_proj"], rtol=1e-5, atol=1e-5)
    model.num_prefix_tokens = 2  # a wrong declaration: 17 tokens - 2 is no grid
    try:
        with pytest.raises(UnsupportedModelError, match=r"layer 'encoder.layers.encoder_layer_1.ln_1' outputs shape "
                           r"\[1, 17, 32\].*17 tokens minus 2 prefix token\(s\) do not form a square grid"):
            gradcam(model, square, layer="encoder.layers.encoder_layer_1.ln_1")
    finally:
        del model.num_prefix_tokens
    with pytest.raises(UnsupportedModelError, match=r"layer 'heads.head' outputs shape \[1, 5\], not a spatial map"):
        gradcam(model, square, layer="heads.head")


def test_transformer_left_as_it_was_even_in_train_mode_under_no_grad() -> None:
    model, images = model_for("timm-swin")
    model.train()
    try:
        with torch.no_grad():
            maps = gradcam(model, images.repeat(2, 1, 1, 1))
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        torch.testing.assert_close(maps[0], maps[1])  # eval mode inside: dropout off, images independent
        torch.testing.assert_close(maps[:1], gradcam(model, images), rtol=1e-4, atol=1e-7)
    finally:
        model.eval()


def test_summary_lists_a_torchvision_model_by_the_names_layer_takes() -> None:
    model, images = model_for("vit")
    table = summarize(model, (1, 3, 32, 32))
    assert default_layer(model, images) in table.names
    assert all(get_layer(model, n) is not None for n in table.names)
    assert table["encoder.layers.encoder_layer_1.ln_1"].output_shape == (1, 17, 32)
