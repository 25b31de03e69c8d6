"""What the commands print fits the terminal: at 80 and 120 columns no line is cut or too long.

Lines that hold a path may run longer on purpose (paths stay whole, copyable); everything else
must fit, and nothing may end in rich's ellipsis (a cell cut short).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import cnnvis.cli as cli_module
import cnnvis.console as console_module
from cnnvis.cli import app

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
