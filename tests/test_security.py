"""Nothing cnnvis loads can run code: weights-only torch.load, safe YAML, no eval/exec/pickle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_helpers import PACKAGE


def _package_sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")}


def _calls(source: str, name: str) -> list[str]:
    """The full text of every call ``name(...)`` (balanced parentheses, over several lines)."""
    found = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        found.append(source[match.start() : i])
    return found


def test_every_torch_load_is_weights_only():
    loads = {path: _calls(text, "torch.load") for path, text in _package_sources().items()}
    assert any(loads.values()), "the scan found no torch.load at all: is it looking at the package?"
    for path, calls in loads.items():
        for call in calls:
            assert re.search(r"weights_only\s*=\s*True", call), f"{path}: {call}"


@pytest.mark.parametrize(
    "pattern",
    [r"(?<![\w.])yaml\.(load|unsafe_load|full_load|load_all)\(", r"yaml\.(Unsafe|Full)?Loader\b",
     r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"\bpickle\.loads?\(", r"\bos\.system\(", r"\bos\.popen\(",
     r"shell\s*=\s*True", r"MAX_IMAGE_PIXELS\s*="],
)
def test_no_unsafe_loading_or_code_execution(pattern):
    hits = [f"{path.relative_to(PACKAGE.parent)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0)}"
            for path, text in _package_sources().items() for m in re.finditer(pattern, text)]
    assert not hits, hits


def test_yaml_is_read_with_safe_load_only():
    sources = _package_sources()
    assert any("yaml.safe_load(" in text for text in sources.values())
