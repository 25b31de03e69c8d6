"""Files the project writes and reads: atomic writes, JSON Lines, JSON, CSV, and JSON-safe values.

Everything is written so that a kill at any moment leaves the old file or the new one, never
half of one; a JSON Lines file, appended to line by line, may end in a line cut by a kill, which
:func:`read_jsonl` skips and reports.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import: os.umask cannot be read without setting it


def temp_file_beside(path: Path) -> tuple[int, str]:
    """An open temporary file in ``path``'s folder with ordinary permissions (``mkstemp`` makes 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~UMASK)
    return fd, tmp


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it into place.

    Raises ``OSError`` as the file system reports it; the temporary file is removed on any failure.
    """
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------- JSON-safe values


def to_jsonable(obj: Any) -> Any:
    """Make metadata JSON-safe: tensors/arrays -> numbers or lists, paths -> str, tuples -> lists,
    dataclasses -> dicts, enums -> values, non-finite floats -> ``None``; anything else -> ``str``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # a torch tensor, without importing torch
        t = obj.detach().cpu()
        return to_jsonable(t.item() if t.ndim == 0 else t.tolist())
    if type(obj).__module__ == "numpy":  # arrays and scalars
        return to_jsonable(obj.tolist() if hasattr(obj, "ndim") and obj.ndim else obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic models
        return to_jsonable(obj.model_dump())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    return str(obj)


def json_text(data: Any, indent: int | None = 2) -> str:
    """Strict JSON (no NaN) of :func:`to_jsonable` ``(data)``, UTF-8 characters kept."""
    return json.dumps(to_jsonable(data), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON, written atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json_text(data) + "\n").encode("utf-8"))
    return path


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV table (header first), written atomically; parent folders are created."""
    path = Path(path)
    buffer = io.StringIO(newline="")
    table = csv.writer(buffer)
    table.writerow(header)
    table.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue().encode("utf-8"))
    return path


def csv_number(value: float) -> str:
    """A table cell: 6 significant digits, empty for a value that could not be measured (NaN, inf)."""
    return f"{value:.6g}" if math.isfinite(value) else ""


def read_json(path: str | Path) -> Any | None:
    """The parsed file, or ``None`` when it does not exist. Raises ``ValueError``/``OSError`` otherwise."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------- JSON Lines


@dataclass
class JsonLines:
    """The records of a JSON Lines file, and the (1-based) numbers of the lines that were not JSON."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)


def read_jsonl(path: str | Path) -> JsonLines:
    """Every JSON object line of ``path`` (none if it does not exist).

    A line that is not a JSON object -- in practice the last line, cut by a kill while it was
    appended -- is skipped and its number kept in ``bad_lines``, so callers can say so once.
    """
    path = Path(path)
    out = JsonLines()
    if not path.is_file():
        return out
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            out.rows.append(record)
        else:
            out.bad_lines.append(number)
    return out


def _jsonl_line(row: Mapping[str, Any]) -> str:
    return json.dumps(to_jsonable(dict(row)), allow_nan=False) + "\n"


def append_jsonl(path: str | Path, row: Mapping[str, Any]) -> None:
    """Add one record as a line (non-finite numbers become ``null``). Raises ``OSError``."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(_jsonl_line(row))


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace the file with these records, atomically. Raises ``OSError``."""
    atomic_write(path, "".join(_jsonl_line(r) for r in rows).encode("utf-8"))
