"""Bad config files and overrides get one clear line and exit status 2 (docs/errors.md)."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import cli


def test_config_file_missing(tmp_path):
    out = cli("train", tmp_path / "nope.yaml", code=2)
    assert "config file not found" in out and "nope.yaml" in out


def test_config_not_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: mnist\n    batch_size: 4\n")
    out = cli("train", bad, code=2)
    assert "not valid YAML at line 3, column" in out and "bad.yaml" in out


def test_config_empty(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    out = cli("train", empty, code=2)
    assert "the config is empty" in out


def test_config_top_level_list(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- model\n")
    out = cli("train", listed, code=2)
    assert "top level must be a mapping" in out and "not a list" in out


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("optimzer:\n  lr: 0.1\n", "'optimzer'", "did you mean 'optimizer'?"),
        ("train:\n  epoch: 3\n", "'train.epoch'", "did you mean 'epochs'?"),
        ("data:\n  transforms:\n    imge_size: 28\n", "'data.transforms.imge_size'", "did you mean 'image_size'?"),
    ],
)
def test_unknown_key_at_any_depth_suggests_the_closest(tmp_path, text, key, suggestion):
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    out = cli("train", path, code=2)
    assert f"unknown key {key}" in out and suggestion in out and "valid keys here" in out


def test_wrong_type(tmp_path):
    path = tmp_path / "type.yaml"
    path.write_text("train:\n  epochs: many\n")
    out = cli("train", path, code=2)
    assert "train.epochs = 'many'" in out and "valid integer" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optimizer:\n  lr: -1\n", "optimizer.lr = -1: Input should be greater than 0"),
        ("data:\n  batch_size: 0\n", "data.batch_size = 0: Input should be greater than or equal to 1"),
        ("train:\n  epochs: 0\n", "train.epochs = 0: Input should be greater than or equal to 1"),
    ],
)
def test_out_of_range(tmp_path, text, expected):
    path = tmp_path / "range.yaml"
    path.write_text(text)
    assert expected in cli("train", path, code=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data:\n  dataset: mnst\n", "data.dataset = 'mnst': must be one of 'mnist', 'flowers102', 'imagefolder' (did you mean 'mnist'?)"),
        ("model:\n  arch: resnet19\n", "model.arch = 'resnet19': unknown architecture (did you mean 'resnet18'?); choose one of: mnist_cnn, mnist_classic, resnet_small, resnet18"),
        ("optimizer:\n  name: adamm\n", "optimizer.name = 'adamm': must be one of 'sgd', 'adam', 'adamw', 'adadelta'"),
        ("scheduler:\n  name: cosin\n", "scheduler.name = 'cosin': must be one of 'onecycle', 'cosine', 'step', 'none' (did you mean 'cosine'?)"),
    ],
)
def test_unknown_name_lists_the_valid_names(tmp_path, text, expected):
    path = tmp_path / "names.yaml"
    path.write_text(text)
    assert expected in cli("train", path, code=2)


def test_set_without_equals(config):
    out = cli("train", config, "--set", "train.epochs", code=2)
    assert "--set 'train.epochs': expected key.path=value" in out


def test_set_unknown_path(config):
    out = cli("train", config, "--set", "optimzer.lr=0.1", code=2)
    assert "--set optimzer.lr: unknown key 'optimzer'" in out and "did you mean 'optimizer'?" in out


def test_set_value_of_the_wrong_type(config):
    out = cli("train", config, "--set", "train.epochs=many", code=2)
    assert "train.epochs = 'many' (from --set)" in out and "valid integer" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(config, tmp_path):
    out = cli("train", config, "--device", "cuda", "--runs-dir", tmp_path / "runs", code=2)
    assert "--device cuda: CUDA is not available on this machine. Use the cpu or auto device." in out
    assert not (tmp_path / "runs").exists(), "nothing is created for a command that cannot run"
