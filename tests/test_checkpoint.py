"""Checkpoints: plain data only, weights_only loading, atomic writes, refusing unsafe files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from cnnvis import checkpoint as ckpt
from cnnvis.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    strip_prefixes,
)
from cnnvis.errors import CheckpointError, TrainingError
from cnnvis.models import build_model

PLAIN = (torch.Tensor, str, int, float, bool, type(None))


def plain_leaves(node, where="payload"):
    """Yield (where, leaf) for every non-container value."""
    if isinstance(node, dict):
        for key, value in node.items():
            assert isinstance(key, (str, int)), f"{where} has a key of type {type(key).__name__}"
            yield from plain_leaves(value, f"{where}[{key!r}]")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from plain_leaves(value, f"{where}[{i}]")
    else:
        yield where, node


def trained_payload() -> dict:
    """A payload as the trainer writes it, after a couple of optimizer and scheduler steps."""
    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=10)
    for _ in range(2):
        loss = model(torch.randn(4, 1, 28, 28)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(),
        "epoch": 1,
        "global_step": 2,
        "rng": {"torch": torch.get_rng_state()},
        "meta": {"class_names": [str(i) for i in range(10)], "mean": [0.1307], "std": [0.3081]},
    }


def test_round_trip_with_weights_only(tmp_path):
    payload = trained_payload()
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(payload, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # what any user can do
    assert raw["format"] == FORMAT
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and loaded["global_step"] == 2
    assert loaded["meta"]["class_names"] == payload["meta"]["class_names"]
    for key, value in payload["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    model = build_model("mnist_cnn", 10)
    load_model_state(model, loaded["model"], str(path))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"] == payload["optimizer"]["state"][0]["step"]
    assert torch.equal(loaded["rng"]["torch"], payload["rng"]["torch"])


def test_payload_holds_only_tensors_and_plain_types(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(trained_payload(), path)
    leaves = list(plain_leaves(torch.load(path, weights_only=True)))
    assert leaves
    odd = [(where, type(value).__name__) for where, value in leaves if not isinstance(value, PLAIN)]
    assert not odd


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_tolerated(tmp_path, prefix):
    torch.manual_seed(0)
    source = build_model("mnist_cnn", 10)
    path = tmp_path / "wrapped.pt"
    save_checkpoint({"model": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    model = build_model("mnist_cnn", 10)
    load_model_state(model, load_checkpoint(path)["model"], str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_strip_prefixes_keeps_inner_names():
    assert list(strip_prefixes({"module.features.0.weight": 1, "fc.module.x": 2})) == ["features.0.weight", "fc.module.x"]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(trained_payload(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_empty_and_foreign_files_are_refused(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="not a cnnvis checkpoint"):
        load_checkpoint(bare)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class Exploit:
    """Unpickling this would write a file: the marker of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("zipped", [True, False])
def test_pickle_that_needs_code_execution_is_refused(tmp_path, zipped):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "model": {}, "evil": Exploit(marker)}
    if zipped:
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code"


def test_pickle_in_pretrained_weights_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": Exploit(marker)}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        build_model("mnist_cnn", 10, pretrained=str(path))
    assert not marker.exists()


def test_cuda_saved_tensors_load_on_cpu(tmp_path):
    """Simulate a CUDA checkpoint by rewriting the storage location recorded in the archive."""
    import zipfile

    path = tmp_path / "cpu.pt"
    save_checkpoint({"model": {"w": torch.arange(4.0)}}, path)
    cuda_path = tmp_path / "cuda.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cuda_path, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert b"cuda:0" in data
            dst.writestr(item, data)
    if not torch.cuda.is_available():
        with pytest.raises(Exception):
            torch.load(cuda_path, weights_only=True)  # the trap map_location avoids
    loaded = load_checkpoint(cuda_path, map_location="cpu")
    assert loaded["model"]["w"].device.type == "cpu"
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))


def test_atomic_write_keeps_the_previous_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(path.parent) == ["last.pt"], "a temporary file was left behind"


def test_disk_full_is_a_training_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def disk_full(obj, handle, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainingError, match="No space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_write_replaces_through_os_replace(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (calls.append((a, b)), real_replace(a, b)))
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {}}, path)
    assert len(calls) == 1 and Path(calls[0][1]) == path and Path(calls[0][0]).parent == tmp_path
