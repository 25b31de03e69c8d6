"""The ``cnnvis`` command: parse, call the library, print with rich. No computing here."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import (
    escape,  # user text (paths, values) may hold "[...]", which rich reads as markup
)

from cnnvis.catalog import METHOD_NAMES, SLOW_METHODS
from cnnvis.console import (
    Command,
    Group,
    console,
    err_console,
    friendly_errors,
    print_notes,
    print_skipped,
)
from cnnvis.errors import CnnvisError

app = typer.Typer(
    name="cnnvis",
    cls=Group,
    help="Train CNN image classifiers from YAML configs, log them to TensorBoard, and see what they learned.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect the data a config points at.", no_args_is_help=True, cls=Group)
app.add_typer(data_app, name="data")

Debug = Annotated[bool, typer.Option("--debug", help="Show the full Python traceback on errors.")]
SetOption = Annotated[list[str], typer.Option(
    "--set", metavar="KEY.PATH=VALUE", help="Override a config field: --set train.epochs=3 (repeatable).")]
AllowUntrained = Annotated[bool, typer.Option(
    "--allow-untrained", help="Explain a run that finished no epoch yet (random weights; every output says so).")]

#: the MODEL argument and the options of a model that is not a run (cnnvis.sources)
ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="A run directory or checkpoint, torchvision:NAME, timm:NAME, or a model file: "
                          "a .pt2 (torch.export) or TorchScript.")]
WeightsOption = Annotated[Optional[str], typer.Option(
    metavar="NAME|FILE|none", help="Weights of a torchvision:/timm: model: a weights name (default: DEFAULT; "
                                   "IMAGENET1K_V2 ...; timm: pretrained or a tag), a state-dict file, or none (random).")]
ClassesOption = Annotated[Optional[Path], typer.Option(
    metavar="FILE", help="Class names of a model: one a line, a JSON list or {index: name} (default: the weights').")]
SizeOption = Annotated[Optional[int], typer.Option(
    metavar="PX", help="Input size of a model (default: the weights' own, else 224).")]
MeanOption = Annotated[Optional[str], typer.Option(
    metavar="M[,M,M]", help="Normalisation mean of a model (default: the weights' own, else ImageNet).")]
StdOption = Annotated[Optional[str], typer.Option(
    metavar="S[,S,S]", help="Normalisation std of a model (default: the weights' own, else ImageNet).")]
RunsDirOption = Annotated[Path, typer.Option(
    "--runs-dir", help="Where a model that is not a run gets its output folder, <library>-<name>-<weights>.")]

@app.command(cls=Command)
@friendly_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(metavar="CONFIG", help="YAML config, e.g. configs/mnist.yaml (optional with --resume).")] = None,
    set_: SetOption = [],
    name: Annotated[Optional[str], typer.Option(help="Run name prefix (default: the config's name).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Folder that holds the run directories.")] = Path("runs"),
    resume: Annotated[Optional[Path], typer.Option(metavar="RUN_DIR_OR_CHECKPOINT", help="Continue a run: its directory or a checkpoint file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    nproc_per_node: Annotated[Optional[int], typer.Option(
        "--nproc-per-node", metavar="N",
        help="Train on N processes of this machine (one per GPU; gloo on the CPU), launched by torchrun's launcher. "
             "data.batch_size stays the global batch.")] = None,
    debug: Debug = False,
) -> None:
    """Train a model; writes runs/<name>-<time>/ with config, metrics, checkpoints and TensorBoard events."""
    from cnnvis.config import load_config

    if config is None and resume is None:
        raise CnnvisError("give a config file (cnnvis train configs/mnist.yaml) or --resume RUN_DIR")
    if config is not None and resume is not None:
        err_console.print("[yellow]note:[/] --resume uses the run's stored config; the config file is ignored (use --set to change fields)")
    cfg = load_config(config, set_) if resume is None else None
    if nproc_per_node is not None:  # the config was checked above, before any process starts
        from cnnvis.training.distributed import launch

        options = [("--name", name), ("--runs-dir", runs_dir), ("--resume", resume), ("--device", device)]
        status = launch(nproc_per_node, ["train", *([str(config)] if config is not None else []),
                                *(arg for value in set_ for arg in ("--set", value)),
                                *(arg for flag, value in options if value is not None for arg in (flag, str(value))),
                                *(["--debug"] if debug else [])], runs_dir, resume)
        if status:
            raise typer.Exit(status)  # the failing process printed why
        return
    # torch loads only now, after the config is known to be good: a typo answers at once
    from cnnvis.training.trainer import Trainer
    from cnnvis.views import ProgressListener, summary_table

    listeners = [ProgressListener(console)]  # the trainer drops them on ranks other than 0
    trainer = Trainer(cfg, runs_dir=runs_dir, name=name, device=device, resume=resume, listeners=listeners, overrides=set_ if resume else ())
    cfg = trainer.config
    if not trainer.world.is_main:  # rank 0 shows the run and writes its files
        try:
            if trainer.finished is None:
                trainer.fit()
        finally:
            trainer.close()
        return
    if trainer.finished is not None:  # nothing left to do: say so instead of testing it all again
        trainer.close()
        console.print(summary_table(trainer.state.history, trainer.finished))
        err_console.print(f"[yellow]note:[/] {escape(str(trainer.run_dir))} already finished its {cfg.train.epochs} epochs; "
                          f"nothing to train (to train for longer: --resume {escape(str(trainer.run_dir))} --set train.epochs=N)", soft_wrap=True)
        return
    if trainer.data.skipped:
        print_skipped(trainer.data.skipped)
    if cfg.log.tensorboard:
        from cnnvis.training.tensorboard import TensorBoardListener

        trainer.listeners.append(TensorBoardListener(trainer.run_dir, cfg))
    try:
        final = trainer.fit()
    except KeyboardInterrupt:
        trainer.close()
        state, saved = trainer.state, trainer.saved_epoch
        where = f"in epoch {state.epoch + 1}" if state.epoch < cfg.train.epochs else "while testing"
        if saved is None:
            err_console.print(f"[yellow]interrupted[/] {where}, before the first checkpoint was written.", highlight=False)
        else:
            err_console.print(
                f"[yellow]interrupted[/] {where}; checkpoints/last.pt holds epoch {saved}.\n"
                f"resume with: cnnvis train --resume {escape(str(trainer.run_dir))}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(130) from None
    finally:
        trainer.close()
    console.print(summary_table(trainer.state.history, final))
    console.print(f"run saved in [bold]{escape(str(trainer.run_dir))}[/]   view it: tensorboard --logdir {escape(str(trainer.run_dir.parent))}", soft_wrap=True)


class Split(str, Enum):
    val = "val"
    test = "test"


_DEFAULT_SET = (
    f"Without -m every method is drawn except the slow ones: {'; '.join(f'{k} ({v})' for k, v in SLOW_METHODS.items())}. "
    "Ask for them by name, or for everything with -m all." if SLOW_METHODS
    else "Without -m (or with -m all) every method is drawn."
)


@app.command(cls=Command, help=(
    "Draw what a trained network learned and why it decides: heatmaps, activations, filters, class images.\n\n"
    f"Methods: {', '.join(METHOD_NAMES)}.\n\n"
    f"{_DEFAULT_SET}\n\n"
    "PNGs (each with a JSON sidecar to reproduce it) go to RUN/visualizations/<method>/; "
    "for a library model or model file, to runs/<library>-<name>-<weights>/visualizations/."
))
@friendly_errors
def visualize(
    source: ModelArg,
    method: Annotated[list[str], typer.Option("--method", "-m", metavar="NAME", help="Method to run (repeatable; default: all but the slow ones named above; all: every one).")] = [],
    images: Annotated[int, typer.Option("--images", "-n", help="How many fixed images of the run's data to explain.")] = 8,
    image: Annotated[list[str], typer.Option("--image", metavar="PATH", help="Your own images instead: a file, a folder or a quoted glob (repeatable).")] = [],
    param: Annotated[list[str], typer.Option("--param", "-p", metavar="KEY=VALUE", help="A method parameter, for every method drawn that takes it (repeatable), e.g. aug_smooth=true (CAM methods), over=guided-backprop (smoothgrad, smoothgrad-sq, vargrad), samples=50; each method's parameters are in its sidecar.")] = [],
    no_crop: Annotated[bool, typer.Option("--no-crop", help="Resize each whole picture to the model's size instead of cropping its centre.")] = False,
    split: Annotated[Split, typer.Option(help="Which split the fixed images come from.")] = Split.test,
    target: Annotated[str, typer.Option(metavar="pred|true|CLASS", help="Explain the predicted class, the true label, or a class index or name.")] = "pred",
    layer: Annotated[list[str], typer.Option("--layer", "-l", metavar="NAME", help="Layer for layer-based methods, as listed by `cnnvis summary` (repeatable; default: the last feature map before the head, in a transformer the last block's first norm).")] = [],
    out: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Write the PNGs here instead of RUN/visualizations.")] = None,
    no_tensorboard: Annotated[bool, typer.Option("--no-tensorboard", help="Do not log the pictures to the run's TensorBoard events.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    allow_untrained: AllowUntrained = False,
    weights: WeightsOption = None,
    classes: ClassesOption = None,
    size: SizeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    debug: Debug = False,
) -> None:
    from cnnvis.commands.visualize import visualize_command
    from cnnvis.config import parse_override
    from cnnvis.views import MethodProgress, visualize_table

    options = _model_options(source, weights=weights, classes=classes, size=size, mean=mean, std=std, runs_dir=runs_dir)
    params = dict(parse_override(text, "--param", "aug_smooth=true", "key=value") for text in param)
    with MethodProgress(console) as bars:
        result = visualize_command(
            source, methods=method, layers=layer, images=images, files=image, split=split.value, target=target,
            out_dir=out, device=device, tensorboard=not no_tensorboard, allow_untrained=allow_untrained,
            crop=not no_crop, params=params, model_options=options, on_progress=bars.update, on_ready=_print_ready,
        )
    run = result.run
    title = f"{len(result.written)} picture{'s' if len(result.written) != 1 else ''} of\n{run.label}"
    console.print(visualize_table(result, title))
    for skipped in result.skipped:
        err_console.print(f"[yellow]skipped {skipped.method}:[/] {escape(skipped.reason)}", soft_wrap=True)
    where = f"; also in TensorBoard: tensorboard --logdir {escape(str(run.run_dir))}" if result.tensorboard else ""
    console.print(f"pictures in [bold]{escape(str(result.out_dir))}[/]{where}", soft_wrap=True)
    if result.interrupted is not None:
        unfinished = ", ".join([result.interrupted, *result.not_run])
        err_console.print(f"[yellow]interrupted[/] during {result.interrupted}: the pictures above are kept; "
                          f"not drawn: {unfinished}", soft_wrap=True)
        raise typer.Exit(130)


def _print_ready(ready: Any) -> None:
    """Before the methods run: what loading decided and which image files were dropped."""
    print_notes(ready.notes)
    if ready.skipped_images:
        print_skipped(ready.skipped_images)


def _model_options(source: str, **options: Any) -> dict[str, Any]:
    """The options of a model that is not a run, as given (None: not given); a run takes none."""
    from cnnvis.sources import is_run_source

    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v is not None}
    if is_run_source(source):
        given.pop("runs_dir", None)  # has a default: given or not, it concerns other models only
    return given


@app.command(cls=Command)
@friendly_errors
def evaluate(
    source: ModelArg,
    data: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="A labelled image folder (one sub-folder per class) to evaluate a library model or model file on.")] = None,
    explanations: Annotated[bool, typer.Option("--explanations", help="Also rank the heatmap methods: deletion/insertion AUC, ROAD, max-sensitivity and the model randomization sanity check.")] = False,
    images: Annotated[int, typer.Option("--images", "-n", help="With --explanations: fixed images of the split the maps are checked on.")] = 32,
    method: Annotated[list[str], typer.Option("--method", "-m", metavar="NAME", help="With --explanations: heatmap method to check (repeatable; default: all but the slow ones visualize names; all: every one).")] = [],
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", metavar="NAME", help="With --explanations: layer of the layer-based methods (default: the last feature map before the head, in a transformer the last block's first norm).")] = None,
    steps: Annotated[int, typer.Option(help="With --explanations: deletion/insertion steps (points on each curve minus one).")] = 16,
    subset_images: Annotated[int, typer.Option("--subset-images", help="With --explanations: ROAD and max-sensitivity run on the first N of the images (they cost the most).")] = 8,
    sensitivity_samples: Annotated[int, typer.Option("--sensitivity-samples", help="With --explanations: noisy copies per image for max-sensitivity (0: skip it).")] = 5,
    no_road: Annotated[bool, typer.Option("--no-road", help="With --explanations: skip ROAD (remove-and-debias).")] = False,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also write the penultimate features of the split's images to TensorBoard's projector (in the run's events).")] = False,
    embedding_images: Annotated[int, typer.Option("--embedding-images", help="With --embeddings: images in the projector.")] = 1000,
    wrong: Annotated[int, typer.Option(help="How many of the most confidently wrong images to show.")] = 16,
    split: Annotated[Split, typer.Option(help="Which split to evaluate.")] = Split.test,
    out: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Write the files here instead of RUN/evaluation.")] = None,
    no_tensorboard: Annotated[bool, typer.Option("--no-tensorboard", help="Do not log the pictures and tables to the run's TensorBoard events.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    allow_untrained: AllowUntrained = False,
    weights: WeightsOption = None,
    classes: ClassesOption = None,
    size: SizeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    debug: Debug = False,
) -> None:
    """Accuracy, per-class table, confusion matrix and confidently wrong images; --explanations: which maps to trust.

    Files go to RUN/evaluation/ (metrics.json, per_class.csv, PNGs; faithfulness.json/.csv with --explanations); for a library model or model file, to runs/<library>-<name>-<weights>/evaluation/.
    """
    from cnnvis.commands.evaluate import evaluate_command
    from cnnvis.views import evaluation_table, faithfulness_table, worst_mistakes_line

    if not explanations and (method or layer):
        err_console.print("[yellow]note:[/] --method and --layer choose what --explanations checks; without it they are ignored")
    with console.status("evaluating ...") as status:
        outcome = evaluate_command(
            source, split=split.value, wrong=wrong, out_dir=out, explanations=explanations, images=images,
            methods=list(method), layer=layer, steps=steps, device=device, tensorboard=not no_tensorboard, allow_untrained=allow_untrained,
            subset_images=subset_images, sensitivity_samples=sensitivity_samples, road=not no_road, embeddings=embeddings,
            embedding_images=embedding_images,
            model_options=_model_options(source, weights=weights, classes=classes, size=size, mean=mean, std=std,
                                         data=data, runs_dir=runs_dir),
            on_progress=lambda text: status.update(f"{escape(text)} ..."),
        )
    run, ev = outcome.run, outcome.evaluation
    print_notes(run.notes)
    if outcome.skipped_images:
        print_skipped(outcome.skipped_images)
    console.print(evaluation_table(ev, run.label))
    if ev.wrong_count:
        console.print(worst_mistakes_line(ev))  # prose: wrapped at words, not cut
    report = outcome.faithfulness
    if report is not None:
        console.print(faithfulness_table(report, ev.images_text))
        for name, reason in report.skipped:
            err_console.print(f"[yellow]skipped {name}:[/] {escape(reason)}", soft_wrap=True)
    written = [outcome.files.metrics, outcome.files.per_class, outcome.files.confusion_matrix, outcome.files.confidently_wrong]
    if outcome.faithfulness_files is not None:
        written += [outcome.faithfulness_files.json, outcome.faithfulness_files.csv, outcome.faithfulness_files.curves]
    names = ", ".join(p.name for p in written if p is not None)
    where = f"; also in TensorBoard: tensorboard --logdir {escape(str(run.run_dir))}" if outcome.tensorboard else ""
    console.print(f"written to [bold]{escape(str(outcome.out_dir))}[/]: {names}{where}", soft_wrap=True)
    if outcome.embedding is not None:
        console.print(f"projector: {outcome.embedding.features.shape[0]} {escape(ev.images_text)}, {outcome.embedding.features.shape[1]} "
                      f"features (input of {escape(outcome.embedding.layer)}); open the Projector tab of "
                      f"tensorboard --logdir {escape(str(run.run_dir))}", soft_wrap=True)


@app.command(cls=Command)
@friendly_errors
def report(
    run_dir: Annotated[str, typer.Argument(metavar="MODEL", help="A run directory, or a MODEL that visualize or evaluate wrote outputs for.")],
    out: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Write the page here instead of RUN/report.html.")] = None,
    weights: WeightsOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    debug: Debug = False,
) -> None:
    """Write one self-contained HTML page of a run (config, curves, metrics, evaluation, faithfulness, pictures)."""
    from cnnvis.commands.report import build_report

    result = build_report(run_dir, out, weights=weights, runs_dir=runs_dir)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    console.print(f"report: [bold]{escape(str(result.path))}[/] ({result.size / 1e6:.1f} MB, {result.pictures} pictures; "
                  f"opens from disk, no network)", soft_wrap=True)
    for section, command in result.missing:
        err_console.print(f"[yellow]note:[/] no \"{escape(section)}\" section yet: {escape(command)}", soft_wrap=True)


@app.command(cls=Command)
@friendly_errors
def summary(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="A YAML config, or a MODEL: a run directory or checkpoint, torchvision:NAME, timm:NAME, a .pt2 file.")],
    set_: SetOption = [],
    depth: Annotated[int, typer.Option(help="Show modules nested at most this deep (0: all).")] = 0,
    weights: WeightsOption = None,
    size: SizeOption = None,
    debug: Debug = False,
) -> None:
    """Print the layer table: names exactly as --layer accepts them, output shapes, parameters, mult-adds."""
    from cnnvis.commands.summary import summarize_source
    from cnnvis.views import layer_table

    options = {} if source.endswith((".yaml", ".yml")) else _model_options(source, weights=weights, size=size)
    result, title = summarize_source(source, set_, **options)
    console.print(layer_table(result, title, depth, width=console.width))


@data_app.command("check", cls=Command)
@friendly_errors
def data_check(
    config: Annotated[Path, typer.Argument(help="YAML config whose data to check.")],
    set_: SetOption = [],
    debug: Debug = False,
) -> None:
    """Decode every image once and name each bad file (the same check training runs first)."""
    from cnnvis.config import load_config
    from cnnvis.data import check_data
    from cnnvis.views import split_sizes_table

    cfg = load_config(config, set_)
    bundle = check_data(cfg)
    console.print(f"{cfg.data.dataset}: {bundle.num_classes} classes", soft_wrap=True)
    console.print(split_sizes_table(bundle))
    if bundle.skipped:
        # One plain line per file (no table): a long path stays whole, copyable and grep-able.
        console.print(f"[yellow]{len(bundle.skipped)} unreadable file(s), skipped:[/]")
        for path, why in bundle.skipped:
            console.print(f"  {path}: {why}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[green]every image decodes[/]")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="cnnvis")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
