"""Experiment configuration: typos and impossible values fail at once, naming the key."""

from __future__ import annotations

import pytest

from pneumonia.config import (
    ExperimentConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_set_option,
    with_overrides,
)
from pneumonia.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


def test_defaults_load():
    config = load_config(None)
    assert isinstance(config, ExperimentConfig)
    assert (config.data.image_size, config.data.channels, config.data.resize) == (150, 1, "stretch")
    assert config.model.name == "xraynet"
    assert config.train.epochs == 10 and config.train.learning_rate == pytest.approx(1e-3)
    assert config.scaling.workers == 2 and config.scaling.gpu is False
    assert config.data.augment.enabled is False


def test_yaml_file_round_trip(tmp_path):
    config = with_overrides(
        load_config(None),
        {"train.epochs": 3, "data.image_size": 224, "data.channels": 3, "data.augment.enabled": True,
         "model.name": "seed", "run.name": "baseline", "train.mixed_precision": False},
    )
    path = write(tmp_path, dump_config(config))
    loaded = load_config(path)
    assert loaded == config
    assert loaded.data.augment.enabled is True and loaded.run.name == "baseline"


def test_partial_yaml_keeps_defaults_for_the_rest(tmp_path):
    loaded = load_config(write(tmp_path, "train:\n  epochs: 4\ndata:\n  augment:\n    rotation_deg: 10\n"))
    assert loaded.train.epochs == 4 and loaded.data.augment.rotation_deg == 10
    assert loaded.train.batch_size == ExperimentConfig().train.batch_size
    assert load_config(write(tmp_path, "")) == ExperimentConfig()  # an empty file means defaults


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("train:\n  learning_rat: 0.01\n", "train.learning_rat"),
        ("trian:\n  epochs: 3\n", "trian"),
        ("data:\n  augment:\n    rotate: 5\n", "data.augment.rotate"),
    ],
)
def test_unknown_key_names_the_dotted_key(tmp_path, yaml_text, key):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert f"{key}: unknown key" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"learning_rate": -0.1}}, "train.learning_rate"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"scaling": {"workers": 0}}, "scaling.workers"),
        ({"model": {"name": "foo"}}, "model.name"),
        ({"data": {"channels": 2}}, "data.channels"),
        ({"data": {"val_fraction": 0.5}}, "data.val_fraction"),
        ({"data": {"augment": {"rotation_deg": 90}}}, "data.augment.rotation_deg"),
        ({"run": {"name": "../elsewhere"}}, "run.name"),
        ({"train": {"optimizer": "sgd"}}, "train.optimizer"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"data": 5}, "data"),
    ],
)
def test_bad_value_names_the_key(raw, key):
    with pytest.raises(ConfigError) as raised:
        config_from_dict(raw)
    assert f"  {key}: " in str(raised.value)


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"train": {"epochs": 0, "learnin_rate": 1}, "scaling": {"workers": -1}})
    message = str(raised.value)
    assert "train.epochs" in message and "train.learnin_rate" in message and "scaling.workers" in message


def test_bad_value_in_a_file_names_the_file_and_key(tmp_path):
    path = write(tmp_path, "scaling:\n  workers: 0\n")
    with pytest.raises(ConfigError, match="scaling.workers") as raised:
        load_config(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("text", ["train: [epochs: 3\n", "train:\n  epochs: 3\n lr: 1\n", "a: b: c\n"])
def test_invalid_yaml(tmp_path, text):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, text))


def test_invalid_yaml_is_one_line_with_where(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, "train:\n  epochs: [3\n"))
    message = str(raised.value)
    assert "\n" not in message and "not valid YAML: expected ',' or ']'" in message and "line 3, column 1" in message


def test_a_config_that_is_not_text_says_so(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(binary)


@pytest.mark.parametrize("text", ["- train\n- model\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)  # a folder is not a config file


def test_with_overrides_replaces_dotted_keys_and_leaves_the_original():
    base = load_config(None)
    changed = with_overrides(
        base, {"train.epochs": 3, "data.augment.enabled": True, "scaling.workers": 4, "model.dropout": None}
    )
    assert changed.train.epochs == 3 and changed.data.augment.enabled is True and changed.scaling.workers == 4
    assert changed.model.dropout == base.model.dropout  # None means "flag not given"
    assert base.train.epochs == 10 and base.data.augment.enabled is False


@pytest.mark.parametrize("key", ["train.epoch", "trian.epochs", "train.epochs.max", "data.augment.rotate", "seed"])
def test_with_overrides_unknown_key(key):
    with pytest.raises(ConfigError, match=f"unknown config key: {key}"):
        with_overrides(load_config(None), {key: 1})


def test_with_overrides_validates_values():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        with_overrides(load_config(None), {"train.learning_rate": 5})
    with pytest.raises(ConfigError, match="train.epochs"):
        with_overrides(load_config(None), {"train.epochs": "many"})


def test_parse_set_option_reads_yaml_scalars():
    overrides = parse_set_option(
        ["train.epochs=3", "data.augment.enabled=true", "train.optimizer=rmsprop", "model.dropout=0.25",
         "run.name=a=b", " scaling.workers = 4"]
    )
    assert overrides == {
        "train.epochs": 3,
        "data.augment.enabled": True,
        "train.optimizer": "rmsprop",
        "model.dropout": 0.25,
        "run.name": "a=b",  # only the first '=' separates key and value
        "scaling.workers": 4,
    }
    assert type(overrides["train.epochs"]) is int and type(overrides["data.augment.enabled"]) is bool
    config = with_overrides(load_config(None), overrides)
    assert config.train.epochs == 3 and config.data.augment.enabled is True and config.run.name == "a=b"


def test_parse_set_option_scientific_learning_rate_still_validates():
    config = with_overrides(load_config(None), parse_set_option(["train.learning_rate=1e-4"]))
    assert config.train.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("item", ["train.epochs", "=3", "", "train.epochs=[3", "run.storage=@home", "run.name={a", "run.name=a\x01b"])
def test_parse_set_option_malformed_item(item):
    with pytest.raises(ConfigError) as raised:
        parse_set_option([item])
    assert "--set" in str(raised.value)


def test_assignment_is_validated_too():
    config = load_config(None)
    config.train.epochs = 5
    assert config.train.epochs == 5
    with pytest.raises(ValueError):
        config.train.epochs = 0


def test_parse_set_option_quoted_text_is_kept_as_text():
    assert parse_set_option(["run.storage='@home'", "run.name='42'"]) == {"run.storage": "@home", "run.name": "42"}
