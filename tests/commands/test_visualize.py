"""``cnnvis visualize``: every method's pictures land in the run, with sidecars and TensorBoard images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from cnnvis.catalog import SLOW_METHODS, default_methods
from cnnvis.cli import app
from cnnvis.commands.visualize import (
    Visualizer,
    dataset_images,
    parse_target,
    select_methods,
)
from cnnvis.config import build_config
from cnnvis.errors import UnknownMethodError, UnsupportedModelError
from cnnvis.run import load_run
from cnnvis.training.trainer import Trainer
from cnnvis.vis import METHODS

CLASSES = ["left", "middle", "right"]


def _folder(root: Path, size: int = 20) -> Path:
    """Three classes told apart by where a bright vertical bar stands."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
            x = 2 + label * 6 + i % 2
            pixels[:, x : x + 3, :] = 220
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def _train(base: Path, arch: str = "mnist_cnn") -> Path:
    folder = _folder(base / "bars")
    config = build_config({
        "name": arch,
        "data": {"dataset": "imagefolder", "path": str(folder), "num_workers": 0, "batch_size": 6,
                 "val_fraction": 0.25, "test_fraction": 0.25, "transforms": {"image_size": 20}},
        "model": {"arch": arch},
        "optimizer": {"name": "adam", "lr": 0.01},
        "scheduler": {"name": "none"},
        "train": {"epochs": 3},
        "log": {"tensorboard": False},
    })
    trainer = Trainer(config, runs_dir=base / "runs", device="cpu")
    trainer.fit()
    trainer.close()
    return trainer.run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("vis"))


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / trained.name))


def invoke(*args: object, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["visualize", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def sidecar(png: Path) -> dict:
    return json.loads(png.with_suffix(".json").read_text())


def test_no_options_draws_every_method_but_the_slow_ones_into_the_run_and_tensorboard(run):
    out = invoke(run, "--images", "4")
    folder = run / "visualizations"
    assert {p.name for p in folder.iterdir()} == set(METHODS) - set(SLOW_METHODS)
    for method in default_methods():
        pngs = sorted((folder / method).glob("*.png"))
        assert pngs, method
        for png in pngs:
            with Image.open(png) as image:
                assert image.format == "PNG" and min(image.size) >= 150, (png, image.size)
            meta = sidecar(png)
            assert meta["method"] == method and meta["checkpoint"].endswith("best.pt") and meta["seed"] == 0
            assert "parameters" in meta
            if method == "maximize":  # drawn from noise: no explained images to list
                assert "images" not in meta and "targets" not in meta
            else:
                assert meta["images"][0].startswith("test #")
    gradcam = sidecar(folder / "gradcam" / "features.13.png")
    assert gradcam["layer"] == "features.13" and gradcam["target"] == "pred"
    assert gradcam["targets"] == gradcam["predicted"] and len(gradcam["images"]) == len(gradcam["true"])
    assert set(gradcam["true"]) <= set(CLASSES)
    occlusion = sidecar(folder / "occlusion" / "occlusion.png")
    assert occlusion["parameters"]["window"] == [3, 3] and occlusion["parameters"]["incremental"] == "auto"
    assert occlusion["computation"].startswith("incremental (exact")  # or "full forward: <why>"
    assert sidecar(folder / "occlusion" / "predicted-class.png")["computation"] == occlusion["computation"]
    if "maximize" not in SLOW_METHODS:
        drawn = sidecar(folder / "maximize" / "classes.png")
        assert drawn["classes"] == CLASSES and len(drawn["probability"]) == len(CLASSES)
        assert drawn["parameters"]["recipe"]["param"] == "pixel"  # 20 px: too small for the Fourier recipe
        assert drawn["parameters"]["mean"] == list(load_run(run).spec.mean)
    dream = sidecar(folder / "deepdream" / "features.10.png")
    assert dream["layer"] == "features.10" and dream["parameters"]["steps"] == 20 and dream["octave_sizes"] == [[20, 20]]
    assert all(a > b for a, b in zip(dream["layer_mean_square_after"], dream["layer_mean_square_before"]))
    assert f"pictures in {folder}" in out
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"visualize/gradcam/features.13", "visualize/saliency", "visualize/ablationcam/features.13",
            "visualize/deepdream/features.10"} <= tags
    assert not any(tag.startswith("visualize/scorecam") for tag in tags) and "scorecam" in SLOW_METHODS


def test_which_methods_run_without_m_with_names_and_with_all(monkeypatch):
    monkeypatch.setitem(SLOW_METHODS, "maximize", "measured too slow")
    assert select_methods([]) == ([n for n in METHODS if n not in ("maximize", "scorecam")], False)
    assert select_methods(["maximize", "gradcam", "maximize"]) == (["maximize", "gradcam"], True)
    assert select_methods(["all"]) == (list(METHODS), False) == select_methods(["gradcam", "all"])
    with pytest.raises(UnknownMethodError, match="gradcan"):
        select_methods(["all", "gradcan"])
    help_text = " ".join(CliRunner().invoke(app, ["visualize", "--help"], terminal_width=200).output.split())
    assert "-m all" in help_text


def test_one_method_chosen_layer_true_target_and_out_dir(run, tmp_path):
    out_dir = tmp_path / "pictures"
    out = invoke(run, "-m", "gradcam", "--layer", "features.6", "--target", "true", "--split", "val",
                 "--images", "3", "--out", out_dir, "--no-tensorboard")
    assert [p.name for p in out_dir.iterdir()] == ["gradcam"]
    meta = sidecar(out_dir / "gradcam" / "features.6.png")
    assert meta["layer"] == "features.6" and meta["target"] == "true" and meta["targets"] == meta["true"]
    assert all(source.startswith("val #") for source in meta["images"]) and len(meta["images"]) == 3
    assert "gradcam" in out and "features.6" in out
    assert not (run / "visualizations").exists()
    assert not list(run.glob("events.out.tfevents*")), "--no-tensorboard wrote events"


def test_maximize_on_a_layer_draws_its_channels(run, tmp_path):
    invoke(run, "-m", "maximize", "--layer", "features.2", "--out", tmp_path, "--no-tensorboard")
    meta = sidecar(tmp_path / "maximize" / "features.2.png")
    assert meta["layer"] == "features.2" and meta["objective"] == "channel"
    assert meta["channels"] == list(range(16)) and meta["parameters"]["recipe"]["param"] == "pixel"


def test_a_class_name_as_target(run):
    invoke(run, "-m", "saliency", "--target", "right", "--images", "4", "--no-tensorboard")
    meta = sidecar(run / "visualizations" / "saliency" / "saliency.png")
    assert meta["targets"] == ["right"] * 4 and meta["target"] == 2


def test_own_image_files_of_any_mode_and_size(run, tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 30), 200, np.uint8), "L").save(grey)
    rgba = tmp_path / "glass.png"
    Image.new("RGBA", (25, 25), (250, 10, 10, 128)).save(rgba)
    invoke(run, "-m", "gradcam++", "--image", grey, "--image", rgba, "--no-tensorboard")
    meta = sidecar(run / "visualizations" / "gradcam++" / "features.13.png")
    assert meta["images"] == [str(grey), str(rgba)] and meta["true"] is None
    out = invoke(run, "-m", "gradcam", "--image", grey, "--target", "true", code=2)
    assert "--target true needs images with known labels" in out


def test_bad_requests_get_one_line(run, tmp_path):
    out = invoke(run, "--layer", "features.99", code=2)
    assert "no layer 'features.99'" in out and "features.13" in out and "fc" in out
    out = invoke(run, "--method", "gradcamm", code=2)
    assert "error: unknown visualisation method 'gradcamm'; did you mean gradcam" in out
    assert "choose one of: activations, filters" in out and "gradcam++" in out
    out = invoke(run, "--method", "gradcm", code=2)
    assert "did you mean gradcam, xgradcam, gradcam++? choose one of" in out
    out = invoke(run, "--target", "tulip", code=2)
    assert "not pred, true, a class index or a class name" in out and "left, middle, right" in out
    out = invoke(run, "--target", "7", code=2)
    assert "class index out of range" in out
    text = tmp_path / "note.jpg"
    text.write_text("not a picture")
    out = invoke(run, "--image", text, code=2)
    assert "note.jpg: not an image" in out
    out = invoke(tmp_path / "nowhere", code=2)
    assert "nowhere" in out
    assert not list(run.glob("events.out.tfevents*")), "a failed command left an empty TensorBoard events file"


def test_pictures_are_ordinary_files_a_colleague_can_read(run):
    import os
    import stat

    invoke(run, "-m", "saliency", "--images", "2", "--no-tensorboard")
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (run / "visualizations" / "saliency").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_run_with_no_checkpoint_yet(run):
    for checkpoint in (run / "checkpoints").iterdir():
        checkpoint.unlink()
    out = invoke(run, code=2)
    assert "has no checkpoint yet" in out and "Train it first" in out


def test_class_count_changed_in_the_data_since_training(run):
    config = yaml.safe_load((run / "config.yaml").read_text())
    folder = Path(config["data"]["path"])
    extra = folder.parent / "bars4"
    shutil.copytree(folder, extra)
    shutil.copytree(extra / "left", extra / "top")
    payload = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    payload["config"]["data"]["path"] = str(extra)
    torch.save(payload, run / "checkpoints" / "best.pt")
    out = invoke(run, "-m", "saliency", code=2)
    assert "the data now has 4 classes but" in out and "was trained on 3" in out and "image files of your own" in out


def test_cam_needs_a_gap_linear_head(tmp_path):
    run_dir = _train(tmp_path, arch="mnist_classic")
    out = invoke(run_dir, "--images", "2", "--no-tensorboard")
    assert "skipped cam:" in out
    assert not (run_dir / "visualizations" / "cam").exists()
    assert (run_dir / "visualizations" / "gradcam").is_dir()
    invoke(run_dir, "-m", "cam", code=2)
    loaded = load_run(run_dir)
    with pytest.raises(UnsupportedModelError):
        Visualizer(loaded, dataset_images(loaded, "test", 2), tmp_path / "out").run_methods(["cam"])
    # named with others, an unsupported method is one line and the others are drawn
    out = invoke(run_dir, "--images", "2", "--no-tensorboard", "-m", "cam", "-m", "saliency", "--out", tmp_path / "both")
    assert out.count("skipped cam: CAM needs a model ending in global average pooling") == 1
    assert (tmp_path / "both" / "saliency" / "saliency.png").is_file() and not (tmp_path / "both" / "cam").exists()
    result = Visualizer(loaded, dataset_images(loaded, "test", 2), tmp_path / "lib").run_methods(
        ["cam", "gradcam", "saliency"], ["classifier.1"])  # a Linear layer: no map for Grad-CAM either
    assert [s.method for s in result.skipped] == ["cam", "gradcam"]
    assert [w.method for w in result.written] == ["saliency"]
    # every method named is unsupported: one error naming each
    visualizer = Visualizer(loaded, dataset_images(loaded, "test", 2), tmp_path / "none")
    with pytest.raises(UnsupportedModelError, match=r"^cam: CAM needs .* instead; gradcam: layer 'classifier.1' outputs shape \[2, 128\], not a spatial map"):
        visualizer.run_methods(["cam", "gradcam"], ["classifier.1"])
    assert "\n" not in str(visualizer.result.skipped)


def test_visualizing_leaves_the_model_as_it_was(trained, tmp_path):
    loaded = load_run(trained)
    loaded.model.train()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    Visualizer(loaded, dataset_images(loaded, "test", 3), tmp_path / "out").run_methods()
    assert loaded.model.training and all(m.training for m in loaded.model.modules())
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a visualisation changed weights or BN statistics"
    assert all(not m._forward_hooks and not m._backward_hooks for m in loaded.model.modules())


def test_parse_target():
    assert parse_target("pred", CLASSES) == "pred" and parse_target("true", CLASSES) == "true"
    assert parse_target("middle", CLASSES) == 1 and parse_target("2", CLASSES) == 2


def test_every_heatmap_is_drawn_with_the_normalisation_its_sidecar_names(run, monkeypatch):
    """The picture and its sidecar come from one normalisation: the mode the figure scaled the
    maps with is the one the sidecar records, for every heatmap method (saliency said ``maxabs``
    while its PNG was min-max scaled)."""
    import cnnvis.plots.heatmaps as heatmaps

    used: list[str] = []
    real = heatmaps.normalize_maps

    def spy(maps, mode="minmax", **options):
        used.append(mode)
        return real(maps, mode, **options)

    monkeypatch.setattr(heatmaps, "normalize_maps", spy)
    names = [name for name, spec in METHODS.items() if spec.kind == "heatmap"]
    loaded = load_run(run)
    result = Visualizer(loaded, dataset_images(loaded, "test", 2), run / "out").run_methods(names)
    heatmap_files = [w for w in result.written if w.path.stem != "predicted-class"]
    assert sorted({w.method for w in heatmap_files}) == sorted(names)
    assert len(used) == len(heatmap_files)
    for mode, written in zip(used, heatmap_files):
        recorded = sidecar(written.path)["normalization"]
        assert recorded == mode == METHODS[written.method].normalize, written.method


def test_heatmap_sidecars_say_which_maps_are_flat(run):
    invoke(run, "-m", "gradcam", "-n", "3", "--no-tensorboard")
    (sidecar,) = (run / "visualizations" / "gradcam").glob("*.json")
    written = json.loads(sidecar.read_text())
    assert len(written["flat_maps"]) == 3 and all(isinstance(f, bool) for f in written["flat_maps"])
    assert written["flat_spread"] == 0.05


def test_occlusion_class_picture_has_a_key_of_the_classes_it_paints(run):
    invoke(run, "-m", "occlusion", "-n", "4", "--no-tensorboard")
    written = json.loads((run / "visualizations" / "occlusion" / "predicted-class.json").read_text())
    grids, changed = written["predicted_per_window"], written["prediction_changed_per_window"]
    painted = set()
    for grid, flags, unoccluded in zip(grids, changed, written["predicted"]):
        for row, flag_row in zip(grid, flags):
            for name, flag in zip(row, flag_row):
                assert flag == (name != unoccluded)  # marked exactly where covering changes the prediction
                painted |= {name} if flag else set()
    assert sorted(painted) == sorted(written["legend"])  # the key names every painted class, and only those


def test_occlusion_class_figure_key_is_drawn_under_the_grid():
    from cnnvis import plots

    predicted = torch.tensor([[[0, 0], [0, 2]], [[1, 1], [1, 1]]])
    unoccluded = torch.tensor([0, 1])
    assert plots.changed_classes(predicted, unoccluded) == [2]
    with_key = plots.occlusion_classes_figure(torch.rand(2, 3, 16, 16), predicted, unoccluded, ["a", "b", "c"],
                                              ["x", "y"], "t")
    assert with_key.height > plots.image_grid_figure(torch.rand(2, 3, 16, 16), ["x\ny", "x\ny"], "t", columns=4).height


def test_occlusion_note_under_one_narrow_image_is_wrapped_inside_the_picture():
    from cnnvis import plots
    from cnnvis.plots.base import MARGIN, SMALL_PT, text_width_in, wrap
    from cnnvis.plots.occlusion import UNCHANGED_NOTE

    figure = plots.occlusion_classes_figure(torch.rand(1, 3, 16, 16), torch.zeros(1, 2, 2, dtype=torch.long),
                                            torch.zeros(1, dtype=torch.long), ["a"], ["x"], "t")
    width_in = figure.width / 100  # dpi 100
    assert text_width_in(UNCHANGED_NOTE, SMALL_PT) > width_in - 2 * MARGIN  # the note is wider than the picture
    lines = wrap(UNCHANGED_NOTE, width_in - 2 * MARGIN, SMALL_PT)
    assert len(lines) > 1 and all(text_width_in(line, SMALL_PT) <= width_in - 2 * MARGIN for line in lines)
    bare = plots.image_grid_figure(torch.rand(1, 3, 16, 16), ["x\nno window changes the prediction"], "t", columns=4)
    assert figure.height >= bare.height + len(lines) * SMALL_PT * 1.2 * 100 / 72 - 2  # room for every line


def test_progress_per_method_reaches_one_and_grows(run):
    from cnnvis.commands.visualize import visualize_command

    seen: dict[str, list[float]] = {}
    visualize_command(run, methods=["occlusion", "saliency"], images=2, on_progress=lambda m, f: seen.setdefault(m, []).append(f))
    assert list(seen) == ["occlusion", "saliency"]
    for fractions in seen.values():
        assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len(seen["occlusion"]) > 2  # occlusion reports its batches of windows on the way


def test_notes_and_dropped_files_are_known_before_the_first_method_runs(run, tmp_path):
    from cnnvis.commands.visualize import visualize_command

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(folder / "a.png")
    (folder / "broken.jpg").write_bytes(b"not a picture")
    events: list[str] = []
    result = visualize_command(run, methods=["saliency"], files=[folder], crop=False,
                               on_ready=lambda ready: events.append(f"ready {len(ready.notes)} {len(ready.skipped_images)}"),
                               on_progress=lambda method, fraction: events.append(method))
    assert events[0] == f"ready {len(result.notes)} 1" and events[1:] and set(events[1:]) == {"saliency"}
    assert any("--no-crop" in note for note in result.notes)
    assert [Path(path).name for path, _ in result.skipped_images] == ["broken.jpg"]


def test_ctrl_c_keeps_the_finished_methods_and_names_the_rest(run, monkeypatch):
    import cnnvis.commands.visualize as visualize_module

    real = visualize_module.run_method

    def interrupted_at_gradcam(name, *args, **kwargs):
        if name == "gradcam":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(visualize_module, "run_method", interrupted_at_gradcam)
    result = visualize_module.visualize_command(run, methods=["saliency", "gradcam", "filters"], images=2)
    assert [w.method for w in result.written] == ["saliency"] and result.written[0].path.is_file()
    assert result.interrupted == "gradcam" and result.not_run == ["filters"]
    out = invoke(run, "-m", "saliency", "-m", "gradcam", "-m", "filters", "-n", "2", "--no-tensorboard", code=130)
    assert "interrupted during gradcam" in out and "not drawn: gradcam, filters" in out and "saliency.png" in out


def test_param_reaches_every_method_that_takes_it_and_nothing_else(run, tmp_path):
    out = tmp_path / "params"
    invoke(run, "--images", "2", "--no-tensorboard", "--out", out, "-m", "gradcam", "-m", "layercam", "-m", "vargrad",
           "-m", "saliency", "-p", "aug_smooth=true", "-p", "over=guided-backprop", "-p", "samples=3")
    for method in ("gradcam", "layercam"):  # every CAM method takes aug_smooth; the YAML value is a bool
        assert sidecar(next((out / method).glob("*.png")))["parameters"]["aug_smooth"] is True
    tunnel = sidecar(out / "vargrad" / "vargrad.png")["parameters"]
    assert tunnel["over"] == "guided-backprop" and tunnel["samples"] == 3
    assert "aug_smooth" not in sidecar(out / "saliency" / "saliency.png")["parameters"]
    text = invoke(run, "--images", "2", "--no-tensorboard", "--out", out, "-m", "saliency", "-p", "aug_smooth=1", code=2)
    assert "parameter 'aug_smooth' applies to none of the methods drawn (saliency); it is a parameter of cam" in text
    assert "expected key=value, e.g. --param aug_smooth=true" in invoke(run, "-m", "saliency", "-p", "samples", code=2)


def test_param_values_must_fit_the_method_and_are_stored_as_its_type(run, tmp_path):
    out = tmp_path / "typed"
    text = invoke(run, "-m", "gradcam", "-m", "layercam", "-p", "aug_smooth=maybe", "--out", out, code=2)
    assert "error: --param aug_smooth=maybe: gradcam, layercam take true or false (1 or 0 work too), " \
           "e.g. aug_smooth=true" in text
    assert "e.g. relu=false" in invoke(run, "-m", "gradcam", "-p", "relu=maybe", "--out", out, code=2)
    text = invoke(run, "-m", "vargrad", "-p", "over=guided", "--out", out, code=2)
    assert "--param over=guided: vargrad takes one of saliency" in text and "(did you mean guided-backprop?)" in text
    assert "--param samples=many: vargrad takes a whole number, e.g. samples=25" in invoke(
        run, "-m", "vargrad", "-p", "samples=many", "--out", out, code=2)
    assert not out.exists(), "a bad value must fail before anything is drawn"
    invoke(run, "-m", "gradcam", "-p", "aug_smooth=0", "-p", "relu=1", "--images", "2", "--no-tensorboard", "--out", out)
    parameters = sidecar(next((out / "gradcam").glob("*.png")))["parameters"]
    assert parameters["aug_smooth"] is False and parameters["relu"] is True  # stored as the bools they mean
