"""Federation statistics: sites with their own tables normalise with the sum of every site's
statistics, exactly as if the tables had been pooled, and training stays exact."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from flower_grid import LocalGrid, decrypt_arrays, serve, server_run_config

from aggregator.server_app import RunFailed
from federation import protocol
from federation.aggregation import InvalidUpdate, RunStore, sum_statistics
from federation.config import load_experiment
from federation.experiment import load_data
from federation.more.keys import generate_key, save_key
from federation.scaffold import SAMPLE, new_study
from sites import client_app


def _hospitals(study: Path, count: int) -> list[Path]:
    """The study's sample table cut into one folder per hospital (contiguous rows: the
    hospitals see different patients, so their own statistics differ)."""
    rows = list(csv.reader((study / "data" / SAMPLE).open()))
    header, body = rows[0], rows[1:]
    folders = []
    for i, part in enumerate(np.array_split(np.arange(len(body)), count)):
        folder = study / f"hospital-{i}"
        folder.mkdir()
        with (folder / SAMPLE).open("w", newline="") as fh:
            csv.writer(fh).writerows([header, *(body[j] for j in part)])
        folders.append(folder)
    return folders


def _experiment(study: Path, **federation: object) -> Path:
    path = study / "experiment.yaml"
    data = yaml.safe_load(path.read_text())
    data["training"]["rounds"] = 2
    data["federation"].update(federation)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_sites_with_their_own_tables_normalise_with_the_federations_statistics(
    tmp_path: Path,
) -> None:
    study = tmp_path / "study"
    new_study(study)
    experiment = _experiment(study)
    key = save_key(generate_key(7), tmp_path / "federation.key")
    nodes = [
        {"site-id": i, "data-dir": str(folder), "key-file": str(key)}
        for i, folder in enumerate(_hospitals(study, 3))
    ]
    config = server_run_config(experiment, tmp_path / "out")
    serve(LocalGrid(client_app.app, nodes, config), config)
    checkpoint = RunStore(tmp_path / "out" / protocol.MODE_ENCRYPTED).load_latest()
    assert checkpoint is not None and checkpoint.server_round == 2
    assert checkpoint.fingerprint == generate_key(7).fingerprint
    report = (tmp_path / "out" / "report.md").read_text()
    assert "normalisation: federation statistics of 400 rows from 3 sites" in report
    # Each site trained on its own rows, standardised with the pooled table's mean and std.
    pooled = load_data(load_experiment(experiment))
    sites = [
        s for s in client_app._SITES.values() if s.own_data and s.config.source == str(experiment)
    ]
    assert sorted(s.site_id for s in sites) == [0, 1, 2]
    for site in sites:
        used = site.data.info["normalisation"]["features"]
        np.testing.assert_allclose(used["mean"], pooled.info["normalisation"]["features"]["mean"])
        np.testing.assert_allclose(used["std"], pooled.info["normalisation"]["features"]["std"])
        assert site.data.feature_range == pytest.approx(pooled.feature_range)
    rows = sum(len(s.data.x_train) + len(s.data.x_test) for s in sites)
    assert rows == len(pooled.x_train) + len(pooled.x_test)
    decrypted = decrypt_arrays(checkpoint.arrays, 7)
    assert all(np.isfinite(v).all() for v in decrypted.values())


def test_the_statistics_sum_is_checked_before_use() -> None:
    good = {
        "features.count": np.array([3]),
        "features.sum": np.array([1.0, 2.0]),
        "features.sum_sq": np.array([1.0, 4.0]),
        "features.min": np.array([0.0, 0.0]),
        "features.max": np.array([1.0, 2.0]),
        "features.present": np.array([3.0, 3.0]),
    }
    total = sum_statistics([good, good])
    assert total.features.count == 6
    np.testing.assert_array_equal(total.features.sum, [2.0, 4.0])
    with pytest.raises(InvalidUpdate, match="must be finite"):
        sum_statistics([good, {**good, "features.sum": np.array([np.nan, 1.0])}])
    with pytest.raises(InvalidUpdate, match="malformed statistics"):
        sum_statistics([{**good, "features.extra": np.zeros(2)}])
    with pytest.raises(InvalidUpdate, match="do not add up"):
        sum_statistics([good, {k: v[:1] if v.ndim else v for k, v in good.items()}])


def test_secure_aggregation_without_declared_normalisation_is_refused(tmp_path: Path) -> None:
    study = tmp_path / "study"
    new_study(study)
    experiment = _experiment(study, secure_aggregation={"enabled": True, "max_weight": 1000})
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    config = server_run_config(experiment, tmp_path / "out")
    with pytest.raises(RunFailed, match="declare 'task.options.normalise'"):
        serve(LocalGrid(client_app.app, nodes, config), config)
