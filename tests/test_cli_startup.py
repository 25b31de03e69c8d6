"""The CLI answers help and input mistakes without loading torch (the slow part of start-up).

Timing lives in ``benchmarks/cli_startup.py``; this guards the cause: torch stays unimported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROBE = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from cnnvis.cli import app
    result = CliRunner().invoke(app, sys.argv[1:])
    print(json.dumps({"exit": result.exit_code, "torch": "torch" in sys.modules, "output": result.output}))
""")


def _probe(*args: str, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_does_not_import_torch(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, cnnvis.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["visualize", "--help"], ["evaluate", "--help"],
                                  ["summary", "--help"], ["report", "--help"]])
def test_help_answers_without_torch(args: list[str], tmp_path: Path) -> None:
    outcome = _probe(*args, cwd=tmp_path)
    assert outcome["exit"] == 0 and "Usage" in outcome["output"]
    assert not outcome["torch"], f"cnnvis {' '.join(args)} imported torch"


def test_visualize_help_lists_every_method_without_torch(tmp_path: Path) -> None:
    from cnnvis.vis.registry import method_names

    outcome = _probe("visualize", "--help", cwd=tmp_path)
    for name in method_names():
        assert name in outcome["output"]


def test_config_mistakes_are_reported_before_torch_loads(tmp_path: Path) -> None:
    missing = _probe("train", "missing.yaml", cwd=tmp_path)
    assert missing["exit"] == 2 and "config file not found" in missing["output"] and not missing["torch"]
    (tmp_path / "bad.yaml").write_text("model: {arch: resnet_tiny}\n")
    bad = _probe("train", "bad.yaml", cwd=tmp_path)
    assert bad["exit"] == 2 and "unknown architecture" in bad["output"] and not bad["torch"]
