"""TensorBoard logging: train tiny runs, read the event files back with TensorBoard's own reader."""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tb_helpers import gray_bundle
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn

from cnnvis.config import build_config
from cnnvis.data import DataBundle
from cnnvis.errors import CnnvisError
from cnnvis.plots import filter_tiles
from cnnvis.training.summaries import TensorBoardWarning, log_graph
from cnnvis.training.tensorboard import TensorBoardListener
from cnnvis.training.trainer import Listener, Trainer

ALL_OFF = [
    "log.step_loss=false", "log.histograms_every=0", "log.images=false", "log.filters=false",
    "log.misclassified=0", "log.explain_every=0", "log.graph=false", "log.hparams=false",
    "log.pr_curves=false", "log.confusion_matrix=false", "log.embeddings=0",
]


# ---------------------------------------------------------------------- helpers


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 16) -> Path:
    """RGB pictures whose class is a coloured band; 12 per class -> 6 train / 3 val / 3 test."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            pixels[label * 5 : label * 5 + 5, :, label % 3] = 230
            Image.fromarray(pixels, mode="RGB").save(folder / f"{i:02d}.png")
    return root


def rgb_config(folder: Path, *overrides: str):
    raw = {
        "name": "tb",
        "data": {
            "dataset": "imagefolder", "path": str(folder), "batch_size": 8, "eval_batch_size": 16,
            "num_workers": 0, "val_fraction": 0.25, "test_fraction": 0.25, "transforms": {"image_size": 16},
        },
        "train": {"epochs": 2, "log_every": 1},
        "log": {"misclassified": 8, "explain_images": 4},
    }
    return build_config(raw, list(overrides))


def gray_config(*overrides: str):
    return build_config({"name": "gray", "train": {"epochs": 2, "log_every": 2}, "log": {"explain_images": 4}}, list(overrides))


def train(config, runs_dir: Path, data: DataBundle | None = None, extra: tuple[Listener, ...] = (), **kw) -> Trainer:
    trainer = Trainer(config, runs_dir=runs_dir, device="cpu", data=data, **kw)
    trainer.listeners.append(TensorBoardListener(trainer.run_dir, trainer.config))
    trainer.listeners.extend(extra)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def read(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    return acc.Reload()


def steps(acc: EventAccumulator, tag: str, kind: str = "Scalars") -> list[int]:
    return [e.step for e in getattr(acc, kind)(tag)]


def raw_steps(event_file: Path, tag: str) -> list[int]:
    """Steps of ``tag`` as written in one event file, before TensorBoard's purging."""
    return [e.step for e in EventFileLoader(str(event_file)).Load() if any(v.tag == tag for v in e.summary.value)]


def png(event) -> Image.Image:
    image = Image.open(io.BytesIO(event.encoded_image_string))
    image.load()
    return image


def tb_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, TensorBoardWarning)]


# ---------------------------------------------------------------------- one RGB run, read back


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb-rgb")
    config = rgb_config(make_image_folder(root / "folder"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = train(config, root / "runs")
    return trainer, read(trainer.run_dir), record


def test_scalars_per_epoch_per_interval_and_at_the_end(rgb_run):
    trainer, acc, record = rgb_run
    assert tb_warnings(record) == []
    history = trainer.state.history
    epoch_steps = [h["step"] for h in history]
    per_epoch = trainer.state.steps_per_epoch
    assert epoch_steps == [per_epoch, 2 * per_epoch]
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "perf/images_per_second", "perf/epoch_seconds"):
        assert steps(acc, tag) == epoch_steps, tag
    assert steps(acc, "lr") == list(range(1, 2 * per_epoch + 1))  # the rate of every step
    assert [e.value for e in acc.Scalars("accuracy/val")] == pytest.approx([h["val_accuracy"] for h in history])
    assert steps(acc, "loss/train_step") == list(range(1, 2 * per_epoch + 1))  # train.log_every = 1
    final = [m for m in (trainer.run_dir / "metrics.jsonl").read_text().splitlines() if "test_accuracy" in m]
    assert len(final) == 1
    for tag in ("accuracy/test", "loss/test", "accuracy/val_best"):
        assert steps(acc, tag) == [epoch_steps[-1]], tag
    # train and validation on one chart: the Custom Scalars layout
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")


def test_histograms_of_every_parameter_and_gradient(rgb_run):
    trainer, acc, _ = rgb_run
    epoch_steps = [h["step"] for h in trainer.state.history]
    hist_tags = set(acc.Tags()["histograms"])
    for name, param in trainer.state.model.named_parameters():
        for kind in ("weights", "gradients"):
            tag = f"{kind}/{name}"
            assert tag in hist_tags
            events = acc.Histograms(tag)
            assert [e.step for e in events] == epoch_steps
            assert events[-1].histogram_value.num == param.numel()
            assert sum(events[-1].histogram_value.bucket) == param.numel()
    assert steps(acc, "health/nonfinite_weights") == epoch_steps
    assert all(e.value == 0 for e in acc.Scalars("health/nonfinite_gradients"))


def test_image_grids_sizes_and_colour(rgb_run):
    trainer, acc, _ = rgb_run
    epoch_steps = [h["step"] for h in trainer.state.history]
    images = set(acc.Tags()["images"])
    assert images == {"inputs/train", "filters/features.0", "misclassified/val", "explain/gradcam", "confusion_matrix/test"}

    (inputs,) = acc.Images("inputs/train")  # once, the first batch of the first epoch: 8 images
    assert inputs.step == 0
    side = 16 * 4  # 16 px enlarged (nearest) to >= 56 px; make_grid pads 2 px
    assert (inputs.width, inputs.height) == (8 * (side + 2) + 2, side + 4)
    picture = np.asarray(png(inputs).convert("RGB")).astype(int)
    assert np.abs(picture[..., 0] - picture[..., 1]).max() > 0  # RGB data shown in colour

    filters = acc.Images("filters/features.0")  # 16 first-layer 3x3 RGB filters, 24 px tiles, 4 x 4
    assert [e.step for e in filters] == epoch_steps
    assert (filters[0].width, filters[0].height) == (4 * 26 + 2, 4 * 26 + 2)
    tiles = np.asarray(png(filters[0]).convert("RGB")).astype(int)[2:26, 2:26]
    assert np.abs(tiles[..., 0] - tiles[..., 2]).max() > 0  # filters of an RGB net in colour

    gradcam = acc.Images("explain/gradcam")  # 4 fixed val images: inputs above, overlays below
    assert [e.step for e in gradcam] == epoch_steps
    assert (gradcam[0].width, gradcam[0].height) == (4 * (side + 2) + 2, 2 * (side + 2) + 2)

    assert set(steps(acc, "misclassified/val", "Images")) <= set(epoch_steps)
    for event in acc.Images("misclassified/val"):
        assert png(event).width > 200  # a captioned matplotlib grid, not bare pixels
    (confusion,) = acc.Images("confusion_matrix/test")
    assert confusion.step == epoch_steps[-1] and confusion.width >= 300


def test_graph_hparams_pr_curves_and_config_text(rgb_run):
    trainer, acc, _ = rgb_run
    graph = acc.Graph()
    assert any("Conv" in node.op or "conv" in node.op for node in graph.node)
    assert set(acc.PluginTagToContent("hparams")) == {
        "_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"
    }
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optimizer.lr"].number_value == pytest.approx(trainer.config.optimizer.lr)
    assert start.session_start_info.hparams["data.dataset"].string_value == "imagefolder"
    assert not any(k.startswith("log.") for k in start.session_start_info.hparams)
    pr_tags = {t for t in acc.Tags()["tensors"] if t.startswith("pr_curve/")}
    assert pr_tags == {"pr_curve/class_0", "pr_curve/class_1", "pr_curve/class_2"}
    for tag in pr_tags:
        (event,) = acc.Tensors(tag)
        assert event.step == trainer.state.global_step
        assert tuple(d.size for d in event.tensor_proto.tensor_shape.dim) == (6, 127)
    assert "config/text_summary" in acc.Tags()["tensors"]
    # one event file, in the run directory itself (no timestamped sub-runs)
    assert len(list(trainer.run_dir.glob("events.out.tfevents.*"))) == 1
    assert not [p for p in trainer.run_dir.rglob("events.out.tfevents.*") if p.parent != trainer.run_dir]


def test_the_projector_holds_every_test_image_with_its_class(rgb_run):
    trainer, _, _ = rgb_run
    config = (trainer.run_dir / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "penultimate' in config and "sprite" in config
    folder = next(trainer.run_dir.glob("*/penultimate"))
    rows = (folder / "tensors.tsv").read_text().splitlines()
    metadata = (folder / "metadata.tsv").read_text().splitlines()
    assert len(rows) == 9 and len(metadata) == 10  # 3 test images per class, and the header
    assert len(rows[0].split("\t")) == trainer.state.model.fc.in_features  # the head's input
    assert metadata[0].split("\t") == ["class", "predicted", "image"]
    assert sorted({line.split("\t")[0] for line in metadata[1:]}) == ["class_0", "class_1", "class_2"]
    with Image.open(folder / "sprite.png") as sprite:
        assert sprite.size == (16 * 3, 16 * 3)  # 9 thumbnails of 16 px, 3 a row


# ---------------------------------------------------------------------- grey images, switches


def test_grayscale_inputs_and_every_switch_off(tmp_path):
    config = gray_config(*[o for o in ALL_OFF if o != "log.images=false"])
    trainer = train(config, tmp_path / "runs", gray_bundle())
    acc = read(trainer.run_dir)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {
        "loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "perf/images_per_second",
        "perf/epoch_seconds", "accuracy/test", "loss/test", "accuracy/val_best",
    }
    assert tags["histograms"] == [] and not tags["graph"]
    assert [t for t in tags["tensors"] if t != "custom_scalars__config__"] == []
    assert tags["images"] == ["inputs/train"]
    assert not (trainer.run_dir / "projector_config.pbtxt").exists()
    (inputs,) = acc.Images("inputs/train")
    side = 28 * 2
    assert (inputs.width, inputs.height) == (8 * (side + 2) + 2, side + 4)
    picture = np.asarray(png(inputs).convert("RGB")).astype(int)
    assert (picture[..., 0] == picture[..., 1]).all() and (picture[..., 1] == picture[..., 2]).all()
    # de-normalised: the background noise is dark (0..60 of 255), the band bright, nothing clipped to a flat grey
    assert picture.min() < 70 and picture.max() > 200


def test_filter_grid_grey_and_colour():
    grey = filter_tiles(torch.randn(16, 1, 3, 3))
    assert grey.shape == (3, 4 * 26 + 2, 4 * 26 + 2)
    inside = grey[:, 2:26, 2:26]
    assert torch.equal(inside[0], inside[1]) and torch.equal(inside[1], inside[2])
    colour = filter_tiles(torch.randn(64, 3, 7, 7))
    assert colour.shape == (3, 8 * 23 + 2, 8 * 23 + 2)  # 7 px * 3 = 21 px tiles, 8 per row
    zero = filter_tiles(torch.zeros(4, 3, 5, 5))
    assert torch.allclose(zero[:, 2:22, 2:22], torch.tensor(0.5))  # mid-grey means 0


# ---------------------------------------------------------------------- resume


class KeepCheckpointAfterEpoch1(Listener):
    def on_epoch_end(self, state, metrics):
        if state.epoch == 1:
            shutil.copyfile(state.run_dir / "checkpoints" / "last.pt", state.run_dir / "epoch1.pt")


def test_resume_continues_the_stream_without_overlap(tmp_path):
    config = gray_config("scheduler.name=step", "log.histograms_every=0", "log.misclassified=0", "log.explain_every=0",
                         "log.graph=false", "log.pr_curves=false", "log.confusion_matrix=false")
    first = train(config, tmp_path / "runs", gray_bundle(), extra=(KeepCheckpointAfterEpoch1(),))
    run_dir, per_epoch = first.run_dir, first.state.steps_per_epoch
    # Epoch 2 and the test were logged, but the run is taken back to its epoch-1 checkpoint
    # (as if it had been killed before saving epoch 2) and resumed for three epochs.
    shutil.copyfile(run_dir / "epoch1.pt", run_dir / "checkpoints" / "last.pt")
    second = train(None, tmp_path / "runs", gray_bundle(), resume=run_dir, overrides=["train.epochs=3"])
    assert second.run_dir == run_dir

    acc = read(run_dir)
    expected = [per_epoch, 2 * per_epoch, 3 * per_epoch]
    for tag in ("loss/train", "loss/val", "accuracy/val"):
        assert steps(acc, tag) == expected, tag
    assert steps(acc, "lr") == list(range(1, 3 * per_epoch + 1))  # every step once, none twice
    step_points = steps(acc, "loss/train_step")
    assert step_points == sorted(set(step_points)) == list(range(2, 3 * per_epoch + 1, 2))
    assert steps(acc, "accuracy/test") == [3 * per_epoch]  # the first process's test result is gone
    # Both files hold epoch 2; what TensorBoard shows is the resumed process's point.
    first_file, second_file = sorted(run_dir.glob("events.out.tfevents.*"))
    assert raw_steps(first_file, "loss/train") == expected[:2]
    assert raw_steps(second_file, "loss/train") == expected[1:]
    resumed_start = min(e.wall_time for e in EventFileLoader(str(second_file)).Load())
    assert acc.Scalars("loss/train")[1].wall_time >= resumed_start
    assert acc.Scalars("loss/train")[1].value == pytest.approx(second.state.history[1]["train_loss"])
    assert steps(acc, "inputs/train", "Images") == [0]  # epoch-0 pictures are not logged again
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    assert not [p for p in run_dir.rglob("events.out.tfevents.*") if p.parent != run_dir]


# ---------------------------------------------------------------------- the model is left alone


def test_logging_leaves_model_mode_bn_stats_and_grads_alone(tmp_path):
    config = gray_config("log.misclassified=4")
    trainer = Trainer(config, runs_dir=tmp_path / "runs", device="cpu", data=gray_bundle())
    listener = TensorBoardListener(trainer.run_dir, config)
    state, model = trainer.state, trainer.state.model
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    metrics = {"train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5, "lr": 0.1,
               "seconds": 1.0, "images_per_second": 32.0}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        listener.on_train_start(state)  # the graph is traced here
        listener.on_first_batch(state, *next(iter(state.data.train)))
        state.epoch, state.global_step = 1, 4
        listener.on_epoch_end(state, metrics)
        listener.close()
    assert tb_warnings(record) == []
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    tags = set(read(trainer.run_dir).Tags()["images"])
    assert {"filters/features.0", "explain/gradcam", "inputs/train"} <= tags


def test_histograms_skip_missing_gradients_and_report_nonfinite(tmp_path):
    config = gray_config(*[o for o in ALL_OFF if o != "log.histograms_every=0"])
    trainer = Trainer(config, runs_dir=tmp_path / "runs", device="cpu", data=gray_bundle())
    state, model = trainer.state, trainer.state.model
    first = model.features[0].weight
    first.requires_grad_(False)  # a frozen layer: no gradient
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    model.fc.weight.grad[0, 0] = float("inf")
    with torch.no_grad():
        model.fc.bias[1] = float("nan")
    listener = TensorBoardListener(trainer.run_dir, config)
    state.epoch, state.global_step = 1, 4
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        listener.on_train_start(state)
        listener.on_epoch_end(state, {})
        listener.close()
    messages = tb_warnings(record)
    assert len(messages) == 2
    assert "non-finite weights" in messages[0] and "fc.bias (1)" in messages[0]
    assert "non-finite gradients" in messages[1] and "fc.weight (1)" in messages[1]
    acc = read(trainer.run_dir)
    hist = set(acc.Tags()["histograms"])
    assert "weights/features.0.weight" in hist and "gradients/features.0.weight" not in hist
    (bias,) = acc.Histograms("weights/fc.bias")
    assert bias.histogram_value.num == model.fc.bias.numel() - 1  # finite values only
    assert [e.value for e in acc.Scalars("health/nonfinite_weights")] == [1.0]
    assert [e.value for e in acc.Scalars("health/nonfinite_gradients")] == [1.0]


# ---------------------------------------------------------------------- graph, best effort


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("this model cannot be traced\nsecond line of detail")
        return self.bn(self.conv(x)).mean((2, 3))


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        return {"logits": y.mean((2, 3)), "features": y}


def test_graph_failure_is_one_warning_and_dict_outputs_are_traced(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    model = Untraceable().train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert log_graph(writer, model, torch.zeros(1, 1, 8, 8)) is False
        assert log_graph(writer, DictOutput(), torch.zeros(1, 1, 8, 8)) is True
    assert [str(w.message) for w in record] == [
        "TensorBoard: model graph not logged (RuntimeError: this model cannot be traced)"
    ]  # one line, and no tracer or deprecation warnings
    assert capsys.readouterr().out == ""
    assert model.training and model.bn.training and int(model.bn.num_batches_tracked) == 0
    writer.close()
    assert len(read(tmp_path).Graph().node) > 0


def test_wrong_explain_layer_fails_at_start(tmp_path):
    config = gray_config("log.explain_layer=features.99")
    trainer = Trainer(config, runs_dir=tmp_path / "runs", device="cpu", data=gray_bundle())
    listener = TensorBoardListener(trainer.run_dir, config)
    with pytest.raises(CnnvisError, match="features.99"):
        listener.on_train_start(trainer.state)
    listener.close()
    listener.close()  # closing twice is fine


def test_a_one_cycle_rate_is_logged_at_every_step_and_the_table_shows_its_peak(tmp_path):
    from rich.console import Console

    from cnnvis.views import summary_table

    config = gray_config("train.epochs=2", "scheduler.name=onecycle", "optimizer.lr=0.005")
    trainer = train(config, tmp_path / "runs", gray_bundle())
    rates = [e.value for e in read(trainer.run_dir).Scalars("lr")]
    assert len(rates) == 2 * trainer.state.steps_per_epoch
    assert rates[0] < 0.005 / 10 and max(rates) == pytest.approx(0.005, rel=1e-3)  # warms up, peaks, anneals
    history = trainer.state.history
    assert max(h["lr_max"] for h in history) == pytest.approx(max(rates))
    assert history[0]["lr_mean"] == pytest.approx(sum(rates[: len(rates) // 2]) / (len(rates) // 2))
    console = Console(width=80, record=True)
    console.print(summary_table(history, {"test_accuracy": 0.5, "test_split": "test", "test_checkpoint": "best",
                                          "best_val_accuracy": 0.5}))
    text = console.export_text()
    assert "peak lr" in text and f"{max(rates):.2e}" in text


def test_the_test_split_is_predicted_once_for_accuracy_pr_curves_and_confusion_matrix(tmp_path, monkeypatch):
    import cnnvis.training.loop as loop
    import cnnvis.training.tensorboard as tensorboard_module
    import cnnvis.training.trainer as trainer_module

    calls = []
    real = loop.predict_split

    def counted(model, batches, *args, **kwargs):
        calls.append(batches)
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "predict_split", counted)
    monkeypatch.setattr(tensorboard_module, "predict_split", counted)
    trainer = train(gray_config("train.epochs=1"), tmp_path / "runs", gray_bundle())
    assert len([b for b in calls if b is trainer.data.test]) == 1
    logits, targets = trainer.state.test_predictions
    acc = read(trainer.run_dir)
    assert [e.value for e in acc.Scalars("accuracy/test")] == pytest.approx([(logits.argmax(1) == targets).float().mean().item()])
    assert any(tag.startswith("pr_curve/") for tag in acc.Tags()["tensors"])
