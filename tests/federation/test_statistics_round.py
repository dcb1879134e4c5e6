"""Federation statistics: sites with their own tables normalise with the sum of every site's
statistics, exactly as if the tables had been pooled, and training stays exact. Under secure
aggregation the statistics come through SecAgg+ passes, equal to the pooled ones within
their quantisation bound (and to round-off when the averages are exact)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from federation import protocol
from federation.aggregation import Checkpoint, InvalidUpdate, RunStore, sum_statistics
from federation.config import load_experiment
from federation.experiment import load_data
from federation.more.keys import generate_key, save_key
from federation.secure_stats import E_MAX, PASSES, SecureStatistics, SiteValues
from federation.tools.scaffold import SAMPLE, new_study
from sites import client_app
from tests.flower.flower_grid import SIMULATED, LocalGrid, decrypt_arrays, serve, server_run_config


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


def _run_hospitals(study: Path, experiment: Path, tmp_path: Path) -> Checkpoint:
    """Three deployed-like hospitals, each with its own table and the shared key file, run
    the study's 2 encrypted rounds in-process; the final checkpoint."""
    key = save_key(generate_key(7), tmp_path / "federation.key")
    nodes = [
        {"site-id": i, "data-dir": str(folder), "key-file": str(key)}
        for i, folder in enumerate(_hospitals(study, 3))
    ]
    config = server_run_config(experiment, tmp_path / "out")
    serve(LocalGrid(client_app.app, nodes, config), config)
    checkpoint = RunStore(tmp_path / "out" / protocol.MODE_ENCRYPTED).load_latest()
    assert checkpoint is not None and checkpoint.server_round == 2
    return checkpoint


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
    checkpoint = _run_hospitals(study, experiment, tmp_path)
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


# --- under secure aggregation -------------------------------------------------------------

SECURE = {"enabled": True, "max_weight": 1000}
EPS = float(np.finfo(np.float64).eps)


def _site_tables(seed: int) -> list[SiteValues]:
    """Three sites' raw tables: missing cells, a constant column, magnitudes from 1e-9 to
    1e15, negative values, a large mean with a small spread; and two regression targets."""
    rng = np.random.default_rng(seed)
    sites = []
    for n in (40, 133, 7):
        a = np.column_stack(
            [
                rng.normal(1000.0, 0.5, n),
                rng.normal(0.0, 1e-9, n),
                np.full(n, 3.25),
                -rng.exponential(1e15, n),
                rng.integers(0, 5, n).astype(float),
                rng.normal(-2.0, 3.0, n),
            ]
        )
        a[rng.random(a.shape) < 0.1] = np.nan
        sites.append(SiteValues(n, a, rng.normal(50.0, 10.0, (n - 3, 2))))
    return sites


def _gather(sites: list[SiteValues], error: float, rng: np.random.Generator) -> SecureStatistics:
    """The passes with each average computed exactly (weighted by rows, as SecAgg+ weights)
    and then moved by up to ``error`` (half the entries by exactly +-error), as the
    quantisation may."""
    gathering = SecureStatistics(sites[0].shape, [s.rows for s in sites])
    total = sum(s.rows for s in sites)
    while (name := gathering.next_pass) is not None:
        parameters = json.loads(json.dumps(gathering.parameters()))  # as sites receive them
        vectors = [s.vectors(name, parameters) for s in sites]
        averages = {}
        for part in vectors[0]:
            exact = sum(s.rows * v[part] for s, v in zip(sites, vectors, strict=True)) / total
            shift = rng.uniform(-error, error, exact.shape)
            shift[::2] = error * rng.choice([-1.0, 1.0], shift[::2].shape)
            averages[part] = exact + shift
        gathering.absorb(averages, error)
    return gathering


@pytest.mark.parametrize("error", [0.0, 1e-9, 3e-8])
def test_secure_passes_equal_the_pooled_statistics(error: float) -> None:
    sites = _site_tables(3)
    gathering = _gather(sites, error, np.random.default_rng(5))
    stats, accuracy = gathering.result(), gathering.accuracy
    for part, got in (("features", stats.features), ("targets", stats.targets)):
        assert got is not None
        pooled = np.concatenate([getattr(s, part) for s in sites])
        present = (~np.isnan(pooled)).sum(axis=0)
        mean, std = np.nanmean(pooled, axis=0), np.nanstd(pooled, axis=0)
        assert got.count == len(pooled)
        np.testing.assert_array_equal(got.present, present)
        # Every value lies within the extremes (the range check and the shadows need it).
        assert (np.nan_to_num(pooled, nan=np.inf) >= got.min).all()
        assert (np.nan_to_num(pooled, nan=-np.inf) <= got.max).all()
        scale = np.where(std > 0, std, 1.0)
        mean_dev, std_dev = np.abs(got.mean - mean), np.abs(got.std - std)
        # The pooled numbers' own round-off; FeatureStats keeps sums of squares, so its
        # variance loses ~eps mean^2 (see federation/tasks/stats.py).
        mean_slack = 1e-13 * scale + 8 * EPS * np.abs(mean)
        std_slack = 1e-13 * scale + 8 * EPS * mean**2 / scale
        if error == 0.0:  # exact averages: the pooled statistics, to round-off
            assert (mean_dev <= 1e-12 * (np.abs(mean) + scale)).all()
            assert (std_dev <= 1e-12 * scale + std_slack).all()
        else:  # the documented bound holds, and it is not vacuous
            assert (mean_dev <= np.array(accuracy[part]["mean_error"]) + mean_slack).all()
            assert (std_dev <= np.array(accuracy[part]["std_error"]) + std_slack).all()
            assert (mean_dev / scale).max() < 1e-4 and (std_dev / scale).max() < 1e-3
            assert mean_dev.max() > 0
        assert (np.abs(got.scale - scale) <= (1e-3 if error else 1e-12) * scale + std_slack).all()
    assert stats.features.scale[2] == 1.0 and stats.features.std[2] == 0.0  # the constant


def test_a_site_refuses_values_the_passes_cannot_carry() -> None:
    huge = SiteValues(2, np.array([[1.0], [2.0 ** (E_MAX + 1)]]))
    with pytest.raises(ValueError, match=f"feature 0 reaches .* beyond the 2\\^{E_MAX}"):
        huge.vectors("magnitude", {})
    assert SiteValues(2, np.array([[1.0], [2.0**E_MAX]])).vectors("magnitude", {})
    site = SiteValues(2, np.array([[1.0], [3.0]]))
    assert site.vectors("magnitude", {})["features"].sum() == 1  # one bucket: 2^2 >= 3
    with pytest.raises(ValueError, match="does not cover this site's value"):
        site.vectors("mean", {"features": {"scale": [2.0]}})
    with pytest.raises(ValueError, match="'spread' must be 1 finite numbers"):
        site.vectors("moment", {"features": {"mean": [2.0]}})


def _secure_statistics(out: Path) -> dict:
    summary = RunStore(out / protocol.MODE_ENCRYPTED).load_statistics()
    assert summary is not None and summary["secure"]["passes"] == len(PASSES)
    return summary


@pytest.mark.parametrize("setup", ["auto", "declared", "regression"])
def test_secure_statistics_of_sites_with_their_own_tables_equal_the_pooled_ones(
    tmp_path: Path, setup: str
) -> None:
    """Through Flower's real SecAgg+: the statistics (and regression targets') are the pooled
    table's within their bound, every site's data lies inside their extremes, and training
    proceeds. A declared normalisation still overrides the mean and std."""
    study = tmp_path / "study"
    new_study(study)
    experiment = _experiment(study, secure_aggregation=SECURE)
    data = yaml.safe_load(experiment.read_text())
    if setup == "declared":
        data["task"]["options"]["normalise"] = {"mean": 0.0, "std": 1.0}
    elif setup == "regression":
        data["task"]["options"]["kind"] = "regression"
        del data["task"]["options"]["classes"]
    experiment.write_text(yaml.safe_dump(data), encoding="utf-8")
    checkpoint = _run_hospitals(study, experiment, tmp_path)
    summary = _secure_statistics(tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "normalisation: federation statistics of 400 rows from 3 sites (securely summed" in (
        report
    )
    sites = [
        s for s in client_app._SITES.values() if s.own_data and s.config.source == str(experiment)
    ]
    assert sorted(s.site_id for s in sites) == [0, 1, 2]
    # The pooled table, in numpy: every site's raw rows, and its own training targets.
    raws = [s._raw_data for s in sites]
    x = torch.cat([t for r in raws for t in (r.x_train, r.x_test)]).double().numpy()
    pooled = {"features": (np.nanmean(x, axis=0), np.nanstd(x, axis=0))}
    assert len(x) == summary["rows"] == 400
    if setup == "regression":
        y = torch.cat([r.y_train for r in raws]).double().numpy()
        y = y.reshape(len(y), -1)
        pooled["targets"] = (y.mean(axis=0), y.std(axis=0))
    for part, (mean, std) in pooled.items():
        bounds = summary["secure"][part]
        if part == "features":
            got_mean, got_std = np.array(summary["mean"]), np.array(summary["std"])
        else:
            got = sites[0].data.info["normalisation"]["targets"]
            got_mean, got_std = np.array(got["mean"]), np.array(got["std"])
        np.testing.assert_array_less(np.abs(got_mean - mean), np.array(bounds["mean_error"]))
        np.testing.assert_array_less(np.abs(got_std - std), np.array(bounds["std_error"]))
    for site in sites:
        used = site.data.info["normalisation"]
        assert used["features"]["method"] == ("declared" if setup == "declared" else "standardised")
        if setup != "declared":
            np.testing.assert_array_equal(used["features"]["mean"], summary["mean"])
        if setup == "regression":  # every site standardised its targets with the same
            assert used["targets"] == sites[0].data.info["normalisation"]["targets"]
        data = torch.cat([site.data.x_train, site.data.x_test])
        lo, hi = site.data.feature_range
        assert lo <= float(data.min()) and hi >= float(data.max())
    decrypted = decrypt_arrays(checkpoint.arrays, 7)
    assert all(np.isfinite(v).all() for v in decrypted.values())


def test_under_secure_aggregation_encrypted_training_still_equals_plaintext(
    tmp_path: Path,
) -> None:
    """Simulated sites with the plaintext baseline: both runs gather the statistics through
    SecAgg+ and the decrypted encrypted model is the plaintext one (to quantisation)."""
    study = tmp_path / "study"
    new_study(study)
    experiment = _experiment(study, secure_aggregation=SECURE)
    config = server_run_config(experiment, tmp_path / "out", **{protocol.RUN_BASELINE: True})
    serve(LocalGrid(client_app.app, SIMULATED, config), config)
    runs = {m: RunStore(tmp_path / "out" / m) for m in protocol.MODES}
    encrypted, plain = (runs[m].load_latest() for m in protocol.MODES)
    assert encrypted is not None and plain is not None and plain.server_round == 2
    _secure_statistics(tmp_path / "out")
    assert runs[protocol.MODE_PLAINTEXT].load_statistics()["secure"]["passes"] == len(PASSES)
    decrypted = decrypt_arrays(encrypted.arrays, load_experiment(experiment).encryption.key_seed)
    for name, weights in plain.arrays.items():
        np.testing.assert_allclose(decrypted[name], weights, rtol=0, atol=5e-5)
    for e, p in zip(encrypted.history, plain.history, strict=True):
        assert e["evaluate"]["loss"] == pytest.approx(p["evaluate"]["loss"], abs=1e-5)


def _query(experiment: Path, marker: str | None, message_type: str) -> Message:
    """One statistics message to site 0 of a secure experiment, outside any SecAgg+ round."""
    config = ConfigRecord({protocol.SERVER_ROUND: 0, protocol.MODE: protocol.MODE_ENCRYPTED})
    if marker is not None:
        config[protocol.STATISTICS_PASS] = marker
    grid = LocalGrid(client_app.app, SIMULATED, server_run_config(experiment, experiment.parent))
    msg = grid.create_message(RecordDict({protocol.CONFIG: config}), message_type, 1000, "0")
    (reply,) = grid.send_and_receive([msg])
    return reply


def test_a_site_under_secure_aggregation_sends_no_statistics_in_clear(tmp_path: Path) -> None:
    study = tmp_path / "study"
    new_study(study)
    experiment = _experiment(study, secure_aggregation=SECURE)
    refused = _query(experiment, None, MessageType.QUERY)
    assert refused.has_error() and "refuses to send its statistics in clear" in (
        refused.error.reason
    )
    unmasked = _query(experiment, "mean", MessageType.TRAIN)
    assert unmasked.has_error() and "refuses to send a statistics pass unmasked" in (
        unmasked.error.reason
    )
    # The query for the passes' shapes gets sizes and the row count only: no values.
    sizes = _query(experiment, protocol.STATISTICS_SHAPE, MessageType.QUERY)
    assert not sizes.has_error() and not sizes.content.array_records
    metrics = dict(sizes.content[protocol.METRICS])
    assert metrics[protocol.STATISTICS_FEATURES] == 8 and metrics[protocol.STATISTICS_TARGETS] == 0
    assert set(metrics) == {
        protocol.NUM_EXAMPLES,
        protocol.STATISTICS_FEATURES,
        protocol.STATISTICS_PER_ROW,
        protocol.STATISTICS_TARGETS,
    }
