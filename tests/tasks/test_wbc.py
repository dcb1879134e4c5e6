"""WBC task: simulator physiology and numerics, dataset generator and cache, task glue."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from federation.tasks import wbc
from federation.tasks.base import TaskData

# Coarse integration keeps the generator tests fast; the physiology tests use the defaults.
FAST = {"n_beats": 30, "steps_per_beat": 200}


@pytest.fixture(scope="module")
def baseline() -> wbc.Hemodynamics:
    return wbc.simulate({})


@pytest.fixture(scope="module")
def population() -> tuple[dict[str, np.ndarray], wbc.Hemodynamics]:
    rng = np.random.default_rng(7)
    params = {name: rng.uniform(lo, hi, 32) for name, (lo, hi) in wbc.INPUT_RANGES.items()}
    return params, wbc.simulate(params, **FAST)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> TaskData:
    return wbc.load_task_data(seed=1, n_samples=48, cache_dir=tmp_path_factory.mktemp("wbc"))


def test_baseline_is_normal_physiology(baseline: wbc.Hemodynamics) -> None:
    assert 115 <= baseline.output("SBP")[0] <= 135
    assert 70 <= baseline.output("DBP")[0] <= 90
    assert baseline.output("DBP")[0] < baseline.output("MAP")[0] < baseline.output("SBP")[0]
    assert 55 <= baseline.output("EF")[0] <= 70
    assert 4.5 <= baseline.output("CO")[0] <= 6.5
    assert 90 <= baseline.output("EDV")[0] <= 150


def test_blood_volume_is_conserved(
    baseline: wbc.Hemodynamics, population: tuple[dict[str, np.ndarray], wbc.Hemodynamics]
) -> None:
    params, sim = population
    assert baseline.initial_volume[0] == pytest.approx(wbc.BASELINE["blood_volume"])
    np.testing.assert_allclose(sim.initial_volume, params["blood_volume"])
    np.testing.assert_allclose(baseline.volumes.sum(axis=0), baseline.initial_volume, atol=1e-8)
    np.testing.assert_allclose(sim.volumes.sum(axis=0), sim.initial_volume, atol=1e-8)


def test_reaches_periodic_steady_state(baseline: wbc.Hemodynamics) -> None:
    change = baseline.residual[:, 0]
    assert change[-1] < 1e-6 < wbc.STEADY_STATE_TOL
    assert change[-1] < 1e-6 * change[0]
    assert np.all(np.diff(change[10:]) < 0)  # settles monotonically once past the transient


def test_samples_are_independent_of_their_batch(
    population: tuple[dict[str, np.ndarray], wbc.Hemodynamics],
) -> None:
    params, sim = population
    again = wbc.simulate(params, **FAST)
    np.testing.assert_array_equal(again.outputs, sim.outputs)
    single = wbc.simulate({name: value[3] for name, value in params.items()}, **FAST)
    np.testing.assert_array_equal(single.outputs[0], sim.outputs[3])


def test_simulate_rejects_unknown_parameters() -> None:
    with pytest.raises(ValueError, match="unknown"):
        wbc.simulate({"heart_rate": 60.0})


def test_physiological_filter(baseline: wbc.Hemodynamics) -> None:
    good = baseline.outputs[0]
    outputs = np.stack([good, good, good, good])
    outputs[1, wbc.OUTPUT_NAMES.index("SBP")] = 260.0
    outputs[2, wbc.OUTPUT_NAMES.index("EF")] = np.nan
    residual = np.array([0.0, 0.0, 0.0, 1.0])  # the last one has not settled
    np.testing.assert_array_equal(wbc.physiological(outputs, residual), [True, False, False, False])


def test_generator_is_deterministic() -> None:
    first = wbc.generate_dataset(6, seed=3, **FAST)
    second = wbc.generate_dataset(6, seed=3, **FAST)
    other = wbc.generate_dataset(6, seed=4, **FAST)
    np.testing.assert_array_equal(first.inputs, second.inputs)
    np.testing.assert_array_equal(first.outputs, second.outputs)
    assert not np.array_equal(first.inputs, other.inputs)
    assert first.input_names == tuple(wbc.INPUT_RANGES)


def test_generator_rejects_non_physiological_samples() -> None:
    # Failing hearts and hypovolaemia: many draws cannot give a patient at rest.
    ranges = dict(wbc.INPUT_RANGES, lv_emax=(0.3, 4.0), blood_volume=(4000.0, 5300.0))
    data = wbc.generate_dataset(12, seed=0, ranges=ranges, **FAST)
    assert data.inputs.shape == (12, len(ranges))
    assert data.n_rejected > 0
    assert data.n_simulated - data.n_rejected >= 12
    for j, name in enumerate(wbc.OUTPUT_NAMES):
        lo, hi = wbc.PHYSIOLOGICAL_LIMITS[name]
        assert np.all((data.outputs[:, j] >= lo) & (data.outputs[:, j] <= hi)), name
    lo, hi = np.array(list(ranges.values())).T
    assert np.all((data.inputs >= lo) & (data.inputs <= hi))


def test_generator_gives_up_without_physiological_samples() -> None:
    ranges = dict(wbc.INPUT_RANGES, lv_emax=(0.1, 0.2))  # no heart this weak keeps a pressure
    with pytest.raises(RuntimeError, match="physiological"):
        wbc.generate_dataset(2, seed=0, ranges=ranges, **FAST)


def test_cache_round_trips_and_is_keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = wbc.generate_dataset(5, seed=2, cache_dir=tmp_path, **FAST)
    (path,) = tmp_path.iterdir()  # one file, no temporary left behind
    assert path.suffix == ".npz"

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached dataset was simulated again")

    with monkeypatch.context() as patch:
        patch.setattr(wbc, "simulate", fail)
        loaded = wbc.generate_dataset(5, seed=2, cache_dir=tmp_path, **FAST)
    np.testing.assert_array_equal(loaded.inputs, made.inputs)
    np.testing.assert_array_equal(loaded.outputs, made.outputs)
    assert loaded.input_names == made.input_names
    assert (loaded.n_simulated, loaded.n_rejected) == (made.n_simulated, made.n_rejected)

    wbc.generate_dataset(5, seed=3, cache_dir=tmp_path, progress=True, **FAST)
    wbc.generate_dataset(6, seed=2, cache_dir=tmp_path, **FAST)
    monkeypatch.setattr(wbc, "VERSION", "wbc-test")  # a new simulator version misses the cache
    wbc.generate_dataset(5, seed=2, cache_dir=tmp_path, **FAST)
    assert len(list(tmp_path.iterdir())) == 4


def test_corrupt_cache_is_regenerated(tmp_path: Path) -> None:
    made = wbc.generate_dataset(4, seed=5, cache_dir=tmp_path, **FAST)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:200])  # truncated, as by a full disk or a bad copy
    again = wbc.generate_dataset(4, seed=5, cache_dir=tmp_path, **FAST)
    np.testing.assert_array_equal(again.outputs, made.outputs)
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["outputs"], made.outputs)


def test_defaults_match_the_signatures() -> None:
    loader = inspect.signature(wbc.load_task_data).parameters
    assert {name: loader[name].default for name in loader} == {
        name: wbc.DEFAULTS[name] for name in loader
    }
    assert wbc.DEFAULTS["arch"] == inspect.signature(wbc.build_model).parameters["arch"].default
    recipe = wbc.RECIPES[str(wbc.DEFAULTS["arch"])]
    assert all(wbc.DEFAULTS[name] == value for name, value in recipe.items())


def test_task_data(task: TaskData) -> None:
    assert task.kind == "regression"
    assert (len(task.x_train), len(task.x_test)) == (38, 10)
    assert task.x_train.dtype == task.y_train.dtype == torch.float32
    assert task.x_train.shape[1] == len(wbc.INPUT_RANGES)
    assert task.y_train.shape[1] == len(task.output_names) == len(task.output_units) == 8
    lo, hi = task.feature_range
    assert lo <= float(task.x_train.min()) and float(task.x_train.max()) <= hi
    y_train = task.y_train.double().numpy()  # (torch.testing costs seconds to import)
    np.testing.assert_allclose(y_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y_train.std(axis=0), 1.0, atol=1e-5)
    assert task.target_range is not None
    assert task.target_range[0] <= float(task.y_train.min())
    assert float(task.y_train.max()) <= task.target_range[1]
    metrics = task.metrics(task.y_test, task.y_test)
    assert metrics["r2_min"] == pytest.approx(1.0)
    assert metrics["mae_SBP"] == pytest.approx(0.0, abs=1e-4)
    assert task.target_mean is not None
    assert 80 <= task.target_mean[wbc.OUTPUT_NAMES.index("SBP")] <= 200


def _row_ids(whole: torch.Tensor, parts: list[torch.Tensor]) -> list[list[int]]:
    """Row indices in ``whole`` of each part's rows (rows are distinct continuous draws)."""
    index = {row.tobytes(): i for i, row in enumerate(whole.numpy())}
    return [[index[row.tobytes()] for row in part.numpy()] for part in parts]


@pytest.mark.parametrize("scheme", ["iid", "non-iid"])
def test_partitions_are_deterministic_disjoint_and_covering(task: TaskData, scheme: str) -> None:
    sites = wbc.site_partition(task, num_sites=3, scheme=scheme, seed=0)
    again = wbc.site_partition(task, num_sites=3, scheme=scheme, seed=0)
    assert [site.info["partition"]["site"] for site in sites] == [0, 1, 2]
    for split in ("x_train", "y_train", "x_test", "y_test"):
        for site, same in zip(sites, again, strict=True):
            assert torch.equal(getattr(site, split), getattr(same, split))
    for split in ("x_train", "x_test"):
        ids = _row_ids(getattr(task, split), [getattr(site, split) for site in sites])
        flat = sorted(i for part in ids for i in part)
        assert flat == list(range(len(getattr(task, split))))  # disjoint and covering
        assert min(len(part) for part in ids) >= len(flat) // 3


def test_non_iid_sites_treat_different_populations(task: TaskData) -> None:
    column = list(task.info["input_names"]).index(wbc.PARTITION_FEATURE)
    sites = wbc.site_partition(task, num_sites=3, scheme="non-iid", seed=0)
    bands = [site.x_train[:, column] for site in sites]
    for older, younger in zip(bands, bands[1:], strict=False):
        assert float(older.max()) <= float(younger.min())  # stiffer arteries at lower sites
    iid = wbc.site_partition(task, num_sites=3, scheme="iid", seed=0)
    spread = [float(site.x_train[:, column].std()) for site in iid]
    assert max(float(band.std()) for band in bands) < min(spread)


def test_partition_rejects_bad_arguments(task: TaskData) -> None:
    with pytest.raises(ValueError, match="scheme"):
        wbc.site_partition(task, num_sites=2, scheme="dirichlet", seed=0)
    with pytest.raises(ValueError, match="sites"):
        wbc.site_partition(task, num_sites=100, scheme="non-iid", seed=0)


def test_model_uses_only_supported_layers() -> None:
    model = wbc.build_model()
    supported = (nn.Linear, nn.Tanh, nn.Sigmoid, nn.Softplus)
    assert all(isinstance(layer, supported) for layer in model)
    assert [layer.out_features for layer in model if isinstance(layer, nn.Linear)] == [64, 64, 8]
    assert model(torch.zeros(5, len(wbc.INPUT_RANGES))).shape == (5, len(wbc.OUTPUT_NAMES))
    small = wbc.build_model(hidden=16, depth=1, activation="softplus")
    assert [type(layer) for layer in small] == [nn.Linear, nn.Softplus, nn.Linear]
    with pytest.raises(ValueError, match="arch"):
        wbc.build_model("cnn")
    with pytest.raises(ValueError, match="activation"):
        wbc.build_model(activation="relu")
    with pytest.raises(TypeError, match="width"):
        wbc.build_model(width=8)
