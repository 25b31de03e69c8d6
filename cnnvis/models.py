"""Model registry: small CNNs for digits, a small ResNet for photos from scratch, torchvision
ResNets for transfer learning, and any library model (``torchvision:NAME``, ``timm:NAME``, built
by :mod:`cnnvis.zoo`) with its head replaced for the data's classes.

Every model here ends in global average pooling (``avgpool``) and one linear layer (``fc``),
except ``mnist_classic``, so the original CAM works on them.

``model.freeze: backbone`` trains the head alone (:func:`head_module`); the frozen backbone then
also stays in eval mode while training (:func:`set_train_mode`): BatchNorm keeps the statistics
of the weights it came with, and dropout outside the head is off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models as tv_models

from cnnvis.config import ARCHITECTURES, MODEL_LIBRARIES, Config
from cnnvis.errors import CheckpointError, ConfigError
from cnnvis.zoo import LIBRARIES, build_zoo_model, find_head, parse_source


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MnistCNN(nn.Module):
    """Fast default digit net: three conv stages, global average pooling, one linear layer.

    Small enough to train an epoch in seconds on two CPU cores; GAP + linear makes CAM exact.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w),
            *_conv_bn(4 * w, 4 * w),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


class MnistClassic(nn.Module):
    """The classic Keras-style teaching net: tanh convolutions, pooling and a tanh dense layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_size = image_size  # the only size its dense layer fits; default_layer probes with it
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 4, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 128),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallResNet(nn.Module):
    """A ResNet sized for a few thousand photos and a CPU: torchvision's ResNet layout (stem
    ``conv1``/``bn1``/``relu``/``maxpool``, stages ``layer1`` .. ``layer4`` of torchvision
    ``BasicBlock`` s, ``avgpool``, ``fc``) at a quarter of ResNet-18's width by default
    (32, 64, 128, 256 channels) and one block per stage: 1.2 M parameters, a tenth of ResNet-18's,
    and about a ninth of its mult-adds. Each block's last BatchNorm starts at zero, so every
    residual branch starts as the identity (Goyal et al. 2017).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, blocks: tuple[int, ...] = (1, 1, 1, 1),
                 dropout: float = 0.0) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        for stage, count in enumerate(blocks, 1):
            out = width * 2 ** (stage - 1)
            stride = 1 if stage == 1 else 2
            shortcut = None
            if stride != 1 or channels != out:
                shortcut = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            layers = [BasicBlock(channels, out, stride, shortcut)] + [BasicBlock(out, out) for _ in range(count - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            channels = out
        self.stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))


_RESNETS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet18": (tv_models.resnet18, "ResNet18_Weights"),
    "resnet34": (tv_models.resnet34, "ResNet34_Weights"),
    "resnet50": (tv_models.resnet50, "ResNet50_Weights"),
    "resnet101": (tv_models.resnet101, "ResNet101_Weights"),
    "resnet152": (tv_models.resnet152, "ResNet152_Weights"),
}

if ARCHITECTURES != ("mnist_cnn", "mnist_classic", "resnet_small", *_RESNETS):
    raise ImportError("config.ARCHITECTURES and the builders in models.py disagree")
if MODEL_LIBRARIES != LIBRARIES:
    raise ImportError("config.MODEL_LIBRARIES and zoo.LIBRARIES disagree")


def _torchvision_weights(arch: str, name: str) -> tv_models.WeightsEnum:
    enum_name = _RESNETS[arch][1]
    try:
        return tv_models.get_weight(f"{enum_name}.{name}")
    except (ValueError, KeyError, AttributeError):
        enum = tv_models.get_model_weights(arch)
        valid = ", ".join(w.name for w in enum)
        raise ConfigError(
            f"model.pretrained = {name!r}: not a torchvision weights name or an existing file for {arch}; "
            f"valid names: {valid}"
        ) from None


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Let an RGB network read other channel counts (grey digits): its first convolution reading 3
    channels gets ``in_channels``, each filter the mean of its pretrained RGB filters."""
    name, old = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
                     (None, None))
    if old is None:
        raise ConfigError(f"{type(model).__name__} has no convolution reading 3 channels to adapt to {in_channels} "
                          "channel(s)", "Use RGB images with this model.")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    groups=1, bias=old.bias is not None, padding_mode=old.padding_mode)
    with torch.no_grad():
        new.weight.copy_(old.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _load_backbone(model: nn.Module, path: Path) -> None:
    """Backbone weights from a checkpoint of the same architecture; its head (any class count)
    is dropped because a new one replaces it."""
    from cnnvis.checkpoint import load_state_dict_file

    own = model.state_dict()
    state = {k: v for k, v in load_state_dict_file(path, model).items() if not k.startswith("fc.")}
    conv = state.get("conv1.weight")
    if conv is not None and conv.shape[1] == 3 and own["conv1.weight"].shape[1] != 3:
        state["conv1.weight"] = conv.mean(dim=1, keepdim=True).expand_as(own["conv1.weight"]).clone()
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or wrong:
        raise CheckpointError(
            f"model.pretrained = {str(path)!r} does not fit {type(model).__name__}: "
            f"{len(missing)} backbone weights missing (e.g. {missing[:2]}), {len(wrong)} of another shape (e.g. {wrong[:2]})",
            "Use weights saved from the same architecture.",
        )
    model.load_state_dict(state, strict=False)


def _resnet(arch: str, num_classes: int, in_channels: int, pretrained: str | None, dropout: float) -> nn.Module:
    builder, _ = _RESNETS[arch]
    weights = None
    checkpoint_path = None
    if pretrained:
        if Path(pretrained).expanduser().is_file():
            checkpoint_path = Path(pretrained).expanduser()
        else:
            weights = _torchvision_weights(arch, pretrained)
    try:
        model = builder(weights=weights)
    except (OSError, RuntimeError) as exc:  # no network for the weights download
        raise ConfigError(
            f"could not download the {arch} weights {pretrained!r}: {exc}",
            "Without internet, set model.pretrained to a local weights file or to null.",
        ) from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    if checkpoint_path is not None:
        _load_backbone(model, checkpoint_path)
    head = nn.Linear(model.fc.in_features, num_classes)
    model.fc = nn.Sequential(nn.Dropout(dropout), head) if dropout else head
    return model


def _fixed_input_size(model: nn.Module) -> int | None:
    """The one image side a model accepts (vision transformers with fixed position embeddings), or None."""
    size = getattr(model, "image_size", None)  # torchvision's VisionTransformer
    embed = getattr(model, "patch_embed", None)  # timm's
    if size is None and embed is not None and getattr(embed, "strict_img_size", False) \
            and not getattr(model, "dynamic_img_size", False):
        size = getattr(embed, "img_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size) if isinstance(size, int) else None


def _library_model(source: str, num_classes: int, in_channels: int, image_size: int, pretrained: str | None,
                   dropout: float) -> nn.Module:
    """A torchvision or timm model with ``pretrained`` weights (a name, a file or None) and a new
    head for ``num_classes``; grey images get the first convolution adapted, as for the ResNets."""
    model = build_zoo_model(source, weights=pretrained, num_classes=num_classes).model
    fixed = _fixed_input_size(model)
    if fixed is not None and fixed != image_size:
        raise ConfigError(f"{source} reads {fixed} px images only, but data.transforms.image_size is {image_size}",
                          f"Set data.transforms.image_size={fixed}.")
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    if dropout:
        name, head = find_head(model)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Sequential(nn.Dropout(dropout), head))
    return model.train()


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 28,
    pretrained: str | None = None,
    freeze: str = "none",
    dropout: float = 0.0,
) -> nn.Module:
    """Build a registered architecture with its head sized to ``num_classes``."""
    if arch == "mnist_cnn":
        model: nn.Module = MnistCNN(num_classes, in_channels, dropout=dropout)
    elif arch == "mnist_classic":
        model = MnistClassic(num_classes, in_channels, image_size, dropout=dropout)
    elif arch == "resnet_small":
        model = SmallResNet(num_classes, in_channels, dropout=dropout)
    elif arch in _RESNETS:
        model = _resnet(arch, num_classes, in_channels, pretrained, dropout)
    elif parse_source(arch) is not None:
        model = _library_model(arch, num_classes, in_channels, image_size, pretrained, dropout)
    else:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if pretrained and arch in ("mnist_cnn", "mnist_classic", "resnet_small"):
        from cnnvis.checkpoint import load_model_state, load_state_dict_file

        if not Path(pretrained).expanduser().is_file():
            raise ConfigError(
                f"model.pretrained = {pretrained!r}: {arch} has no torchvision weights and no such file exists",
                "Give the path of a checkpoint of the same architecture, or null.",
            )
        load_model_state(model, load_state_dict_file(Path(pretrained).expanduser(), model), f"model.pretrained = {pretrained!r}")
    if freeze == "backbone":
        freeze_backbone(model)
    return model


def head_module(model: nn.Module) -> nn.Module:
    """The classification head: what stays trainable with ``freeze: backbone``.

    ``mnist_classic``: its dense ``classifier``. Any other model: the linear layer that makes the
    logits (:func:`cnnvis.zoo.find_head`: ResNet ``fc``, VGG / EfficientNet / MobileNet
    ``classifier[-1]``, ViT ``heads.head``, timm's classifier ...) together with the dropout right
    before it (the dropout layers before it in the same ``nn.Sequential``, or the ``dropout`` the
    models here apply before ``fc``): the head's dropout trains with it.
    """
    if isinstance(model, MnistClassic):
        return model.classifier
    if isinstance(model, (MnistCNN, SmallResNet)) and model.dropout.p > 0:
        return nn.Sequential(model.dropout, model.fc)
    name, linear = find_head(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential):
        keys = list(parent._modules)
        end = start = keys.index(attr)
        while start > 0 and isinstance(parent[start - 1], nn.modules.dropout._DropoutNd):
            start -= 1
        if start < end:
            return parent[start : end + 1]  # a view: the model's own modules
    return linear


def freeze_backbone(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for param in head_module(model).parameters():
        param.requires_grad_(True)


def set_train_mode(model: nn.Module, freeze: str) -> None:
    """Training mode for a training epoch: the whole model, or with ``freeze == "backbone"`` the
    head alone, the frozen backbone staying in eval mode (BatchNorm statistics kept, its dropout off)."""
    if freeze != "backbone":
        model.train()
        return
    model.eval()
    head_module(model).train()


def describe_model(config: Config, model: nn.Module) -> list[str]:
    """What a run's header says about its model: source and weights, head, what trains, inputs."""
    from cnnvis.data.transforms import photo_statistics

    m = config.model
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    try:
        head = f"head {find_head(model)[0]}, "
    except CheckpointError:
        head = ""
    lines = [f"{m.arch}, {'weights ' + str(m.pretrained) if m.pretrained else 'random weights'}",
             f"{head}{trained:,} of {total:,} parameters train"]
    if m.freeze == "backbone":
        lines.append("backbone frozen, in eval mode (BatchNorm keeps its statistics)")
    if config.data.dataset != "mnist":
        lines.append(f"images normalised with {photo_statistics(config)[2]}")
    elif m.arch not in ("mnist_cnn", "mnist_classic", "resnet_small"):
        lines.append("grey digits: the first convolution reads 1 channel (each filter the mean of its RGB ones)")
    if m.pretrained and parse_source(m.arch) is not None:
        from cnnvis.zoo import weights_preprocessing

        known = weights_preprocessing(m.arch, m.pretrained)
        size = config.data.transforms.image_size
        if known is not None and known.crop[0] != size:
            lines.append(f"the weights were trained at {known.crop[0]} px; this run feeds {size} px")
    return lines
