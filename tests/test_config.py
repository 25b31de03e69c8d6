"""Config parsing, defaults, --set overrides and the error messages a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnvis.config import Config, build_config, load_config, parse_override, save_config
from cnnvis.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(raw: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw, overrides)
    return str(info.value)


# ------------------------------------------------------------------ defaults and overrides


def test_partial_config_gets_defaults(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 0.01\ntrain:\n  epochs: 2\n")
    config = load_config(path)
    assert config.optimizer.lr == 0.01
    assert config.train.epochs == 2
    # everything else is the documented default
    assert config.optimizer.name == "adamw"
    assert config.data.dataset == "mnist"
    assert config.data.val_size == 5000
    assert config.data.batch_size == 128
    assert config.model.arch == "mnist_cnn"
    assert config.model.freeze == "none"
    assert config.scheduler.name == "onecycle"
    assert config.log.tensorboard is True


def test_defaults_are_not_shared_between_configs():
    first, second = Config(), Config()
    first.data.batch_size = 7
    assert second.data.batch_size == 128


def test_set_overrides_with_types(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 8\n")
    config = load_config(path, ["train.epochs=3", "optimizer.lr=0.05", "data.transforms.flip=true", "name=quick"])
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.optimizer.lr == 0.05 and isinstance(config.optimizer.lr, float)
    assert config.data.transforms.flip is True
    assert config.name == "quick"


def test_set_later_override_wins():
    config = build_config({}, ["train.epochs=3", "train.epochs=4"])
    assert config.train.epochs == 4


def test_set_can_null_an_optional_field():
    config = build_config({"train": {"grad_clip": 1.0}}, ["train.grad_clip=null"])
    assert config.train.grad_clip is None


def test_set_scientific_notation_is_a_float():
    assert build_config({}, ["optimizer.lr=1e-3"]).optimizer.lr == pytest.approx(0.001)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("data.path=my folder/x") == ("data.path", "my folder/x")
    assert parse_override("model.pretrained=null") == ("model.pretrained", None)


def test_set_without_equals_shows_the_form():
    message = error_of({}, ["train.epochs"])
    assert "key.path=value" in message


def test_set_wrong_type_names_field_and_value():
    message = error_of({}, ["train.epochs=many"])
    assert "train.epochs" in message and "'many'" in message and "integer" in message


def test_set_fractional_epochs_is_an_error():
    message = error_of({}, ["train.epochs=2.5"])
    assert "train.epochs" in message and "2.5" in message


def test_set_unknown_key_suggests_the_closest():
    message = error_of({}, ["optimzer.lr=0.1"])
    assert "'optimzer'" in message and "did you mean 'optimizer'" in message


def test_set_unknown_nested_key_suggests_the_closest():
    message = error_of({}, ["data.transforms.rotaton=10"])
    assert "'rotaton'" in message and "did you mean 'rotation'" in message


def test_set_into_a_value_is_an_error():
    message = error_of({}, ["optimizer.lr.max=1"])
    assert "optimizer.lr" in message and "not a section" in message


# ------------------------------------------------------------------ validation errors


@pytest.mark.parametrize(
    "raw, key, suggestion",
    [
        ({"optimzer": {"lr": 0.1}}, "optimzer", "optimizer"),
        ({"optimizer": {"lrr": 0.1}}, "optimizer.lrr", "lr"),
        ({"data": {"transforms": {"imgsize": 32}}}, "data.transforms.imgsize", "image_size"),
    ],
)
def test_unknown_key_at_any_depth_is_named_with_a_suggestion(raw, key, suggestion):
    message = error_of(raw)
    assert repr(key) in message
    assert f"did you mean {suggestion!r}" in message


def test_wrong_type_in_yaml(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "data.batch_size" in message and "'lots'" in message


@pytest.mark.parametrize(
    "override, field, value, bound",
    [
        ("train.epochs=0", "train.epochs", "0", "greater than or equal to 1"),
        ("optimizer.lr=-0.1", "optimizer.lr", "-0.1", "greater than 0"),
        ("optimizer.momentum=1.5", "optimizer.momentum", "1.5", "less than 1"),
        ("data.transforms.rotation=270", "data.transforms.rotation", "270", "less than or equal to 180"),
    ],
)
def test_out_of_range(override, field, value, bound):
    message = error_of({}, [override])
    assert field in message and value in message and bound in message


@pytest.mark.parametrize(
    "override, field, valid",
    [
        ("model.arch=resnet19", "model.arch", ["mnist_cnn", "mnist_classic", "resnet18", "resnet152"]),
        ("data.dataset=cifar10", "data.dataset", ["mnist", "flowers102", "imagefolder"]),
        ("optimizer.name=rmsprop", "optimizer.name", ["sgd", "adam", "adamw", "adadelta"]),
        ("scheduler.name=linear", "scheduler.name", ["onecycle", "cosine", "step", "none"]),
    ],
)
def test_unknown_choice_lists_valid_names(override, field, valid):
    message = error_of({}, [override])
    bad = override.split("=")[1]
    assert f"{field} = {bad!r}" in message
    for name in valid:
        assert name in message


def test_unknown_arch_suggests_the_closest():
    assert "did you mean 'resnet18'" in error_of({"model": {"arch": "resnet19"}})


def test_num_workers_error_is_one_clear_message():
    message = error_of({}, ["data.num_workers=many"])
    assert message.count("data.num_workers") == 1
    assert "'many'" in message and "auto" in message
    assert build_config({}, ["data.num_workers=auto"]).data.num_workers == "auto"
    assert build_config({}, ["data.num_workers=2"]).data.num_workers == 2


def test_bad_run_name():
    assert "name" in error_of({"name": "my run/1"})


def test_several_errors_are_all_reported():
    message = error_of({"train": {"epochs": 0}, "optimizer": {"lr": 0}})
    assert "train.epochs" in message and "optimizer.lr" in message


# ------------------------------------------------------------------ files


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  lr: [0.1, 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "not valid YAML" in message
    assert "line " in message and "column " in message


def test_yaml_tab_indentation_error_points_at_the_tab(tmp_path):
    path = write(tmp_path, "train:\n\tepochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 2, column 1" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, text))


def test_top_level_list(tmp_path):
    with pytest.raises(ConfigError, match="mapping.*not a list"):
        load_config(write(tmp_path, "- train\n- data\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_binary_file(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x80\x81\xfe\xff" * 10)
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    config = build_config(
        {"name": "rt", "data": {"dataset": "imagefolder", "path": "flowers5", "transforms": {"flip": True}}},
        ["optimizer.lr=0.05", "train.grad_clip=1.5", "data.num_workers=auto"],
    )
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    save_config(config, path)
    assert load_config(path) == config
    # and it is complete: every section is spelled out
    text = path.read_text()
    for section in ("data:", "model:", "optimizer:", "scheduler:", "train:", "log:", "transforms:"):
        assert section in text


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    config = load_config(REPO / "configs" / name)
    assert config.name


def test_a_relative_root_in_a_config_file_is_relative_to_the_file_not_the_current_directory(tmp_path, monkeypatch):
    from cnnvis.config import data_root, load_config

    (tmp_path / "project" / "configs").mkdir(parents=True)
    config = tmp_path / "project" / "configs" / "digits.yaml"
    config.write_text("data:\n  root: ../../datasets\n")
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("CNNVIS_DATA", raising=False)
    loaded = load_config(config)
    assert data_root(loaded.data) == tmp_path / "datasets" and data_root(loaded.data).is_absolute()
    # typed where the user stands: relative to the current directory
    assert load_config(config, ["data.root=here"]).data.root == str(elsewhere / "here")
    monkeypatch.setenv("CNNVIS_DATA", "env-data")
    assert load_config(config).data.root == str(elsewhere / "env-data")


def test_the_shipped_configs_find_the_shared_data_from_any_directory(tmp_path, monkeypatch):
    from pathlib import Path

    from cnnvis.config import data_root, load_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("CNNVIS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("mnist.yaml", "flowers5.yaml"):
        assert data_root(load_config(repo / "configs" / name).data) == repo.parent / "shared" / "data"
