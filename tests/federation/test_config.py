"""The experiment schema: shipped configs load; every bad key names file, key, expectation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from federation.config import (
    REFRESH_EVERY_ADAM,
    ConfigError,
    DeploymentConfig,
    EncryptionConfig,
    ExperimentConfig,
    FederationConfig,
    SitesConfig,
    TrainingConfig,
    deployment_from_dict,
    experiment_from_dict,
    load_deployment,
    load_experiment,
)
from federation.more.health import DEFAULT_LIMIT
from tests.hostile import FUZZ, SMALL, expect, quiet, scratch, tried
from tests.paths import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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


# --- Hostile configs (fuzzed: see tests/hostile.py) -----------------------------------------------

_TEXT = st.text(max_size=16)
_JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _TEXT
    | st.sampled_from(
        ["nan", "-1", "0", "1e-400", "1e400", "inf", "mlp", "cnn", "iid", "float32", "auto"]
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_TEXT | st.integers(-2, 2) | st.none(), inner, max_size=3)
    ),
    max_leaves=8,
)

_EXPERIMENT: dict[str, Any] = {
    "name": "hostile",
    "task": {"name": "wbc", "options": {"n_samples": 64}, "data_dir": "data"},
    "model": {"arch": "mlp", "options": {"hidden": 8}},
    "sites": {"count": 3, "partition": "non-iid", "alpha": 0.5},
    "training": {
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 16,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "dtype": "float32",
        "seed": 3,
    },
    "federation": {"min_sites": 2, "encrypted": True},
    "encryption": {
        "target_shadow": "auto",
        "key_file": "keys/federation.key",
        "key_seed": 7,
        "health_limit": 1e4,
    },
    "output_dir": "runs/hostile",
}
_DEPLOYMENT: dict[str, Any] = {
    "experiment": "experiment.yaml",
    "work_dir": "runs/deploy",
    "superlink": {"host": "127.0.0.1", "port": 9092},
    "tls": {"enabled": True, "generate": True, "cert_dir": "certs"},
    "node_auth": {"enabled": True, "key_dir": "node-keys"},
    "sites": [
        {"name": "a", "id": 0, "port": 9101, "data_dir": "a", "key_file": "a.key"},
        {"name": "b", "id": 1, "port": 9102},
    ],
    "run": {"output_dir": "out", "round_timeout": 60.0, "timeout": 600.0},
}


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every dotted position in a nested dict/list (where a mutation can land)."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


def _at(tree: Any, where: tuple[Any, ...]) -> Any:
    for step in where:
        tree = tree[step]
    return tree


def _mutate_tree(tree: dict[str, Any], data: st.DataObject) -> Any:
    """Replace, delete or add entries of a valid config at random positions."""
    tree = json.loads(json.dumps(tree))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        where = data.draw(st.sampled_from(_paths(tree)), label="position")
        if not where:
            return data.draw(_JUNK, label="whole document")
        parent = _at(tree, where[:-1])
        kind = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if kind == "replace":
            parent[where[-1]] = data.draw(_JUNK, label="value")
        elif kind == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            new_key = data.draw(_TEXT | st.integers(-2, 2) | st.none(), label="new key")
            parent[new_key] = data.draw(_JUNK, label="value")
    return tree


@quiet
@FUZZ
@given(data=st.data())
def test_experiment_config_refuses_mutations(data: st.DataObject) -> None:
    """A mutated experiment is refused with ConfigError, or validates to a sound config."""
    tried("config")
    tree = _mutate_tree(_EXPERIMENT, data)
    with scratch() as folder:
        result = expect(
            ConfigError, lambda: experiment_from_dict(tree, base=folder), ExperimentConfig
        )
        if isinstance(result, ExperimentConfig):
            assert result.training.lr > 0 and result.sites.count >= result.federation.min_sites


@quiet
@SMALL
@given(data=st.data())
def test_experiment_yaml_files_refuse_mutations(data: st.DataObject) -> None:
    """The same through a YAML file: the file is named in the error."""
    tried("config")
    tree = _mutate_tree(_EXPERIMENT, data)
    with scratch() as folder:
        path = folder / "experiment.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
        result = expect(ConfigError, lambda: load_experiment(path), ExperimentConfig)
        if isinstance(result, ConfigError):
            assert str(path) in str(result)


@quiet
@FUZZ
@given(data=st.data())
def test_deployment_config_refuses_mutations(data: st.DataObject) -> None:
    tried("config")
    tree = _mutate_tree(_DEPLOYMENT, data)
    with scratch() as folder:
        result = expect(
            ConfigError, lambda: deployment_from_dict(tree, base=folder), DeploymentConfig
        )
        if isinstance(result, DeploymentConfig):
            ports = [s.port for s in result.sites]
            assert len(set(ports)) == len(ports) and result.port not in ports


@quiet
@FUZZ
@given(blob=st.binary(max_size=200), deployment=st.booleans())
def test_config_loaders_refuse_random_bytes(blob: bytes, deployment: bool) -> None:
    tried("config")
    with scratch() as folder:
        path = folder / "config.yaml"
        path.write_bytes(blob)
        loader = load_deployment if deployment else load_experiment
        expect(ConfigError, lambda: loader(path), (ExperimentConfig, DeploymentConfig))


@quiet
def test_config_loaders_refuse_missing_files_and_directories(tmp_path: Path) -> None:
    for loader in (load_experiment, load_deployment):
        for path in (tmp_path, tmp_path / "absent.yaml"):
            tried("config")
            expect(ConfigError, lambda loader=loader, path=path: loader(path))


@quiet
@pytest.mark.parametrize("opener", ["[", "{"])
def test_config_loader_refuses_deeply_nested_yaml(tmp_path: Path, opener: str) -> None:
    tried("config")
    path = tmp_path / "experiment.yaml"
    path.write_text(opener * 2_000)
    with pytest.raises(ConfigError, match="nested too deeply") as caught:
        load_experiment(path)
    assert str(path) in str(caught.value)


@quiet
def test_config_refuses_unknown_keys_of_mixed_types() -> None:
    tried("config")
    with pytest.raises(ConfigError, match="key 1 in '<top>' is not a name"):
        experiment_from_dict({**_EXPERIMENT, 1: "x", "typo": "y"})
    tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    tree["sites"][None] = 1
    with pytest.raises(ConfigError, match="key None in 'sites' is not a name"):
        experiment_from_dict(tree)


@quiet
@pytest.mark.parametrize(
    "where", [("output_dir",), ("name",), ("task", "data_dir"), ("encryption", "key_file")]
)
@pytest.mark.parametrize("value", ["~run\x00s", "runs/a\x00b"])
def test_config_refuses_a_nul_in_a_string(where: tuple[Any, ...], value: str) -> None:
    tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    _at(tree, where[:-1])[where[-1]] = value
    with pytest.raises(ConfigError, match=f"'{'.'.join(where)}' must be a string without NUL"):
        experiment_from_dict(tree)


@quiet
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "1e400"])
@pytest.mark.parametrize(
    "where", [("training", "lr"), ("sites", "alpha"), ("encryption", "health_limit")]
)
def test_config_refuses_non_finite_numbers(where: tuple[str, ...], value: Any) -> None:
    tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    _at(tree, where[:-1])[where[-1]] = value
    with pytest.raises(ConfigError, match=f"'{'.'.join(where)}' must be a finite number"):
        experiment_from_dict(tree)


@quiet
@pytest.mark.parametrize("key", ["round_timeout", "timeout"])
def test_deployment_refuses_non_finite_timeouts(tmp_path: Path, key: str) -> None:
    tried("config")
    tree = json.loads(json.dumps(_DEPLOYMENT))
    tree["run"][key] = float("inf")
    with pytest.raises(ConfigError, match=f"'run.{key}' must be a finite number"):
        deployment_from_dict(tree, base=tmp_path)


@quiet
def test_config_templates_are_valid(tmp_path: Path) -> None:
    """The mutation properties start from configs that validate (so refusals mean something)."""
    assert isinstance(experiment_from_dict(_EXPERIMENT, base=tmp_path), ExperimentConfig)
    assert isinstance(deployment_from_dict(_DEPLOYMENT, base=tmp_path), DeploymentConfig)


@quiet
@pytest.mark.parametrize("where", [("name",), ("output_dir",), ("model", "arch")])
def test_experiment_refuses_null_for_strings(where: tuple[Any, ...]) -> None:
    tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    _at(tree, where[:-1])[where[-1]] = None
    with pytest.raises(ConfigError, match=f"'{'.'.join(where)}' must be a .*, got None"):
        experiment_from_dict(tree)


@quiet
@pytest.mark.parametrize(
    "where", [("experiment",), ("work_dir",), ("superlink", "host"), ("sites", 0, "name")]
)
def test_deployment_refuses_null_for_strings(where: tuple[Any, ...], tmp_path: Path) -> None:
    tried("config")
    tree = json.loads(json.dumps(_DEPLOYMENT))
    _at(tree, where[:-1])[where[-1]] = None
    with pytest.raises(ConfigError, match="must be"):
        deployment_from_dict(tree, base=tmp_path)
