"""Bad runs and checkpoints: missing, truncated, foreign, another architecture, unsafe (docs/errors.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, write_config

from cnnvis import checkpoint as ckpt
from cnnvis.run import load_run


def test_resume_of_a_path_that_does_not_exist(tmp_path):
    out = cli("train", "--resume", tmp_path / "runs" / "gone", code=2)
    assert "no such run or checkpoint" in out and "gone" in out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    out = cli("train", "--resume", tmp_path, code=2)
    assert "is not a cnnvis run (no config.yaml or checkpoints/)" in out


def test_resume_of_a_run_without_checkpoint(run_copy):
    for path in (run_copy / "checkpoints").iterdir():
        path.unlink()
    out = cli("train", "--resume", run_copy, code=2)
    assert "has no checkpoint yet: it stopped before training began. Start a new run instead." in out


def test_truncated_checkpoint(run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    out = cli("train", "--resume", run_copy, code=2)
    assert f"{last}: not a readable checkpoint (truncated, or another format" in out
    (run_copy / "checkpoints" / "best.pt").write_bytes(b"")
    out = cli("summary", run_copy, code=2)
    assert "best.pt: not a readable checkpoint (truncated, or another format: the file is empty)" in out


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", os.urandom(4096), b"PK\x03\x04 not really a zip"])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    out = cli("train", "--resume", path, code=2)
    assert f"{path}: not a readable checkpoint" in out


def test_pytorch_file_that_is_not_a_cnnvis_checkpoint(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    out = cli("summary", path, code=2)
    assert "not a cnnvis checkpoint (no model state or format marker)" in out


def test_checkpoint_of_another_architecture(run_copy, tmp_path, config):
    out = cli("train", "--resume", run_copy, "--set", "model.arch=mnist_classic", code=2)
    assert "holds a mnist_cnn model; a resumed run cannot switch to model.arch = mnist_classic" in out
    last = run_copy / "checkpoints" / "last.pt"
    out = cli("train", config, "--set", "model.arch=mnist_classic", "--set", f"model.pretrained={last}",
              "--runs-dir", tmp_path / "runs", code=2)
    assert "was saved from a different architecture" in out


def _as_if_saved_on_cuda(path: Path) -> None:
    """Rewrite the storage locations recorded in the archive from 'cpu' to 'cuda:0', which is
    what a checkpoint written on a GPU holds."""
    import zipfile

    original = path.read_bytes()
    tmp = path.with_suffix(".cuda")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            content = src.read(item)
            if item.filename.endswith("data.pkl"):
                content = content.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert b"cpu" not in content
            dst.writestr(item, content)
    os.replace(tmp, path)
    assert path.read_bytes() != original


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_checkpoint_saved_on_cuda_loads_on_cpu(run_copy):
    for name in ("last.pt", "best.pt"):
        _as_if_saved_on_cuda(run_copy / "checkpoints" / name)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(run_copy / "checkpoints" / "last.pt", weights_only=True)  # the trap map_location avoids
    run = load_run(run_copy)
    assert next(run.model.parameters()).device.type == "cpu"
    out = cli("train", "--resume", run_copy, "--set", "train.epochs=1", code=0)
    assert "test accuracy" in out


def test_checkpoint_that_needs_code_execution_is_refused(tmp_path, images):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": {}, "x": Exploit()}, path)
    out = cli("train", "--resume", path, code=2)
    assert f"{path}: refused to load: it needs" in out and "system" in out and "could run code" in out
    assert "weights_only=True" in out
    config = write_config(tmp_path / "c.yaml", images, model={"pretrained": str(path)})
    out = cli("train", config, "--runs-dir", tmp_path / "runs", code=2)
    assert "refused to load" in out
    assert not marker.exists(), "loading the file ran its code"
