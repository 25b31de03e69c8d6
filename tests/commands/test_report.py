"""``cnnvis report``: one self-contained HTML page per run, checked statically and in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import single_thread
from evaluation_helpers import CLASSES, train_tiny_run
from PIL import Image
from typer.testing import CliRunner

from cnnvis.cli import app
from cnnvis.commands.evaluate import evaluate_command
from cnnvis.commands.visualize import Visualizer, dataset_images
from cnnvis.run import load_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: a second thread only adds overhead


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with everything the report shows: evaluation, faithfulness table, two methods' pictures."""
    with single_thread():
        run_dir = train_tiny_run(tmp_path_factory.mktemp("report"))
        run = load_run(run_dir)
        evaluate_command(run, explanations=True, images=4, steps=4, methods=["gradcam", "saliency", "guided-backprop"])
        Visualizer(run, dataset_images(run, "test", 4), run_dir / "visualizations").run_methods(["gradcam", "filters"])
    return run_dir


def report(*args: object, code: int = 0) -> CliRunner:
    result = CliRunner().invoke(app, ["report", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    return result


class _Resources(HTMLParser):
    """Every tag name, every src/href and the text of style attributes and elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action"):
                self.links.append((tag, name, value or ""))
            if name == "style":
                self.style += value or ""

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data


def test_report_is_one_self_contained_page(full_run):
    result = report(full_run)
    path = full_run / "report.html"
    assert f"report: {path}" in " ".join(result.output.split())
    html = path.read_text(encoding="utf-8")
    page = _Resources()
    page.feed(html)
    # nothing that could load from elsewhere: no script, style sheet, frame or font; images inline; links in-page
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    assert "url(" not in page.style and "@import" not in page.style
    images = [value for tag, name, value in page.links if name == "src"]
    assert images and all(value.startswith("data:image/png;base64,") for value in images)
    assert all(value.startswith("#") for tag, name, value in page.links if name == "href")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)
    # the training curves, confusion matrix, wrong images, faithfulness curves, 1 Grad-CAM and 2 filter pictures
    assert len(images) == 7
    for text in ("Training curves", "Per class", "Confusion matrix", "Most confidently wrong", "Which map can I trust?",
                 "guided-backprop", "random order", "layer activations weighted by pooled gradients", "features.0.png",
                 "arch: mnist_cnn", *CLASSES):
        assert text in html, text
    faith = json.loads((full_run / "evaluation" / "faithfulness.json").read_text())
    assert html.count('class="badge pass"') == sum(m["randomization_check"] == "pass" for m in faith["methods"])
    # ROAD and max-sensitivity: each method's numbers, and what they mean
    for text in ("ROAD", "Max-sensitivity", "MoRF", "LeRF", "higher is better", "lower is better", "20%, 50%, 80%"):
        assert text in html, text
    for m in faith["methods"]:
        assert f'{m["road"]:.3f}' in html and f'{m["max_sensitivity"]:.2f}' in html
    # what a user asks first comes first: curves, heatmaps, the trust table, the evaluation; then,
    # folded, what was learned (filters ...)
    order = [html.index(marker) for marker in ('id="training"', 'id="method-gradcam"', 'id="faithfulness"',
                                               'id="evaluation"', "<details>", 'id="method-filters"')]
    assert order == sorted(order)
    assert html.count('class="zoom"') == 3  # every gallery picture is a thumbnail that opens full size


def test_report_of_a_fresh_run_says_which_commands_fill_it(tmp_path):
    run_dir = train_tiny_run(tmp_path, epochs=1)
    result = report(run_dir, "--out", tmp_path / "page.html")
    html = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert "Not evaluated yet" in html and f"cnnvis evaluate {run_dir} --explanations" in html
    assert "No pictures yet" in html
    assert not (run_dir / "report.html").exists()
    assert "cnnvis visualize" in result.output
    assert "not a cnnvis run" in report(tmp_path, code=2).output


def _open_in_chromium(html: Path, out: Path) -> tuple[list[str], list[str], Path]:
    """Load ``html`` from disk in headless Chromium: (console messages, page requests, screenshot).

    The console comes from Chromium's own log (``--enable-logging=stderr``: one ``CONSOLE`` line
    per message). Requests come from its network log: the page's own have an initiator (``null``
    for a file:// page), the browser's background traffic has ``not an origin``. Host names
    resolve to nothing, so no request leaves the machine either way.
    """
    screenshot, netlog = out / "screenshot.png", out / "netlog.json"
    command = [
        CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", f"--screenshot={screenshot}",
        "--window-size=1280,2000", "--hide-scrollbars", "--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--no-default-browser-check", f"--user-data-dir={out / 'profile'}", html.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    log = done.stdout + done.stderr
    assert screenshot.is_file(), log[-3000:]
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    events = json.loads(netlog.read_text())
    start_job = events["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [
        e["params"]["url"] for e in events["events"]
        if e["type"] == start_job and e.get("params", {}).get("initiator", "not an origin") != "not an origin"
        and not e["params"].get("url", "").startswith(("file:", "data:"))
    ]
    return console, requests, screenshot


@needs_chromium
def test_chromium_harness_sees_console_messages_and_requests(tmp_path):
    """The check below is only worth something if it can fail: a page that logs and loads does."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><p>x</p><img src="https://example.com/a.png">'
                    '<script>console.error("boom")</script>', encoding="utf-8")
    console, requests, _ = _open_in_chromium(page, tmp_path)
    assert any("boom" in line for line in console), console
    assert "https://example.com/a.png" in requests, requests


@needs_chromium
def test_report_in_headless_chromium(full_run, tmp_path):
    report(full_run)
    console, requests, screenshot = _open_in_chromium(full_run / "report.html", tmp_path)
    assert console == [], console
    assert requests == [], requests
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        pixels = np.asarray(image.convert("RGB"))
    # a drawn page, not a blank or error page: many colours, and the header's grey band on top
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    assert (pixels[5, 640] == [246, 248, 250]).all()
    print(f"screenshot: {screenshot}")


def test_a_metrics_line_cut_by_a_kill_is_skipped_and_said_once(full_run, tmp_path):
    """A SIGKILL while training appended to metrics.jsonl leaves half a line: the report reads the
    rest with the same tolerant reader as training and says so once, instead of a JSONDecodeError."""
    run = Path(shutil.copytree(full_run, tmp_path / full_run.name))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines if "test_accuracy" not in line]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 99, "train_loss": 0.1')  # no newline: cut
    result = report(run)
    notes = [line for line in result.stderr.splitlines() if "unreadable line" in line]
    assert len(notes) == 1 and "metrics.jsonl" in notes[0], result.stderr
    html = (run / "report.html").read_text()
    assert "Training curves" in html and "No finished epoch yet" not in html
    assert f"{epochs[-1]['epoch']}" in html
