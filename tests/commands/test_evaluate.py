"""``cnnvis evaluate``: metrics, confusion matrix and confidently wrong images in the run; with
``--explanations`` the ranked faithfulness table as JSON and CSV."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import single_thread
from evaluation_helpers import CLASSES, train_tiny_run
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from cnnvis.catalog import SLOW_METHODS
from cnnvis.cli import app
from cnnvis.commands.evaluate import evaluate_run
from cnnvis.metrics.classification import class_metrics, confusion_matrix
from cnnvis.metrics.faithfulness import heatmap_methods
from cnnvis.run import load_run, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: a second thread only adds overhead


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with single_thread():
        return train_tiny_run(tmp_path_factory.mktemp("evaluate"))


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / trained.name))


def invoke(*args: object, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    return result.output


def test_per_class_metrics_of_a_known_confusion_matrix():
    # rows: true, columns: predicted
    matrix = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    a, b, c = class_metrics(matrix, ["a", "b", "c"])
    assert (a.support, a.predicted, b.support, b.predicted) == (6, 7, 4, 3)
    assert a.precision == pytest.approx(5 / 7) and a.recall == pytest.approx(5 / 6)
    assert a.f1 == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
    assert a.accuracy == pytest.approx(7 / 10)  # one-vs-rest: 5 TP + 2 TN of 10
    assert b.precision == pytest.approx(2 / 3) and b.recall == pytest.approx(0.5)
    assert math.isnan(c.precision) and math.isnan(c.recall) and c.accuracy == 1.0  # never seen, never predicted
    assert torch.equal(confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3),
                       torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 0]]))


def test_evaluation_agrees_with_training_and_sorts_the_mistakes(trained):
    loaded = load_run(trained)
    ev = evaluate_run(loaded, wrong=5)
    final = read_metrics(trained).rows[-1]
    assert ev.accuracy == pytest.approx(final["test_accuracy"]) and ev.loss == pytest.approx(final["test_loss"], rel=1e-4)
    assert int(ev.confusion.sum()) == ev.count == 12 and int(ev.confusion.trace()) == round(ev.accuracy * ev.count)
    assert 0 < ev.wrong_count == len(ev.confidently_wrong) <= 5
    probabilities = [w.probability for w in ev.confidently_wrong]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(w.true != w.predicted for w in ev.confidently_wrong)
    assert ev.wrong_images.shape == (ev.wrong_count, 3, 20, 20)


def test_evaluate_explanations_writes_json_csv_png_and_tensorboard(run):
    out = invoke(run, "--explanations", "--images", "6", "--steps", "8", "--subset-images", "3", "--sensitivity-samples", "2")
    folder = run / "evaluation"
    assert {p.name for p in folder.iterdir()} >= {
        "metrics.json", "per_class.csv", "confusion_matrix.png", "confusion_matrix.json",
        "confidently_wrong.png", "confidently_wrong.json", "faithfulness.json", "faithfulness.csv", "faithfulness_curves.png",
    }
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["images"] == 12 and metrics["class_names"] == CLASSES and metrics["checkpoint"].endswith("best.pt")
    assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == 12
    with (folder / "per_class.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == CLASSES and sum(int(r["support"]) for r in rows) == 12
    for png in ("confusion_matrix.png", "confidently_wrong.png", "faithfulness_curves.png"):
        with Image.open(folder / png) as image:
            assert image.format == "PNG" and min(image.size) > 150

    faith = json.loads((folder / "faithfulness.json").read_text())
    methods = [m["method"] for m in faith["methods"]]
    # every heatmap method of the registry, ranked, but the slow ones visualize also leaves out by default
    assert sorted(methods) == sorted(m for m in heatmap_methods() if m not in SLOW_METHODS) and SLOW_METHODS
    assert [m["rank"] for m in faith["methods"]] == list(range(1, len(methods) + 1))
    checks = [m["randomization_check"] for m in faith["methods"]]
    assert checks == sorted(checks, key=lambda c: c != "pass"), "passing methods rank first"
    assert faith["parameters"]["images"] == 6 and len(faith["images_used"]) == 6
    assert all(len(m["deletion_curve"]) == 9 and len(m["cascade"]) == 3 for m in faith["methods"])
    with (folder / "faithfulness.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["method"] for r in table] == methods
    assert {r["randomization_check"] for r in table} <= {"pass", "fail"}
    # ROAD and max-sensitivity for every method, on the subset asked for
    assert faith["parameters"]["subset_images"] == 3 and faith["parameters"]["sensitivity_samples"] == 2
    for m, r in zip(faith["methods"], table):
        assert 0 <= m["road_morf"] <= 1 and 0 <= m["road_lerf"] <= 1 and m["max_sensitivity"] >= 0
        assert m["road"] == pytest.approx((m["road_lerf"] - m["road_morf"]) / 2)
        assert len(m["road_morf_curve"]) == len(faith["parameters"]["road_fractions"]) == 3
        assert float(r["road"]) == pytest.approx(m["road"], abs=1e-5) and float(r["max_sensitivity"]) >= 0

    flat = " ".join(out.split())
    assert "accuracy 91.67% (11/12)" in flat
    for name in CLASSES + ["which map can I trust?", "random order", "gradcam", "integrated-gradients", "ROAD", "sens."]:
        assert name in flat, name
    assert "pass" in flat
    assert f"written to {folder}" in flat

    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {"evaluate/confusion_matrix", "evaluate/confidently_wrong", "evaluate/faithfulness_curves"} <= set(events.Tags()["images"])
    assert "evaluate/accuracy_test" in events.Tags()["scalars"]


def test_evaluate_without_explanations_and_bad_options(run, tmp_path):
    out = invoke(run, "--no-tensorboard", "--out", tmp_path / "ev", "--wrong", "0")
    assert not (tmp_path / "ev" / "faithfulness.json").exists() and not (tmp_path / "ev" / "confidently_wrong.png").exists()
    assert (tmp_path / "ev" / "metrics.json").is_file() and not (run / "evaluation").exists()
    assert "which map" not in out
    bad = invoke(run, "--explanations", "-m", "maximize", code=2)
    assert "not a heatmap method" in bad and "gradcam" in bad
    assert "unknown visualisation method 'nope'; choose one of" in invoke(run, "--explanations", "-m", "nope", code=2)
    assert "unknown visualisation method 'gradcm'; did you mean gradcam" in invoke(run, "--explanations", "-m", "gradcm",
                                                                                  code=2)
    assert "layer" in invoke(run, "--explanations", "--layer", "features.99", code=2)
    assert not (run / "evaluation").exists(), "a bad option must fail before anything is written"
    assert "no such run" in invoke(tmp_path / "missing", code=2)
    assert "subset images" in invoke(run, "--explanations", "--subset-images", "0", code=2)
    assert not (run / "evaluation").exists()


def test_evaluate_embeddings_writes_the_projector_into_the_run(run):
    out = invoke(run, "--embeddings", "--embedding-images", "5", "--no-tensorboard", "--wrong", "0")
    metadata = next(run.glob("*/penultimate/metadata.tsv")).read_text().splitlines()
    assert len(metadata) == 6 and {line.split("\t")[0] for line in metadata[1:]} <= set(CLASSES)
    assert (run / "projector_config.pbtxt").is_file()
    assert "projector: 5 test images" in " ".join(out.split())
