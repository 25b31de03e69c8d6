"""Files: atomic writes, the tolerant JSON Lines reader, JSON and CSV, JSON-safe values."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from cnnvis.io import (
    append_jsonl,
    read_jsonl,
    to_jsonable,
    write_csv,
    write_json,
    write_jsonl,
)


def test_to_jsonable():
    from dataclasses import dataclass

    @dataclass
    class P:
        x: int
        y: tuple

    data = {1: np.float32(0.5), "t": torch.tensor([[1, 2]]), "p": P(1, (2, 3)), "inf": math.inf, "s": {3}}
    assert to_jsonable(data) == {"1": 0.5, "t": [[1, 2]], "p": {"x": 1, "y": [2, 3]}, "inf": None, "s": [3]}


def test_read_jsonl_skips_a_line_cut_by_a_kill_and_says_which(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1, "val_accuracy": 0.5})
    append_jsonl(path, {"epoch": 2, "val_accuracy": float("nan")})
    with open(path, "a") as handle:
        handle.write('{"epoch": 3, "val_acc')  # the kill came mid-line
    found = read_jsonl(path)
    assert [r["epoch"] for r in found.rows] == [1, 2] and found.rows[1]["val_accuracy"] is None
    assert found.bad_lines == [3]
    assert read_jsonl(tmp_path / "absent.jsonl").rows == []


def test_writes_are_atomic_and_readable(tmp_path: Path):
    write_jsonl(tmp_path / "m.jsonl", [{"a": 1}, {"b": math.inf}])
    assert read_jsonl(tmp_path / "m.jsonl").rows == [{"a": 1}, {"b": None}]
    out = write_json(tmp_path / "sub" / "x.json", {"t": torch.tensor([1.5]), "n": np.int64(3)})
    assert json.loads(out.read_text()) == {"t": [1.5], "n": 3}
    table = write_csv(tmp_path / "t.csv", ["k", "v"], [["a", 1], ["b,c", 2]])
    assert table.read_text().splitlines() == ["k,v", "a,1", '"b,c",2']
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary file left behind
