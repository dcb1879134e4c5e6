"""A study's own task module and model factory, outside the package, run like built-ins."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from federation import cli, protocol
from federation.config import ConfigError, experiment_fields, load_experiment
from federation.experiment import initial_model, site_data
from federation.tasks import TaskLoadError
from federation.tools.scaffold import SOURCES, ScaffoldError, new_study
from sites import client_app
from tests.flower.flower_grid import (
    SIMULATED,
    LocalGrid,
    assert_decrypts_to_plaintext,
    serve,
    server_run_config,
)
from tests.paths import ROOT

TASK = '''
"""A study's task: two noisy clusters of patients (stands in for a hospital export)."""
import numpy as np
import torch
from federation.tasks.base import TaskData


def load_task_data(*, seed, n=240, features=4, data_dir=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, features)) + y[:, None] * 1.5
    x = (x - x.mean(0)) / x.std(0)
    cut = int(0.75 * n)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)
    return TaskData(
        name="clusters", kind="classification",
        x_train=t(x[:cut], torch.float64), y_train=t(y[:cut], torch.int64),
        x_test=t(x[cut:], torch.float64), y_test=t(y[cut:], torch.int64),
        feature_range=(float(x.min()), float(x.max())), num_classes=2,
    )
'''

MODELS = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc, self.bn = nn.Linear(width, width), nn.BatchNorm1d(width)

    def forward(self, x):
        return torch.relu(x + self.bn(self.fc(x)))


class Net(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(4, hidden), Block(hidden), nn.Linear(hidden, 2)

    def forward(self, x):
        return self.out(self.block(torch.relu(self.inp(x))))


def build(hidden=8):
    return Net(hidden)


def not_a_model():
    return "a string"
"""


def _study(directory: Path, **experiment: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "clusters.py").write_text(TASK, encoding="utf-8")
    (directory / "models.py").write_text(MODELS, encoding="utf-8")
    data = {
        "name": "clusters",
        "task": {"module": "clusters.py", "options": {"n": 240}},
        "model": {"factory": "models.py:build", "options": {"hidden": 6}},
        "sites": {"count": 3},
        "training": {"rounds": 2, "batch_size": 16, "lr": 0.05, "dtype": "float64"},
        "encryption": {"key_seed": 1234},
        "output_dir": "out",
        **experiment,
    }
    path = directory / "experiment.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_a_study_module_and_factory_load_with_paths_relative_to_the_config(
    tmp_path: Path,
) -> None:
    config = load_experiment(_study(tmp_path / "study"))
    assert config.task.name == "clusters"  # the module's name unless the YAML names it
    fields = experiment_fields(config)
    assert fields["task.module"] == "clusters.py"  # hosts that copied the study agree
    assert fields["model.factory.module"] == "models.py"
    model = initial_model(config)
    assert type(model).__name__ == "Net" and model.block.fc.in_features == 6
    shares = [len(site_data(config, i).x_train) for i in range(3)]
    assert sum(shares) == 180 and min(shares) > 0  # the default partition


def test_a_study_trains_encrypted_in_a_federation_equal_to_plaintext(tmp_path: Path) -> None:
    experiment = _study(tmp_path / "study")
    config = server_run_config(experiment, tmp_path / "out", **{protocol.RUN_BASELINE: True})
    serve(LocalGrid(client_app.app, SIMULATED, config), config)
    _, plaintext = assert_decrypts_to_plaintext(tmp_path / "out")
    assert "block.bn.running_var" in plaintext.arrays  # batch norm's statistics are averaged
    assert plaintext.arrays["block.bn.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"task": {"module": "missing.py"}}, ConfigError, "'task.module' must be a Python file"),
        ({"task": {"module": "not a name"}}, ConfigError, "importable module name"),
        ({"model": {"factory": "models.py"}}, ConfigError, "'model.factory' must be 'module:"),
        ({"model": {"factory": "nope.py:build"}}, ConfigError, "'model.factory' must be a"),
        ({"model": {"factory": "models.py:absent"}}, TaskLoadError, "has no function 'absent'"),
        ({"model": {"factory": "models.py:not_a_model"}}, TypeError, "not a torch.nn.Module"),
        ({"task": {"module": "models.py"}}, TaskLoadError, "lacks load_task_data"),
    ],
)
def test_a_bad_study_reference_is_refused_naming_it(
    tmp_path: Path, change: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        config = load_experiment(_study(tmp_path / "study", **change))
        initial_model(config)
        site_data(config, 0)


def test_the_apps_run_config_declares_every_key_with_the_protocols_defaults() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    config = dict(declared["config"])
    assert config.pop(protocol.RUN_EXPERIMENT) == "configs/wbc.yaml"
    assert config == protocol.RUN_DEFAULTS


# --- more-fl new and data inspect ---------------------------------------------------------


def _leaves(config_fields: dict) -> set[str]:
    return {key.rsplit(".", 1)[-1] for key in config_fields}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("task_module", [False, True], ids=["yaml-only", "task-module"])
def test_new_writes_a_study_whose_experiment_loads_and_names_every_key(
    tmp_path: Path, task_module: bool, source: str
) -> None:
    files = new_study(tmp_path / "My Study", source=source, task_module=task_module)
    root = tmp_path / "My Study"
    assert (root / "task.py" in files) == task_module
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "my-study"
    declared = dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert declared.pop(protocol.RUN_EXPERIMENT) == "experiment.yaml"
    assert declared == protocol.RUN_DEFAULTS
    text = (root / "experiment.yaml").read_text()
    config = load_experiment(root / "experiment.yaml")
    missing = [k for k in _leaves(experiment_fields(config)) if f"{k}:" not in text]
    assert not missing, f"keys without a line in the scaffold: {missing}"
    data = site_data(config, 0)
    assert data.kind == "classification" and data.num_classes == 2
    if source == "tabular":
        assert data.info["missing"]["cells_imputed"]
    else:
        assert tuple(data.x_train.shape[1:]) == (1, 16, 16)
        assert not data.info.get("skipped")  # every sample file is usable
    model = initial_model(config)
    assert model(data.x_train[:4].double()).shape == (4, 2)


def test_the_clis_source_choices_are_the_scaffolds() -> None:
    new = cli.build_parser()._subparsers._group_actions[0].choices["new"]  # type: ignore[union-attr]
    (source,) = [a for a in new._actions if a.dest == "source"]
    assert tuple(source.choices) == SOURCES


@pytest.mark.parametrize("source", ["images", "dicom"])
def test_an_image_study_made_by_new_trains_encrypted_equal_to_plaintext(
    tmp_path: Path, source: str
) -> None:
    """`more-fl new --source images|dicom` and its YAML alone (fewer rounds here): the
    statistics round, then encrypted FedAvg that decrypts to plaintext FedAvg."""
    new_study(tmp_path / "study", source=source)
    experiment = tmp_path / "study" / "experiment.yaml"
    text = experiment.read_text(encoding="utf-8")
    assert "  rounds: 5" in text
    experiment.write_text(text.replace("  rounds: 5", "  rounds: 2"), encoding="utf-8")
    config = server_run_config(experiment, tmp_path / "out", **{protocol.RUN_BASELINE: True})
    serve(LocalGrid(client_app.app, SIMULATED, config), config)
    assert_decrypts_to_plaintext(tmp_path / "out")
    assert "normalisation: federation statistics" in (tmp_path / "out" / "report.md").read_text()


def test_new_refuses_a_folder_that_holds_anything_and_leaves_it_alone(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match="exists and is not an empty folder"):
        new_study(tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no staging folder left


def test_data_inspect_shows_counts_ranges_missing_and_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new_study(tmp_path / "s")
    assert cli.main(["data", "inspect", "--config", str(tmp_path / "s" / "experiment.yaml")]) == 0
    out = capsys.readouterr().out
    assert "all sites" in out and "320 train, 80 test" in out
    assert "class 0:" in out and "feature cholesterol:" in out
    assert "missing rows_imputed:" in out and "skipped:" in out
    assert cli.main(["data", "inspect", "--config", "x.yaml", "--site", "0"]) == 2
    assert cli.main(["data", "mnist", "--site", "1"]) == 2
