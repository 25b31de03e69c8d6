"""YAML config -> validated, typed config objects; ``--set key.path=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the closest valid key
instead of a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from cnnvis.errors import ConfigError, nearest_names
from cnnvis.io import atomic_write

#: environment variable that points every config at one data folder (below overrides, above the file)
DATA_ROOT_ENV = "CNNVIS_DATA"
#: where ``data.root`` came from, strongest first
RootSource = Literal["override", "environment", "config", "default"]

DatasetName = Literal["mnist", "flowers102", "imagefolder"]
OptimizerName = Literal["sgd", "adam", "adamw", "adadelta"]
SchedulerName = Literal["onecycle", "cosine", "step", "none"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TransformConfig(Section):
    """Preprocessing and augmentation presets (applied on the device for MNIST).

    Normalisation is not a choice: digits use the MNIST statistics, photos the ImageNet ones
    (what pretrained torchvision models expect, and a fine default from scratch).
    """

    image_size: int = Field(28, gt=0, description="side of the square image the model sees")
    resize: int | None = Field(None, gt=0, description="resize the shorter side first (None: image_size)")
    random_crop: bool = Field(False, description="random-resized crop for training instead of resize")
    crop_scale: float = Field(0.35, gt=0, le=1, description="random_crop: smallest share of the image's area a crop keeps")
    flip: bool = Field(False, description="random horizontal flip")
    rotation: float = Field(0.0, ge=0, le=180, description="max random rotation in degrees")
    translate: float = Field(0.0, ge=0, lt=0.5, description="max random shift as a fraction of the side")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation jitter")

    @model_validator(mode="after")
    def _resize_covers_the_crop(self) -> TransformConfig:
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be at least image_size ({self.image_size}): "
                             "evaluation crops image_size pixels out of the resized image")
        return self


class DataConfig(Section):
    dataset: DatasetName = "mnist"
    root: str = Field("data", description="data root; the CNNVIS_DATA environment variable overrides the file's value")
    path: str | None = Field(None, description="imagefolder: folder of class sub-folders (absolute or under root)")
    download: bool = Field(True, description="download when the files are missing (needs internet)")
    val_size: int = Field(5000, ge=1, description="mnist: training digits held out for validation")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="imagefolder: share of each class for validation")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="imagefolder: share of each class for test")
    subset: int | None = Field(None, ge=1, description="use only the first N training samples (quick tries)")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    num_workers: Union[int, Literal["auto"]] = "auto"
    in_memory: Union[bool, Literal["auto"]] = Field(
        "auto", description="imagefolder: decode every image once and batch on the device (auto: when they "
        "fit in a quarter of the memory, at most 4 GiB); MNIST always is")
    transforms: TransformConfig = TransformConfig()
    _root_source: RootSource = PrivateAttr("default")

    @property
    def root_source(self) -> RootSource:
        """Where ``root`` came from: an override, ``CNNVIS_DATA``, the config file, or the default."""
        return self._root_source

    def __eq__(self, other: object) -> bool:
        # where the root came from is provenance, not part of the value: a saved and reloaded config is equal
        return isinstance(other, DataConfig) and self.model_dump() == other.model_dump()

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_auto_or_count(cls, value: object) -> int | str:
        # One message instead of one per member of the int | "auto" union.
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ValueError("must be 'auto' or an integer >= 0")


#: the ``model.arch`` names ``cnnvis.models.build_model`` builds; here, not in models.py, so that a
#: config is checked without importing torch (models.py refuses to import if the two disagree)
ARCHITECTURES: tuple[str, ...] = ("mnist_cnn", "mnist_classic", "resnet_small",
                                  "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
#: ``model.arch`` may also name a library model, ``torchvision:NAME`` or ``timm:NAME`` (``cnnvis.zoo``);
#: only the prefix is checked here (torch-free), the name when the model is built
MODEL_LIBRARIES: tuple[str, ...] = ("torchvision", "timm")


class ModelConfig(Section):
    arch: str = Field("mnist_cnn", description="one of ARCHITECTURES, or a library model: torchvision:NAME, timm:NAME")
    pretrained: str | None = Field(None, description="weights name (torchvision: DEFAULT, IMAGENET1K_V2 ...; timm: "
                                   "pretrained or a pretrained tag), a weights or checkpoint file, or null (random weights)")
    freeze: Literal["none", "backbone"] = "none"
    dropout: float = Field(0.0, ge=0, lt=1)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        library, colon, name = arch.partition(":")
        if colon:
            if library not in MODEL_LIBRARIES:
                raise ValueError(f"unknown model library {library!r}{_suggest(library, list(MODEL_LIBRARIES))}; "
                                 "write torchvision:NAME or timm:NAME")
            if not name.strip():
                raise ValueError(f"{arch!r} names no model; write {library}:NAME, e.g. torchvision:resnet50")
            return arch
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture{_suggest(arch, list(ARCHITECTURES))}; choose one of: "
                             f"{', '.join(ARCHITECTURES)}, or a library model: torchvision:NAME, timm:NAME")
        return arch


class OptimizerConfig(Section):
    name: OptimizerName = "adamw"
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = False
    decay_norm_and_bias: bool = Field(
        True, description="apply weight_decay to normalisation weights and biases too (false: to conv and linear weights only)")


class SchedulerConfig(Section):
    name: SchedulerName = "onecycle"
    pct_start: float = Field(0.25, gt=0, lt=1, description="onecycle: share of steps spent warming up")
    first_cycle: int = Field(
        0, ge=0, description="onecycle: epochs of a separate first cycle that ends annealed, so that an "
        "accurate model exists early; the rest of the run is a second cycle (0: one cycle over the whole run)")
    step_size: int = Field(1, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.7, gt=0, le=1, description="step: decay factor")


class TrainConfig(Section):
    epochs: int = Field(5, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, description="MixUp alpha (0: off); with cutmix too, each batch gets one of them")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0: off)")
    ema: float = Field(0.0, ge=0, lt=1, description="decay of an exponential moving average of the weights, which is "
                       "then what is evaluated and saved (0: off; e.g. 0.999)")
    tta_flip: bool = Field(False, description="evaluate on each image and its mirror image, averaging the logits")
    cache_features: bool = Field(
        True, description="model.freeze: backbone without random augmentation: compute the backbone's features once "
        "(cached in RUN/features/) and train the head on them every epoch (false: the whole network runs every step)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="mixed precision on CUDA")
    channels_last: bool = Field(True, description="channels_last memory format (faster convolutions on CUDA and CPU)")
    early_stopping: int | None = Field(None, ge=1, description="stop after N epochs without a better val accuracy")
    log_every: int = Field(50, ge=1, description="training steps between per-step loss points")
    sync_batchnorm: bool = Field(False, description="several processes (torchrun): BatchNorm statistics over the "
                                 "global batch instead of each process's share (SyncBatchNorm; CUDA only)")
    collective_timeout_s: float = Field(300.0, gt=0, description="several processes: seconds a process waits for the "
                                        "others in a collective before it gives up (a dead process ends the run)")


class LogConfig(Section):
    tensorboard: bool = True
    step_loss: bool = True
    histograms_every: int = Field(1, ge=0, description="epochs between weight/gradient histograms (0: never)")
    images: bool = True
    filters: bool = True
    misclassified: int = Field(32, ge=0, description="misclassified validation images per epoch (0: none)")
    explain_every: int = Field(1, ge=0, description="epochs between Grad-CAM grids (0: never)")
    explain_images: int = Field(8, ge=1)
    explain_layer: str | None = Field(None, description="layer for the Grad-CAM grids (None: the last conv block)")
    graph: bool = True
    hparams: bool = True
    pr_curves: bool = True
    confusion_matrix: bool = True
    embeddings: int = Field(1000, ge=0, description="test images in TensorBoard's embedding projector at the end of "
                            "training: the final linear layer's input, with image sprites and class labels (0: none)")


class Config(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="run name prefix")
    seed: int = 0
    deterministic: bool = False
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()


def _suggest(name: str, choices: list[str]) -> str:
    close = nearest_names(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _describe(error: ValidationError, source: str, overridden: frozenset[str] = frozenset()) -> ConfigError:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            section = _section_at(loc[:-1])
            valid = list(section.model_fields) if section else []
            lines.append(
                f"unknown key {where!r}{_suggest(str(loc[-1]), valid)}; valid keys here: {', '.join(valid)}"
            )
            continue
        value = item.get("input")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "literal_error":
            message = "must be one of " + message.removeprefix("Input should be ").replace(" or ", ", ")
            message += _suggest(str(value), re.findall(r"'([^']*)'", message))
        origin = " (from --set)" if where in overridden else ""
        lines.append(f"{where} = {value!r}{origin}: {message}")
    return ConfigError(f"{source}: " + "; ".join(lines))


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: dict[str, Any] = raw
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        valid = list(model.model_fields) if model else []
        if model is not None and part not in model.model_fields:
            here = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"--set {dotted}: unknown key {part!r} in {here}{_suggest(part, valid)}; valid keys: {', '.join(valid)}"
            )
        if depth == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
        model = _section_at(tuple(parts[: depth + 1]))
        if model is None:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: depth + 1])} is a value, not a section")


def parse_override(text: str, flag: str = "--set", example: str = "train.epochs=3",
                   form: str = "key.path=value") -> tuple[str, Any]:
    """``"optimizer.lr=0.05"`` -> ``("optimizer.lr", 0.05)``; values are read as YAML scalars.
    ``flag`` and ``example`` name the option in messages (``--param aug_smooth=true`` too)."""
    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}: expected {form}, e.g. {flag} {example}")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"{flag} {text!r}: the key before '=' is empty")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors say which file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "Pass the path of a YAML file, e.g. configs/mnist.yaml.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty", "Start from configs/mnist.yaml.")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...), not a {type(raw).__name__}")
    return raw


def build_config(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config",
                 base: str | Path | None = None) -> Config:
    """Validate a raw mapping after applying ``key.path=value`` overrides.

    ``data.root`` comes from, strongest first: an override, the ``CNNVIS_DATA`` environment
    variable, the mapping, the default; ``config.data.root_source`` says which. The root comes
    out absolute: one written in the mapping relative to ``base`` (the config file's folder), so a
    config works from any directory; any other relative to the current directory, where it was
    typed. A run's saved config then names the folder it really read.
    """
    raw = _deep_copy(raw)
    overridden = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key, value)
        overridden.add(key)
    data = raw.get("data")
    root_source: RootSource = "default"
    if "data.root" in overridden:
        root_source = "override"
    elif os.environ.get(DATA_ROOT_ENV) and (data is None or isinstance(data, dict)):
        raw["data"] = {**(data or {}), "root": os.environ[DATA_ROOT_ENV]}
        root_source = "environment"
    elif isinstance(data, dict) and "root" in data:
        root_source = "config"
    if isinstance(raw.get("data", {}), dict):
        section = raw.setdefault("data", {})
        written = Path(str(section.get("root", DataConfig.model_fields["root"].default))).expanduser()
        relative_to = Path(base) if base is not None and root_source == "config" else Path.cwd()
        section["root"] = os.path.normpath(relative_to.resolve() / written)  # unchanged when absolute
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise _describe(exc, source, frozenset(overridden)) from None
    config.data._root_source = root_source
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a YAML config file."""
    return build_config(read_yaml(path), overrides, source=str(path), base=Path(path).parent)


def data_root(data: DataConfig) -> Path:
    """The folder data sets are read from (``data.root`` as :func:`build_config` resolved it)."""
    return Path(data.root).expanduser()


def config_to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: Config, path: str | Path) -> None:
    """Write atomically (temp file + rename): a kill mid-write never leaves half a config."""
    try:
        atomic_write(path, yaml.safe_dump(config_to_dict(config), sort_keys=False).encode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}", "Free disk space or choose a writable runs directory.") from None


def flatten(config: Config) -> dict[str, Any]:
    """``{"optimizer.lr": 0.003, ...}``: plain scalars, for the HParams dashboard."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", config_to_dict(config))
    return flat


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node
