"""What the commands print fits the terminal: at 80 and 120 columns no line is cut or too long.

Lines that hold a path may run longer on purpose (paths stay whole, copyable); everything else
must fit, and nothing may end in rich's ellipsis (a cell cut short).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from torchvision.models import VisionTransformer
from typer.testing import CliRunner

import cnnvis.cli as cli_module
import cnnvis.console as console_module
from cnnvis.cli import app
from cnnvis.commands.summary import summarize
from cnnvis.views import layer_table

REPO = Path(__file__).resolve().parents[2]


def run_at(width: int, monkeypatch: pytest.MonkeyPatch, *args: object) -> str:
    for module in (cli_module, console_module):
        monkeypatch.setattr(module, "console", Console(width=width))
        monkeypatch.setattr(module, "err_console", Console(width=width, stderr=True))
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output


def assert_fits(output: str, width: int, paths: tuple[str, ...] = ()) -> None:
    for line in output.splitlines():
        if any(p in line for p in paths):
            continue
        assert len(line) <= width, f"{len(line)} > {width}: {line!r}"
        assert "…" not in line, f"cut: {line!r}"


@pytest.mark.parametrize("width", [80, 120])
def test_summary_of_the_shipped_configs_fits(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for config in ("configs/flowers5.yaml", "configs/mnist.yaml"):
        out = run_at(width, monkeypatch, "summary", REPO / config)
        assert_fits(out, width, paths=(str(REPO),))
        assert "layer4" in out or "features.13" in out


@pytest.mark.parametrize("width", [80, 120])
def test_train_visualize_and_evaluate_fit(width: int, monkeypatch: pytest.MonkeyPatch, run_copy: Path,
                                          tmp_path: Path, config: Path) -> None:
    paths = (str(tmp_path), str(run_copy))
    trained = run_at(width, monkeypatch, "train", config, "--runs-dir", tmp_path / "runs", "--set", "train.epochs=2")
    assert_fits(trained, width, paths)
    assert "epoch 2/2" in trained and "peak lr" in trained
    shown = run_at(width, monkeypatch, "visualize", run_copy, "-n", "2", "--no-tensorboard")  # every method
    assert_fits(shown, width, paths)
    assert "integrated-gradients.png" in shown and "predicted-class.png" in shown  # file names whole
    evaluated = run_at(width, monkeypatch, "evaluate", run_copy, "--no-tensorboard")
    assert_fits(evaluated, width, paths)
    assert "accuracy" in evaluated
    # the trust table's ten columns, with the longest method name
    ranked = run_at(width, monkeypatch, "evaluate", run_copy, "--no-tensorboard", "--explanations", "-n", "2",
                    "--subset-images", "1", "--steps", "4", "-m", "integrated-gradients", "-m", "gradcam")
    assert_fits(ranked, width, paths)
    assert "integrated-gradients" in ranked and "random order" in ranked


def test_help_fits_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    for command in ([], ["train"], ["visualize"], ["evaluate"], ["summary"], ["report"]):
        out = run_at(80, monkeypatch, *command, "--help")
        assert_fits(out, 80)
        assert "<bool>" not in out  # flags are shown as flags


@pytest.mark.parametrize("width", [80, 120])
def test_summary_of_a_cnn_and_a_vit_keeps_names_shapes_and_mult_adds(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_at(width, monkeypatch, "summary", "torchvision:resnet18", "--weights", "none")
    assert_fits(out, width)
    header = next(line for line in out.splitlines() if "layer (--layer)" in line)
    assert all(column in header for column in ("type", "output", "params", "mult-adds"))
    assert " layer4.0.downsample.0 " in out and "1.8G mult-adds per image" in out
    # ViT-B/16's names (encoder.layers.encoder_layer_11.self_attention) on a model small enough to test
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=5)
    result = summarize(vit, (1, 3, 32, 32))
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(layer_table(result, "vit", width=width))
    out = console.export_text()
    assert_fits(out, width)
    header = next(line for line in out.splitlines() if "layer (--layer)" in line)
    assert all(column in header for column in ("output", "params", "mult-adds"))
    assert ("type" in header) == (width == 120)
    names = {line.split()[0] for line in out.splitlines()[3:] if line.startswith(" ")}
    assert set(result.names) <= names  # every usable name whole, on its own line
    row = next(line for line in out.splitlines() if " encoder.layers.encoder_layer_11.self_attention " in line)
    assert "(tuple)" in row and "(tuple): no single tensor out, so not usable as --layer" in " ".join(out.split())
    assert "not listed: 12 module(s) that did not run in this forward pass" in " ".join(out.split())
    assert "encoder.layers.encoder_layer_11.self_attention.out_proj" not in names  # never ran
