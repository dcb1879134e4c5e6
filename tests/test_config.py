"""The experiment schema: shipped configs load; every bad key names file, key, expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from federation.config import (
    REFRESH_EVERY_ADAM,
    ConfigError,
    EncryptionConfig,
    FederationConfig,
    SitesConfig,
    TrainingConfig,
    experiment_from_dict,
    load_experiment,
)
from federation.more.health import DEFAULT_LIMIT

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_experiments_load(path: Path) -> None:
    cfg = load_experiment(path)
    assert cfg.name and cfg.sites.count >= 1 and cfg.federation.min_sites <= cfg.sites.count
    assert cfg.output_dir.is_absolute()


def test_defaults_are_documented_values() -> None:
    cfg = experiment_from_dict({"name": "x", "task": {"name": "angio"}})
    assert cfg.model.arch is None  # the task's build_model default (angio: the cnn)
    assert cfg.sites.count == 3 and cfg.training.dtype == "float64"
    assert cfg.model.name == "the task's default"
    assert cfg.federation.encrypted and cfg.encryption.target_shadow == "auto"
    with pytest.raises(TypeError):
        cfg.task.options["x"] = 1  # frozen


def test_an_experiment_with_no_optional_key_gets_the_dataclasses_defaults() -> None:
    """The reader takes every default from the config dataclasses: nothing to drift."""
    cfg = experiment_from_dict({"name": "x", "task": {"name": "wbc"}})
    assert cfg.sites == SitesConfig() and cfg.training == TrainingConfig()
    assert cfg.federation == FederationConfig() and cfg.encryption == EncryptionConfig()
    assert EncryptionConfig().health_limit == DEFAULT_LIMIT  # the engine's own default
    adam = experiment_from_dict(
        {"name": "x", "task": {"name": "wbc"}, "training": {"optimizer": "adam"}}
    )
    assert adam.encryption.refresh_every == REFRESH_EVERY_ADAM


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"task": {"name": "cifar"}},
            "'task.name' must be one of mnist, wbc, angio, tabular, arrays, images, dicom, got "
            "'cifar'",
        ),
        ({"training": {"lr": 0}}, "'training.lr' must be a number > 0.0, got 0"),
        ({"training": {"rounds": "three"}}, "'training.rounds' must be an integer >= 1"),
        ({"training": {"dtype": "float16"}}, "'training.dtype' must be one of float32, float64"),
        ({"sites": {"partition": "random"}}, "'sites.partition' must be one of iid, non-iid"),
        ({"sites": {"count": 2}, "federation": {"min_sites": 3}}, "'federation.min_sites'"),
        ({"federation": {"encrypted": "yes"}}, "'federation.encrypted' must be true or false"),
        ({"encryption": {"target_shadow": "zero"}}, "'encryption.target_shadow' must be one of"),
        ({"training": {"epochs": 3}}, "unknown key 'training.epochs'"),
        ({"sitez": {}}, "unknown key 'sitez'"),
        ({"task": "wbc"}, "'task' must be a mapping"),
        ({"task": {"name": "wbc", "options": [1]}}, "'task.options' must be a mapping"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, patch, message) -> None:
    data = {"name": "x", "task": {"name": "wbc"}}
    data.update(patch)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)
    (tmp_path / "noname.yaml").write_text("task: {name: wbc}")
    with pytest.raises(ConfigError, match="'name' is required"):
        load_experiment(tmp_path / "noname.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "e.yaml").write_text(
        "name: e\ntask: {name: mnist, data_dir: ../data}\noutput_dir: ../runs/e\n"
        "encryption: {key_file: ../keys/k.key}\n"
    )
    cfg = load_experiment(sub / "e.yaml")
    assert cfg.task.data_dir == sub / "../data"
    assert cfg.output_dir == sub / "../runs/e"
    assert cfg.encryption.key_file == sub / "../keys/k.key"
