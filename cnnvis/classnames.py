"""Class names: reading them from a file (``--classes``) and finding a class by name (``--target``,
class folders).

ImageNet class names carry aliases separated by commas (``"tench, Tinca tinca"``); a name matches
the whole entry or any alias, case-insensitively, with ``_`` read as a space (folder names).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cnnvis.errors import ConfigError, nearest_names


def read_class_names(path: str | Path) -> list[str]:
    """One name a line (blank lines ignored), a JSON list, or a JSON ``{index: name}`` object
    whose indices are exactly 0..N-1."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read the class names file {path}: {exc.strerror or exc}") from None
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})",
                              "Write a JSON list of names, an {index: name} object, or one name a line.") from None
        if isinstance(data, dict):
            try:
                indexed = {int(k): str(v) for k, v in data.items()}
            except ValueError:
                raise ConfigError(f"{path}: the keys of a class-name object must be class indices (0, 1, ...)") from None
            if sorted(indexed) != list(range(len(indexed))):
                raise ConfigError(f"{path}: the indices must be 0..{len(indexed) - 1} with none missing")
            names = [indexed[i] for i in range(len(indexed))]
        elif isinstance(data, list):
            names = [str(v) for v in data]
        else:
            raise ConfigError(f"{path}: holds a JSON {type(data).__name__}, not a list or an object of class names")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"{path} holds no class names")
    return names


def _key(text: str) -> str:
    return " ".join(text.replace("_", " ").lower().split())


def _aliases(name: str) -> list[str]:
    return [_key(part) for part in name.split(",") if part.strip()]


def numbered(names: Sequence[str]) -> bool:
    """Whether the class names are just their indices (``"0", "1", ...``): the model names none."""
    return all(name == str(i) for i, name in enumerate(names))


def match_class(text: str, names: Sequence[str], what: str = "target") -> int:
    """The index of the class ``text`` names: the whole name or one of its comma-separated aliases,
    case-insensitively. Unknown or ambiguous names are a ``ConfigError`` listing the nearest names."""
    key = _key(text)
    exact = [i for i, name in enumerate(names) if _key(name) == key]
    hits = exact or [i for i, name in enumerate(names) if key in _aliases(name)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        shown = ", ".join(f"{i} ({names[i]})" for i in hits[:6])
        raise ConfigError(f"{what} {text!r} is ambiguous: classes {shown}", "Give the class index instead.",
                          parameter=what if what == "target" else None)
    keys = {alias: i for i, name in enumerate(names) for alias in [_key(name), *_aliases(name)]}
    close = nearest_names(key, list(keys))
    near = list(dict.fromkeys(names[keys[c]] for c in close))
    if numbered(names):  # nothing to be near: the model's classes have no names
        hint = (f"The model's classes are numbered 0..{len(names) - 1} (no names known): give a class index, "
                "or name them with --classes FILE.")
    elif near:
        hint = f"Nearest: {'; '.join(near)}."
    else:
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        hint = f"Classes: {', '.join(names[:10])}{more}."
    if what == "target":
        raise ConfigError(f"target {text!r}: not pred, true, a class index or a class name", hint, parameter="target")
    raise ConfigError(f"{what} {text!r}: no class of that name", hint)


def parse_target(text: str, class_names: Sequence[str]) -> str | int:
    """``pred``, ``true``, a class index or a class name (case-insensitive, any comma-separated
    alias of an ImageNet name: "golden retriever") -> "pred" / "true" / index."""
    if text in ("pred", "true"):
        return text
    if list(class_names).count(text) == 1:
        return list(class_names).index(text)
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(class_names):
            return index
        raise ConfigError(f"target {text}: class index out of range; the model has {len(class_names)} classes "
                          f"(0..{len(class_names) - 1})", parameter="target")
    return match_class(text, class_names)
