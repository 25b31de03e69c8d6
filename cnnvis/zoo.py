"""Models from the ecosystem by name: ``torchvision:NAME`` and ``timm:NAME``, with their weights,
their preprocessing and their class names, and the classification head found for any of them.

The one home of "what does ``torchvision:resnet50 --weights IMAGENET1K_V2`` mean":

* ``weights`` is a weights name the library knows (torchvision: ``DEFAULT``, ``IMAGENET1K_V2`` ...;
  timm: ``pretrained`` or ``DEFAULT``, its own pretrained tag), a local state-dict file (read with
  ``weights_only=True``, so a file that would run code is refused), or ``None`` for random weights.
* Preprocessing and class names come with named weights (torchvision's ``weights.transforms()`` and
  ``weights.meta["categories"]``; timm's pretrained data config and ImageNet class names). A weights
  file or random weights know neither: :attr:`ZooModel.preprocessing` and :attr:`ZooModel.class_names`
  are then ``None`` and the caller decides (and says) what to use.

Downloads use the libraries' own code paths (their cache, their URLs); without network a named
weights download fails with a message that points at a local file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cnnvis.errors import CheckpointError, ConfigError, nearest_names

Library = Literal["torchvision", "timm"]
LIBRARIES: tuple[Library, ...] = ("torchvision", "timm")
#: what ``--weights`` says for random weights
NO_WEIGHTS = ("none", "random")
#: what the explain commands load when ``--weights`` is not given: the library's own pretrained weights
DEFAULT_WEIGHTS: dict[str, str] = {"torchvision": "DEFAULT", "timm": "pretrained"}
#: ImageNet statistics: what torchvision and timm weights use, and the stated fallback for a file
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: resize the short side, centre-crop, normalise."""

    crop: tuple[int, int]  #: (H, W) the model sees
    resize: int  #: short side before the crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  #: a ``torchvision.transforms.InterpolationMode`` value
    source: str = "defaults"  #: where these numbers come from, for the output to state

    def transform(self, crop: bool = True) -> Any:
        """The torchvision ``v2`` pipeline for a PIL image or uint8 tensor; ``crop=False`` resizes the
        whole picture to :attr:`crop` (aspect not kept) instead of cropping its centre."""
        import torchvision.transforms.v2 as T

        mode = T.InterpolationMode(self.interpolation)
        size = [T.Resize(self.resize, interpolation=mode, antialias=True), T.CenterCrop(self.crop)] if crop \
            else [T.Resize(self.crop, interpolation=mode, antialias=True)]
        return T.Compose([T.ToImage(), *size, T.ToDtype(torch.float32, scale=True),
                          T.Normalize(list(self.mean), list(self.std))])


@dataclass
class ZooModel:
    """A model built from a library name, with what its weights say about its inputs and outputs."""

    model: nn.Module
    library: Library
    name: str
    weights: str | None  #: the weights name or file as given; None: random weights
    preprocessing: Preprocessing | None = None  #: None: the weights do not say
    class_names: list[str] | None = None  #: None: the weights do not say
    notes: list[str] = field(default_factory=list)  #: facts the output should state (e.g. random weights)

    @property
    def source(self) -> str:
        """``torchvision:resnet50``: how configs and checkpoints name the architecture."""
        return f"{self.library}:{self.name}"

    @property
    def random(self) -> bool:
        return self.weights is None


def parse_source(text: str) -> tuple[Library, str] | None:
    """``("torchvision", "resnet50")`` for ``"torchvision:resnet50"``; None when ``text`` names no library."""
    library, sep, name = str(text).partition(":")
    if not sep or library not in LIBRARIES:
        return None
    if not name:
        raise ConfigError(f"{text!r} names no model; write {library}:NAME, e.g. "
                          f"{'torchvision:resnet50' if library == 'torchvision' else 'timm:convnext_tiny'}")
    return library, name  # type: ignore[return-value]


def _weights_file(weights: str | None) -> Path | None:
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt", ".safetensors"} or path.exists():
        if not path.is_file():
            raise CheckpointError(f"no such weights file: {path}")
        return path
    return None


def _normalise_weights(weights: str | None) -> str | None:
    if weights is None or str(weights).strip().lower() in NO_WEIGHTS:
        return None
    return str(weights)


# --------------------------------------------------------------------------- torchvision
def _torchvision_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def _torchvision_weights(name: str, weights: str) -> Any:
    from torchvision import models

    try:
        enum = models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    try:
        return enum[weights]
    except KeyError:
        valid = ", ".join(enum.__members__)
        raise ConfigError(f"--weights {weights!r} is not a weights name of torchvision:{name} nor an existing file; "
                          f"valid names: {valid}") from None


def preprocessing_from_torchvision(weights: Any) -> Preprocessing:
    """The numbers of ``weights.transforms()`` (torchvision's ``ImageClassification`` preset)."""
    preset = weights.transforms()
    crop = list(getattr(preset, "crop_size", [224]))
    resize = list(getattr(preset, "resize_size", crop))
    mode = getattr(preset, "interpolation", "bilinear")
    return Preprocessing(crop=(int(crop[0]), int(crop[-1])), resize=int(resize[0]),
                         mean=tuple(preset.mean), std=tuple(preset.std),
                         interpolation=getattr(mode, "value", str(mode)),
                         source=f"torchvision weights {getattr(weights, 'name', weights)}")


def _build_torchvision(name: str, weights: str | None) -> ZooModel:
    from torchvision import models

    known = _torchvision_names()
    if name not in known:
        raise ConfigError(f"torchvision has no model {name!r}{_nearest(name, known)}")
    named = _torchvision_weights(name, weights) if weights is not None and _weights_file(weights) is None else None
    if weights is not None and _weights_file(weights) is None and named is None:
        raise ConfigError(f"torchvision:{name} has no pretrained weights; use --weights none or a weights file")
    try:
        if named is None or isinstance(named, models.WeightsEnum):
            model = models.get_model(name, weights=named)
        else:  # a weights-like object (another registry, a test): same fields, its own state dict
            model = _from_weights_like(name, named)
    except (OSError, RuntimeError) as exc:  # the download needs network
        url = getattr(named, "url", None)
        cache = f", or place {url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints/" if url else ""
        raise ConfigError(f"could not download the torchvision:{name} weights {weights!r}: {exc}",
                          f"Without internet, give a local weights file (--weights FILE; in a config, model.pretrained: FILE) or none{cache}.") from None
    zoo = ZooModel(model, "torchvision", name, weights)
    if named is not None:
        zoo.preprocessing = preprocessing_from_torchvision(named)
        categories = named.meta.get("categories")
        zoo.class_names = list(categories) if categories else None
    return zoo


def _from_weights_like(name: str, weights: Any) -> nn.Module:
    """A torchvision architecture for an object shaped like its weights enum: ``meta["categories"]``
    sets the class count, ``get_state_dict()`` (if it has one) the weights."""
    from torchvision import models

    categories = weights.meta.get("categories")
    model = models.get_model(name, **({"num_classes": len(categories)} if categories else {}))
    if callable(getattr(weights, "get_state_dict", None)):
        model.load_state_dict(weights.get_state_dict(progress=False))
    return model


# --------------------------------------------------------------------------- timm
def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models need the timm package", 'Install it: pip install -e ".[timm]" (or pip install timm).') from None
    return timm


def preprocessing_from_timm(model: nn.Module) -> Preprocessing:
    """timm's resolved data config: input size, crop fraction, interpolation, mean and std."""
    return _timm_preprocessing(_timm().data.resolve_data_config({}, model=model))


def _timm_preprocessing(config: dict[str, Any]) -> Preprocessing:
    _, height, width = config["input_size"]
    crop_pct = float(config.get("crop_pct") or 1.0)
    return Preprocessing(crop=(int(height), int(width)), resize=int(round(min(height, width) / crop_pct)),
                         mean=tuple(config["mean"]), std=tuple(config["std"]),
                         interpolation=str(config.get("interpolation", "bilinear")), source="timm pretrained data config")


def class_names_from_timm(model: nn.Module) -> list[str] | None:
    """ImageNet class names for a timm model pretrained on an ImageNet subset, with their aliases
    (``"tench, Tinca tinca"``; pictures show the first, ``--target`` matches any)."""
    timm = _timm()
    subset = timm.data.infer_imagenet_subset(model)
    if not subset:
        return None
    return list(timm.data.ImageNetInfo(subset).label_descriptions())


def _build_timm(name: str, weights: str | None) -> ZooModel:
    timm = _timm()
    known = timm.list_models()
    if name not in known and name.split(".")[0] not in known:
        raise ConfigError(f"timm has no model {name!r}{_nearest(name, known)}")
    pretrained = weights is not None and _weights_file(weights) is None
    if pretrained and weights not in ("pretrained", "DEFAULT"):
        name = f"{name.split('.')[0]}.{weights}"  # a pretrained tag, as timm writes it: convnext_tiny.fb_in22k
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"could not download the timm:{name} weights: {exc}",
                          "Without internet, give a local weights file (--weights FILE; in a config, model.pretrained: FILE) or none.") from None
    zoo = ZooModel(model, "timm", name.split(".")[0] if not pretrained else name, weights)
    if pretrained:
        zoo.preprocessing = preprocessing_from_timm(model)
        zoo.class_names = class_names_from_timm(model)
    return zoo


# --------------------------------------------------------------------------- both
def weights_preprocessing(source: str, weights: str | None) -> Preprocessing | None:
    """The preprocessing named weights come with, read from the library's tables: nothing is built
    or downloaded (so a run rebuilt offline normalises its images as it was trained). None for a
    weights file, random weights, or weights that say nothing."""
    parsed = parse_source(source)
    weights = _normalise_weights(weights)
    if parsed is None or weights is None:
        return None
    try:
        if _weights_file(weights) is not None:
            return None
    except CheckpointError:  # a weights file that is gone (a run rebuilt elsewhere) says nothing either
        return None
    library, name = parsed
    if library == "torchvision":
        named = _torchvision_weights(name, weights)
        return preprocessing_from_torchvision(named) if named is not None else None
    timm = _timm()
    tag = name if weights in ("pretrained", "DEFAULT") else f"{name.split('.')[0]}.{weights}"
    config = timm.models.get_pretrained_cfg(tag)
    if config is None:
        return None
    return _timm_preprocessing(timm.data.resolve_data_config(pretrained_cfg=config.to_dict()))


def default_class_names(library: Library, name: str) -> tuple[list[str], str] | None:
    """The class names of the architecture's default pretrained weights, and where they come from
    (``"ImageNet-1k's, from torchvision's resnet18 weights metadata"``), read from the library's
    tables: nothing is downloaded. For random weights or a weights file that keeps the default
    head, these are the names its outputs were trained for; the caller checks the class count.
    None when the library names no default weights for the architecture."""
    if library == "torchvision":
        from torchvision import models

        try:
            default = models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            return None
        categories = default.meta.get("categories")
        if not categories:
            return None
        dataset = "ImageNet-1k's" if default.name.startswith("IMAGENET1K") else f"the {default.name} weights'"
        return list(categories), f"{dataset}, from torchvision's {name} weights metadata"
    timm = _timm()
    config = timm.models.get_pretrained_cfg(name)  # with its tag (convnext_tiny.fb_in22k: 22k names)
    subset = timm.data.infer_imagenet_subset(config.to_dict()) if config is not None else None
    if not subset:
        return None
    label = subset.replace("imagenet", "ImageNet")
    return list(timm.data.ImageNetInfo(subset).label_descriptions()), f"{label}'s, from timm's {name} pretrained config"


def build_zoo_model(source: str, weights: str | None = None, num_classes: int | None = None) -> ZooModel:
    """The model ``source`` names (``torchvision:NAME`` / ``timm:NAME``) with ``weights`` loaded.

    ``num_classes``: replace the head for that many classes (fine-tuning); class names from the
    weights are then dropped, since the new head's classes are not theirs. A weights file's head
    decides the class count when ``num_classes`` is None.
    """
    parsed = parse_source(source)
    if parsed is None:
        raise ConfigError(f"{source!r} is not a library model; write torchvision:NAME or timm:NAME")
    library, name = parsed
    weights = _normalise_weights(weights)
    zoo = (_build_torchvision if library == "torchvision" else _build_timm)(name, weights)
    if weights is None:
        zoo.notes.append(f"{zoo.source} has random weights (--weights none): its maps explain no learned features")
    path = _weights_file(weights)
    if path is not None:
        _load_weights_file(zoo.model, path, num_classes)
    if num_classes is not None and num_classes != output_classes(zoo.model):
        replace_head(zoo.model, num_classes)
        zoo.class_names = None
    zoo.model.eval()
    return zoo


def _load_weights_file(model: nn.Module, path: Path, num_classes: int | None) -> None:
    """A state-dict file into ``model``; a head of another class count is resized to the file's
    (explaining a fine-tuned model) unless ``num_classes`` asks for a fresh head anyway."""
    from cnnvis.checkpoint import load_model_state, load_state_dict_file

    state = load_state_dict_file(path, model)
    head_name, head = find_head(model)
    head_key = f"{head_name}.weight"
    saved = state.get(head_key)
    if saved is not None and saved.shape != head.weight.shape:
        if num_classes is not None:  # the file's head is replaced anyway: keep only the backbone
            state = {k: v for k, v in state.items() if not k.startswith(head_name + ".")}
            own = model.state_dict()
            state.update({k: v for k, v in own.items() if k not in state})
        else:
            replace_head(model, int(saved.shape[0]))
    load_model_state(model, state, f"weights file {path}")


# --------------------------------------------------------------------------- heads
#: where libraries keep the final linear layer, in the order they are tried
_HEAD_PATHS = ("fc", "classifier", "head", "heads", "head.fc", "heads.head", "classifier.fc", "last_linear")


def _last_linear(module: nn.Module, prefix: str) -> tuple[str, nn.Linear] | None:
    if isinstance(module, nn.Linear):
        return prefix, module
    found = None
    for child_name, child in module.named_children():
        hit = _last_linear(child, f"{prefix}.{child_name}" if prefix else child_name)
        if hit is not None:
            found = hit
    return found


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the linear layer that produces the logits: ResNet ``fc``, VGG /
    EfficientNet / MobileNet / ConvNeXt ``classifier[-1]``, ViT ``heads.head``, Swin and timm ``head``..."""
    for path in _HEAD_PATHS:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        hit = _last_linear(container, path)
        if hit is not None:
            return hit
    raise CheckpointError(
        f"cannot find the classification head of {type(model).__name__}: no nn.Linear under "
        f"{', '.join(_HEAD_PATHS)}",
        "Give a model whose last layer is an nn.Linear under one of those names, or replace its head yourself.",
    )


def output_classes(model: nn.Module) -> int:
    return find_head(model)[1].out_features


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """A fresh ``nn.Linear`` head for ``num_classes`` in place of the found one (timm: its own
    ``reset_classifier``)."""
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):
        model.reset_classifier(num_classes)
        return find_head(model)[1]
    name, old = find_head(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return new


def _nearest(name: str, known: list[str]) -> str:
    close = nearest_names(name, known, n=3)
    return f"; did you mean {' or '.join(close)}?" if close else ""
