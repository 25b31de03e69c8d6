"""The MODEL argument of ``visualize``, ``evaluate``, ``summary`` and ``report``: any model, as the
:class:`~cnnvis.run.LoadedRun` every command already uses.

MODEL is one of

* a run directory or a cnnvis checkpoint (unchanged: :func:`cnnvis.run.load_run`);
* ``torchvision:NAME`` / ``timm:NAME`` with ``weights`` (a weights name, by default the library's
  pretrained ones; a state-dict file read with ``weights_only=True``; or ``none`` for random
  weights): :func:`cnnvis.zoo.build_zoo_model`;
* a ``torch.export`` program (``.pt2``), unflattened so that its submodules keep their original
  names and run as modules: forward hooks fire, so layer methods work; methods that need module
  types (``nn.Conv2d`` filters, ``nn.ReLU`` for guided backprop, ``nn.Linear`` for CAM) do not;
  maximize and deepdream, which feed it other image sizes, need it exported with a dynamic height
  and width (:data:`DYNAMIC_EXPORT`), else they are skipped with one line;
* a TorchScript file (``torch.jit.load``, deprecated by torch): only methods that need no hooks.

Preprocessing and class names come with the model where it knows them (named weights); options
(``size``, ``mean``, ``std``, ``classes``) override them, and what is left is an honest default that
:attr:`ModelOrigin.notes` states. Outputs of a model that is not a run go to a run-like directory,
``RUNS_DIR/<library>-<name>-<weights>/`` with ``source.yaml`` describing the model, so that
``visualize``, ``evaluate`` and ``report`` write and read it as they do a run.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from cnnvis.classnames import read_class_names
from cnnvis.data.bundle import ImageSpec
from cnnvis.errors import CheckpointError, ConfigError
from cnnvis.run import LoadedRun, load_run
from cnnvis.zoo import (
    DEFAULT_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NO_WEIGHTS,
    Preprocessing,
    build_zoo_model,
    default_class_names,
    find_head,
    parse_source,
    preprocessing_from_timm,
)

SOURCE_FILE = "source.yaml"  #: what a run-like directory holds in place of config.yaml
DEFAULT_SIZE = 224
DEFAULT_CROP_FRACTION = 0.875  #: 224 of 256: how torchvision and timm centre-crop ImageNet images

Kind = Literal["library", "export", "torchscript"]

#: methods that need what a compiled program no longer has (checked on ResNet-18): module types
#: (nn.Conv2d filters, a GAP + nn.Linear head, conv/BN biases) or rectifier calls the guided and
#: deconvnet rules can swap. Every other method works on a .pt2: it hooks the named submodules.
EXPORT_UNSUPPORTED: tuple[str, ...] = ("filters", "cam", "fullgrad", "guided-gradcam", "guided-backprop", "deconvnet")
#: a TorchScript program cannot be hooked: only methods that need nothing but inputs and outputs
TORCHSCRIPT_METHODS: tuple[str, ...] = ("occlusion", "saliency", "input-x-gradient", "smoothgrad", "smoothgrad-sq",
                                        "vargrad", "integrated-gradients")
#: methods that can feed the model images of another size than the ones explained, and how: a .pt2
#: exported with a static height and width refuses those inputs (aug_smooth only flips and scales pixel
#: values; occlusion and the noise tunnels keep the size). Whether they do depends on the image and the
#: parameters (maximize's pixel recipe below 64 px keeps the size, deepdream on a small image has one
#: octave), so the program's refusal itself is what skips them: see ModelOrigin.refused_input.
RESIZING_METHODS: dict[str, str] = {
    "maximize": "renders on a padded canvas larger than the images",
    "deepdream": "runs its octaves on smaller copies of the images",
}
#: how to export a program every method can run on; the README says the same
DYNAMIC_EXPORT = ('torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch"), '
                  '2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},))')
#: torch's guard on a program's input ("Expected input at *args[0].shape[2] to be equal to 224, but got 252")
_SHAPE_GUARD = re.compile(r"Expected input at \S*shape\[(\d+)\] to be (.+?), but got (\d+)")
_PROGRAM_LIMITS = {
    "export": "a torch.export program keeps no nn.Conv2d / nn.ReLU / nn.Linear modules",
    "torchscript": "a TorchScript program cannot be hooked (use a .pt2 from torch.export for layer methods)",
}


@dataclass
class ModelOrigin:
    """Where a model that is not a cnnvis run came from, and what the outputs must say about it."""

    kind: Kind
    name: str  #: ``torchvision:resnet50`` or the program file
    weights: str | None  #: weights name or file; None: random (library) or part of the program
    random: bool
    preprocessing: Preprocessing
    class_names_from: str  #: where the class names come from, for the output and source.yaml
    notes: list[str] = field(default_factory=list)  #: one line each, printed by the CLI
    data: Path | None = None  #: a labelled image folder to evaluate on
    aliases: list[str] | None = None  #: the full class names (``"tench, Tinca tinca"``) when they list aliases
    fixed_size: tuple[int, int] | None = None  #: a .pt2's only height x width, when it was exported static

    @property
    def label(self) -> str:
        if self.kind != "library":
            return self.name
        return f"{self.name}, {'random weights (UNTRAINED)' if self.random else f'weights {self.weights}'}"

    @property
    def weights_text(self) -> str:
        return "random" if self.random else str(self.weights or self.name)

    def unsupported(self, method: str) -> str | None:
        """Why ``method`` cannot run on this model, or None."""
        if self.kind == "export" and method in EXPORT_UNSUPPORTED:
            return f"{_PROGRAM_LIMITS[self.kind]}; the methods that need them: {', '.join(EXPORT_UNSUPPORTED)}"
        if self.kind == "torchscript" and method not in TORCHSCRIPT_METHODS:
            return f"{_PROGRAM_LIMITS[self.kind]}; methods that work: {', '.join(TORCHSCRIPT_METHODS)}"
        return None

    def refused_input(self, method: str, error: BaseException) -> str | None:
        """Why a .pt2 refused an input ``method`` fed it (a size it was not exported for), in one
        line; None for every other error, which is a bug and must surface."""
        found = _SHAPE_GUARD.search(str(error)) if self.kind == "export" and isinstance(error, RuntimeError) else None
        if found is None:
            return None
        what = {"0": "batch size", "2": "height", "3": "width"}.get(found[1], f"dimension {found[1]}")
        how = RESIZING_METHODS.get(method, "feeds it another size")
        if self.fixed_size is not None and found[1] in ("2", "3"):
            h, w = self.fixed_size
            return (f"the program was exported for {h}x{w} images only, and {method} {how} "
                    f"(an input of {what} {found[3]}); export it with a dynamic height and width: {DYNAMIC_EXPORT}")
        return (f"the program refuses an input of {what} {found[3]} (it must be {found[2]}), and {method} {how}; "
                f"export it with a dynamic height and width, without bounds that exclude it: {DYNAMIC_EXPORT}")

    def to_dict(self, spec: ImageSpec) -> dict[str, Any]:
        p = self.preprocessing
        return {"model": self.name, "kind": self.kind, "weights": self.weights_text,
                "preprocessing": {"crop": list(p.crop), "resize": p.resize, "mean": list(p.mean), "std": list(p.std),
                                  "interpolation": p.interpolation, "source": p.source},
                "classes": spec.num_classes, "class_names_from": self.class_names_from,
                "in_channels": spec.in_channels}


def is_run_source(source: str | Path) -> bool:
    """A run directory or cnnvis checkpoint (not a library name, not a program file)."""
    text = str(source)
    return parse_source(text) is None and program_kind(Path(text)) is None


def program_kind(path: Path) -> Kind | None:
    """``export`` for a ``.pt2``, ``torchscript`` for a TorchScript archive, None otherwise."""
    if path.suffix == ".pt2":
        return "export"
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
    return None


def _floats(values: str | Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    if values is None or (isinstance(values, (list, tuple)) and not values):
        return None
    parts = values.replace(",", " ").split() if isinstance(values, str) else list(values)
    try:
        numbers = tuple(float(v) for v in parts)
    except ValueError:
        raise ConfigError(f"{what} {values!r}: give numbers, e.g. 0.5 or 0.485,0.456,0.406", parameter=what) from None
    if what == "std" and any(v <= 0 for v in numbers):
        raise ConfigError(f"std {values!r}: every value must be above 0", parameter="std")
    return numbers


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ConfigError(f"{what}: {len(values)} values for a model with {channels} input channels", parameter=what)


def resolve_preprocessing(known: Preprocessing | None, channels: int, size: int | None = None,
                          mean: str | Sequence[float] | None = None, std: str | Sequence[float] | None = None,
                          fixed_size: tuple[int, int] | None = None) -> tuple[Preprocessing, str]:
    """What the model's images get: ``known`` (from the weights) with the given options overriding
    it, else ImageNet statistics at 224 px; returns it with the one line that states it."""
    given_mean, given_std = _floats(mean, "mean"), _floats(std, "std")
    if size is not None and size < 1:
        raise ConfigError(f"size {size}: give a positive number of pixels", parameter="size")
    base = known or Preprocessing(crop=fixed_size or (DEFAULT_SIZE, DEFAULT_SIZE),
                                  resize=round(min(fixed_size or (DEFAULT_SIZE,)) / DEFAULT_CROP_FRACTION),
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  source="the program's input shape" if fixed_size else "defaults")
    crop, resize = base.crop, base.resize
    if size is not None:
        fraction = min(base.crop) / base.resize
        crop, resize = (size, size), max(size, round(size / fraction))
    chosen = Preprocessing(crop=crop, resize=resize,
                           mean=_per_channel(given_mean or base.mean, channels, "mean"),
                           std=_per_channel(given_std or base.std, channels, "std"),
                           interpolation=base.interpolation, source=base.source)
    given = [flag for flag, value in (("--size", size), ("--mean", given_mean), ("--std", given_std)) if value is not None]
    numbers = (f"{chosen.crop[0]}x{chosen.crop[1]} px (short side {chosen.resize}, centre crop), "
               f"mean {_short(chosen.mean)}, std {_short(chosen.std)}")
    from_shape = known is None and fixed_size is not None and size is None
    missing = [flag for flag in ("--size", "--mean", "--std") if flag not in given and not (flag == "--size" and from_shape)]
    if known is None and missing:
        stated = [*(f"{flag} given" for flag in given), *(["size: the program's input shape"] if from_shape else [])]
        defaults = "/".join(flag.lstrip("-") for flag in missing)
        line = (f"preprocessing: {numbers} ({', '.join(stated) + '; ' if stated else ''}{defaults}: ImageNet "
                f"defaults, the model does not say; pass {'/'.join(missing)})")
    else:
        line = f"preprocessing: {numbers} (from {base.source}{'; ' + ', '.join(given) + ' given' if given else ''})"
    return chosen, line


def _short(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _in_channels(model: nn.Module) -> int:
    """The channel count of the first 4-D weight (the first convolution), else 3."""
    for param in model.parameters():
        if param.dim() == 4:
            return int(param.shape[1])
    return 3


def _load_program(path: Path, kind: Kind) -> tuple[nn.Module, tuple[int, int] | None, list[str]]:
    """The program's module, its fixed input size if it has one, and notes."""
    if not path.is_file():
        raise CheckpointError(f"no such model file: {path}")
    notes = []
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once below, in our words
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - torch reports a bad archive as many types
                raise CheckpointError(f"{path}: not a loadable TorchScript file ({type(exc).__name__})") from None
        notes.append("TorchScript is deprecated by PyTorch; export the model with torch.export (a .pt2) "
                     "to keep it loadable and to explain its layers")
        return module, None, notes
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    shape = _input_shape(program)
    if shape is not None and isinstance(shape[0], int):
        raise CheckpointError(f"{path} was exported for batches of exactly {shape[0]} image(s)",
                              'Export it with a dynamic batch: torch.export.export(model, (x,), '
                              'dynamic_shapes=({0: torch.export.Dim("batch")},)).')
    fixed = (shape[2], shape[3]) if shape is not None and len(shape) == 4 and all(
        isinstance(s, int) for s in shape[2:]) else None
    try:  # submodules under their original names that run as modules: forward hooks fire
        module = torch.export.unflatten(program)
    except Exception:  # noqa: BLE001 - a program unflatten cannot split still runs as one graph
        module = program.module()
        notes.append(f"{path.name}: its layers could not be restored; methods that need layers will fail")
    return module, fixed, notes


def _input_shape(program: Any) -> tuple[Any, ...] | None:
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            value = node.meta.get("val")
            if value is not None and hasattr(value, "shape"):
                return tuple(int(s) if str(s).isdigit() else s for s in value.shape)
    return None


def _output_classes(model: nn.Module, channels: int, crop: tuple[int, int]) -> int:
    try:
        return find_head(model)[1].out_features
    except (CheckpointError, RuntimeError):  # no nn.Linear head (a program, an unusual model): ask the model
        pass
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, channels, *crop))
        except Exception as exc:  # noqa: BLE001 - the model's own error, said in one line
            raise ConfigError(f"the model does not run on a {channels}x{crop[0]}x{crop[1]} image: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                              "Pass --size (and --mean/--std for another channel count).") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"the model returns {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}, "
                          "not class scores [N, classes]")
    return int(out.shape[1])


def output_dir(source: str | Path, weights: str | None = None, runs_dir: str | Path = "runs") -> Path:
    """The run-like directory of a model that is not a run, from MODEL and ``--weights`` as given:
    ``runs/torchvision-resnet50-IMAGENET1K_V2``, ``runs/timm-convnext_tiny-random``, ``runs/mymodel-pt2``.
    ``report`` finds it the same way without loading the model."""
    text = str(source)
    library = parse_source(text)
    if library is not None:
        given = str(weights).strip() if weights is not None else DEFAULT_WEIGHTS[library[0]]
        tag = "random" if given.lower() in NO_WEIGHTS else (Path(given).stem if Path(given).suffix else given)
        name = f"{text.replace(':', '-')}-{tag}"
    else:
        path = Path(text)
        name = f"{path.stem}-{path.suffix.lstrip('.') or 'model'}"
    return Path(runs_dir) / re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def load_source(
    source: str | Path,
    *,
    weights: str | None = None,
    classes: str | Path | None = None,
    size: int | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    data: str | Path | None = None,
    runs_dir: str | Path = "runs",
    device: torch.device | str = "cpu",
    allow_untrained: bool = False,
) -> LoadedRun:
    """Any MODEL as a :class:`~cnnvis.run.LoadedRun`; see the module docstring. A run keeps its own
    preprocessing and classes: options that would change them are refused for it."""
    device = torch.device(device)
    text = str(source)
    if is_run_source(text):
        given = [flag for flag, value in (("--weights", weights), ("--classes", classes), ("--size", size),
                                          ("--mean", mean), ("--std", std), ("--data", data)) if value not in (None, (), [])]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for a library model or a model file; a run knows its own "
                              "weights, classes, preprocessing and data")
        try:
            return load_run(text, device=device, allow_untrained=allow_untrained)
        except CheckpointError as exc:
            if Path(text).is_file() and "not a cnnvis checkpoint" in exc.message:  # a bare state dict, most likely
                raise CheckpointError(exc.message, "A weights file needs its architecture: give torchvision:NAME or "
                                      f"timm:NAME with --weights {text}.") from None
            raise
    library = parse_source(text)
    notes: list[str] = []
    if library is not None:
        zoo = build_zoo_model(text, weights if weights is not None else DEFAULT_WEIGHTS[library[0]])
        model, kind, name, known = zoo.model, "library", zoo.source, zoo.preprocessing
        notes += zoo.notes
        if known is None and zoo.library == "timm":  # the architecture's own default config still says
            known = preprocessing_from_timm(model)
        found_names, named_from, fixed = zoo.class_names, f"the {zoo.source} weights", None
        default_names = default_class_names(zoo.library, zoo.name) if found_names is None else None
    else:
        path = Path(text).expanduser()
        kind = program_kind(path)
        if weights is not None:
            raise ConfigError(f"--weights: {path.name} holds its own weights; --weights is for torchvision:/timm: models")
        model, fixed, more = _load_program(path, kind)
        notes += more
        name, known, found_names, named_from, weights = str(path), None, None, "", None
        default_names = None
    channels = _in_channels(model)
    preprocessing, line = resolve_preprocessing(known, channels, size, mean, std, fixed)
    notes.append(line)
    count = _output_classes(model, channels, preprocessing.crop)
    if classes is not None:
        names, named_from = read_class_names(classes), f"--classes {classes}"
        if len(names) != count:
            raise ConfigError(f"--classes {classes}: {len(names)} names for a model with {count} outputs")
    elif found_names is not None and len(found_names) == count:
        names = list(found_names)
    elif default_names is not None and len(default_names[0]) == count:
        # random weights or a weights file that keeps the default head: its outputs are the default
        # weights' classes (a fine-tuned head of another size is not, and stays numbered)
        names, named_from = default_names
        notes.append(f"class names: {named_from}; --classes FILE to change")
    else:
        names, named_from = [str(i) for i in range(count)], "numbers (no names known)"
        notes.append(f"class names: numbers 0..{count - 1} (the model does not name them; pass --classes FILE)")
    # "tench, Tinca tinca": pictures show the first alias, --target and --data folders match any of them
    aliases = list(names) if any("," in n for n in names) else None
    names = [n.split(",")[0].strip() or n for n in names]
    spec = ImageSpec(tuple(names), preprocessing.mean, preprocessing.std, channels, preprocessing.crop[0])
    origin = ModelOrigin(kind, name, zoo.weights if library is not None else None, library is not None and zoo.random,
                         preprocessing, named_from, notes, Path(data).expanduser() if data is not None else None,
                         aliases, fixed if kind == "export" else None)
    run_dir = output_dir(text, weights, runs_dir)
    model = model.to(device).eval()
    return LoadedRun(model=model, config=None, spec=spec, run_dir=run_dir, checkpoint=None, epoch=0,
                     device=device, origin=origin)


def write_source_file(run: LoadedRun) -> Path | None:
    """``RUN/source.yaml`` of a run-like directory: what the report shows in place of a config."""
    if run.origin is None:
        return None
    run.run_dir.mkdir(parents=True, exist_ok=True)
    path = run.run_dir / SOURCE_FILE
    path.write_text(yaml.safe_dump(run.origin.to_dict(run.spec), sort_keys=False), encoding="utf-8")
    return path
