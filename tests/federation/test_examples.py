"""The public medical examples (examples/): their experiments load from any working
directory, their data has the published sizes, encrypted training equals plaintext on them,
and the committed CSV files are exactly what scripts/make-examples writes."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
from importlib.machinery import SourceFileLoader
from pathlib import Path

import numpy as np
import pytest

from federation.config import load_deployment, load_experiment
from federation.experiment import compare_centralised, federation_key, load_data
from federation.tasks import tabular
from tests.paths import ROOT

EXAMPLES = ROOT / "examples"
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None

# name: (file, rows, features, target, kind)
DATASETS = {
    "breast-cancer": ("breast_cancer.csv", 569, 30, "diagnosis", "classification"),
    "diabetes": ("diabetes.csv", 442, 10, "progression", "regression"),
}
EXPERIMENTS = [
    (name, variant, partition)
    for name in DATASETS
    for variant, partition in (("experiment.yaml", "iid"), ("experiment-noniid.yaml", "non-iid"))
]
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def make_examples():
    """scripts/make-examples as a module (the script has no .py suffix)."""
    loader = SourceFileLoader("make_examples", str(ROOT / "scripts" / "make-examples"))
    spec = importlib.util.spec_from_loader("make_examples", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def manifest() -> dict[str, str]:
    lines = (EXAMPLES / "MANIFEST.sha256").read_text(encoding="ascii").splitlines()
    return {path: digest for digest, path in (line.split("  ", 1) for line in lines)}


@pytest.mark.parametrize(("name", "variant", "partition"), EXPERIMENTS)
def test_experiment_loads_from_any_working_directory(
    name: str, variant: str, partition: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # elsewhere, named by a relative path from there
    config = load_experiment(os.path.relpath(EXAMPLES / name / variant, tmp_path))
    assert config.task.name == "tabular"
    assert config.task.data_dir == EXAMPLES / name / "data"
    assert config.sites.partition == partition
    assert config.output_dir.parent == EXAMPLES / name / "runs"
    file, rows, features, target, kind = DATASETS[name]
    assert config.task.options["file"] == file
    assert len(config.task.options["features"]) == features
    assert config.task.options["kind"] == kind
    data = load_data(config)
    assert len(data.y_train) + len(data.y_test) == rows
    assert len(data.y_test) == round(rows * 0.2)
    assert data.x_train.shape[1] == features


def test_breast_cancer_is_the_wisconsin_data() -> None:
    data = load_data(load_experiment(EXAMPLES / "breast-cancer" / "experiment.yaml"))
    assert data.class_names == ("benign", "malignant")
    labels = np.concatenate([data.y_train.numpy(), data.y_test.numpy()])
    assert np.bincount(labels).tolist() == [357, 212]


def test_diabetes_target_is_standardised_from_its_own_units() -> None:
    data = load_data(load_experiment(EXAMPLES / "diabetes" / "experiment.yaml"))
    assert data.output_names == ("progression",)
    assert data.target_range is not None and data.target_mean is not None
    assert data.target_std is not None
    low, high = (v * data.target_std[0] + data.target_mean[0] for v in data.target_range)
    assert 25.0 <= low < high <= 346.0  # the progression score of the 442 patients


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("split", ["iid", "skewed"])
def test_hospital_tables_partition_the_patients(name: str, split: str) -> None:
    """Each hospital's folder loads as a deployed site's data-dir would, and together the
    three hold every patient exactly once."""
    file, rows, features, target, kind = DATASETS[name]
    options = dict(load_experiment(EXAMPLES / name / "experiment.yaml").task.options)
    ids: list[int] = []
    for hospital in HOSPITALS:
        folder = EXAMPLES / name / "data" / split / hospital
        raw = tabular.load_raw(data_dir=folder, **options)
        assert raw.x_train.shape[1] == features
        with (folder / file).open(newline="") as fh:
            ids += [int(row["patient_id"]) for row in csv.DictReader(fh)]
    assert sorted(ids) == list(range(1, rows + 1))


@pytest.mark.parametrize("name", DATASETS)
def test_encrypted_training_equals_plaintext(name: str) -> None:
    config = load_experiment(EXAMPLES / name / "experiment.yaml")
    result = compare_centralised(config, federation_key(config), epochs=2)
    plain, enc = result.plaintext.history[-1], result.encrypted.history[-1]
    assert plain.keys() == enc.keys()
    for metric, value in plain.items():
        assert enc[metric] == pytest.approx(value, abs=1e-9), metric
    assert result.param_rel < 1e-12


def test_diabetes_deployment_gives_each_hospital_its_own_age_band() -> None:
    folder = EXAMPLES / "diabetes"
    dep = load_deployment(folder / "deployment-skewed.yaml")
    assert dep.experiment == folder / "experiment.yaml"
    assert not dep.tls.enabled
    assert [s.site_id for s in dep.sites] == [0, 1, 2]
    for site, hospital in zip(dep.sites, HOSPITALS, strict=True):
        assert site.data_dir == folder / "data" / "skewed" / hospital
        assert (site.data_dir / "diabetes.csv").is_file()
        assert site.key_file == folder / "keys" / "federation.key"  # ignored by git
    assert dep.output_dir is not None and dep.output_dir.is_relative_to(folder / "runs")


def test_manifest_lists_every_example_table_with_its_checksum() -> None:
    listed = manifest()
    on_disk = {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.glob("*/data/**/*.csv")}
    assert on_disk == {p for p in listed if p.endswith(".csv")}
    assert len(on_disk) == 2 * (1 + 2 * len(HOSPITALS))
    for path, digest in listed.items():
        assert hashlib.sha256((EXAMPLES / path).read_bytes()).hexdigest() == digest, path


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn is not installed (manifest checked)")
def test_make_examples_writes_the_committed_files_byte_for_byte() -> None:
    script = make_examples()
    files = script.example_files()
    assert set(files) == {*manifest(), "MANIFEST.sha256"}
    for path, data in files.items():
        assert (EXAMPLES / path).read_bytes() == data, path
    assert script.example_files() == files  # deterministic within a process too


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn is not installed")
def test_tables_hold_scikit_learns_values_exactly() -> None:
    from sklearn.datasets import load_breast_cancer, load_diabetes

    for name, bunch in (
        ("breast_cancer", load_breast_cancer()),
        ("diabetes", load_diabetes(scaled=False)),
    ):
        path = EXAMPLES / name.replace("_", "-") / "data" / f"{name}.csv"
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        values = np.array([[float(c) for c in row[1:-1]] for row in rows])
        assert np.array_equal(values, bunch.data), name
        if name == "diabetes":
            assert np.array_equal([float(row[-1]) for row in rows], bunch.target)
        else:
            names = [bunch.target_names[t] for t in bunch.target]
            assert [row[-1] for row in rows] == names
