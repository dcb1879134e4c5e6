"""The generic data sources (``tabular``, ``arrays``), their models and federation statistics.

Small data is generated per test in ``tmp_path``: a CSV with numeric and categorical columns
and missing cells, and ``.npz`` archives. Each source loads it, its generic model trains
encrypted exactly as in plaintext (float64, 1e-9), every malformed input is refused with one
line naming file, row or column, and standardising every site with the summed federation
statistics equals standardising the pooled data.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from federation.config import experiment_from_dict
from federation.experiment import initial_model, site_data
from federation.nn.check import FLOAT64_ABS_TOL, compare_training
from federation.nn.convert import to_encrypted
from federation.nn.session import SessionConfig
from federation.tasks import arrays, models, tabular
from federation.tasks.base import default_site_partition
from federation.tasks.stats import (
    DataStats,
    FeatureStats,
    data_stats,
    feature_stats,
    normalise,
    prepare,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only contend


# -- generated data ----------------------------------------------------------------------

HEADER = ["id", "age", "sbp", "smoker", "ward", "outcome", "los", "cost"]
SMOKER = ["never", "former", "current"]


def _rows(n: int, seed: int = 0) -> list[list[str]]:
    """Patients whose outcome depends on age, blood pressure and smoking; ~8 % cells missing."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = rng.uniform(20, 90)
        sbp = rng.normal(130, 15)
        smoker = int(rng.integers(3))
        risk = 0.05 * (age - 55) + 0.04 * (sbp - 130) + 0.8 * smoker - 0.8
        outcome = "died" if risk + rng.normal(0, 0.5) > 0 else "survived"
        los = 2 + 0.1 * age + 1.5 * smoker + rng.normal(0, 1)
        cost = 1000 + 50 * los + rng.normal(0, 100)
        cells = [str(i), f"{age:.1f}", f"{sbp:.0f}", SMOKER[smoker], "AB"[i % 2], outcome]
        cells += [f"{los:.2f}", f"{cost:.0f}"]
        if i % 13 == 3:
            cells[2] = ""  # missing blood pressure
        if i % 17 == 5:
            cells[3] = "NA"  # missing smoking status
        rows.append(cells)
    return rows


def _write(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


CLASSIFY = {
    "file": "patients.csv",
    "features": ["age", "sbp", "smoker", "ward"],
    "categorical": {"smoker": SMOKER, "ward": ["A", "B"]},
    "target": "outcome",
    "kind": "classification",
    "classes": ["survived", "died"],
    "missing": "impute",
}
REGRESS = {
    **{k: v for k, v in CLASSIFY.items() if k != "classes"},
    "target": ["los", "cost"],
    "kind": "regression",
    "missing": "drop",
}


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "patients.csv", _rows(60))
    return tmp_path


# -- models --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "io", "options"),
    [
        ("mlp", {"in_features": 5}, {"activation": a, "batch_norm": bn, "dropout": d})
        for a, bn, d in [
            ("relu", True, 0.2),
            ("tanh", False, 0.0),
            ("gelu", True, 0.0),
            ("silu", False, 0.1),
            ("sigmoid", False, 0.0),
        ]
    ]
    + [
        ("mlp", {"in_features": 5}, {"hidden": [7, 3]}),
        ("mlp", {"input_shape": (2, 3, 3)}, {"depth": 1}),
        ("linear", {"in_features": 5}, {}),
        ("linear", {"input_shape": (1, 4, 4)}, {}),
        ("cnn", {"input_shape": (1, 9, 7)}, {}),
        ("cnn", {"input_shape": (3, 1, 1)}, {"channels": 4, "batch_norm": False, "dropout": 0.5}),
    ],
)
def test_generic_models_convert_and_run(arch, io, options) -> None:
    model = models.build_model(arch, num_outputs=3, **io, **options).double()
    twin = to_encrypted(model, None, dtype=torch.float64)
    assert twin is not None
    shape = (io["in_features"],) if "in_features" in io else io["input_shape"]
    model.eval()
    assert model(torch.zeros(4, *shape, dtype=torch.float64)).shape == (4, 3)


def test_model_options_are_checked() -> None:
    with pytest.raises(TypeError, match="unknown model.options for 'mlp': width"):
        models.build_model("mlp", in_features=3, num_outputs=2, width=5)
    with pytest.raises(TypeError, match="'linear': hidden .it takes none"):
        models.build_model("linear", in_features=3, num_outputs=2, hidden=5)
    with pytest.raises(ValueError, match="unknown model.arch 'resnet'"):
        models.build_model("resnet", in_features=3, num_outputs=2)
    with pytest.raises(ValueError, match="activation must be one of relu"):
        models.build_model("mlp", in_features=3, num_outputs=2, activation="softsign")
    with pytest.raises(ValueError, match="depth is 3 but hidden lists 2 widths"):
        models.build_model("mlp", in_features=3, num_outputs=2, hidden=[4, 4], depth=3)
    with pytest.raises(ValueError, match="'cnn' needs image inputs"):
        models.build_model("cnn", in_features=3, num_outputs=2)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        models.build_model("mlp", in_features=3, num_outputs=2, dropout=1.0)
    with pytest.raises(ValueError, match="exactly one of in_features"):
        models.build_model("mlp", num_outputs=2)


# -- tabular -------------------------------------------------------------------------------


def test_tabular_classification_loads_encoded_and_standardised(csv_dir: Path) -> None:
    data = tabular.load_task_data(seed=1, data_dir=csv_dir, **CLASSIFY)
    io = tabular.model_io(CLASSIFY)
    assert io == {"in_features": 2 + 3 + 2, "num_outputs": 2}
    assert data.x_train.shape == (48, 7) and data.x_test.shape == (12, 7)
    assert data.num_classes == 2 and data.class_names == ("survived", "died")
    x = torch.cat([data.x_train, data.x_test])
    raw = tabular.load_raw(seed=1, data_dir=csv_dir, **CLASSIFY)
    nan = torch.isnan(torch.cat([raw.x_train, raw.x_test]))  # left to the mean
    assert nan.sum(0).tolist() == [0, 5, 4, 4, 4, 0, 0]
    assert torch.allclose(x.mean(0), torch.zeros(7, dtype=x.dtype), atol=1e-12)
    assert (x[nan] == 0).all()  # the (federation's) mean, standardised
    for j in range(7):
        observed = x[~nan[:, j], j]
        assert float(observed.std(unbiased=False)) == pytest.approx(1.0, abs=1e-12)
    lo, hi = data.feature_range
    assert lo == pytest.approx(float(x.min())) and hi == pytest.approx(float(x.max()))
    missing = data.info["missing"]
    assert missing["cells_imputed"] == {"sbp": 5, "smoker": 4}  # i % 13 == 3, i % 17 == 5
    assert missing["rows_imputed"] == 9 and missing["rows_dropped_missing_target"] == 0
    assert data.info["inputs"][2:5] == ("smoker=never", "smoker=former", "smoker=current")
    assert tabular.split_sizes({**CLASSIFY, "data_dir": csv_dir}) == (48, 12)
    assert tabular.split_sizes({**CLASSIFY, "data_dir": csv_dir / "elsewhere"}) is None
    # a missing categorical cell becomes the value frequencies (the one-hot columns' means)
    imputed = torch.cat([data.x_train, data.x_test])[nan[:, 2]][:, 2:5]
    used = data.info["normalisation"]["features"]
    scale, mean = torch.as_tensor(used["std"])[2:5], torch.as_tensor(used["mean"])[2:5]
    frequencies = imputed * scale + mean
    assert len(frequencies) == 4 and torch.allclose(frequencies.sum(1), torch.ones(4).double())


def test_tabular_regression_targets_in_physical_units(csv_dir: Path) -> None:
    data = tabular.load_task_data(seed=0, data_dir=csv_dir, **REGRESS)
    raw = tabular.load_raw(seed=0, data_dir=csv_dir, **REGRESS)
    assert data.info["missing"]["rows_dropped_missing_features"] == 9
    assert len(data.y_train) + len(data.y_test) == 51
    assert data.output_names == ("los", "cost")
    y = raw.y_train.numpy()
    np.testing.assert_allclose(data.target_mean, y.mean(0), rtol=1e-12)
    np.testing.assert_allclose(data.target_std, y.std(0), rtol=1e-9)
    np.testing.assert_allclose(data.y_train.numpy() * data.target_std + data.target_mean, y)
    lo, hi = data.target_range
    assert lo == pytest.approx(float(data.y_train.min())) and hi == float(data.y_train.max())
    metrics = data.metrics(data.y_test, data.y_test)
    assert metrics["r2_min"] == 1.0 and metrics["mae_cost"] == 0.0
    assert tabular.model_io(REGRESS) == {"in_features": 7, "num_outputs": 2}


def test_tabular_declared_normalisation(csv_dir: Path) -> None:
    declared = {**CLASSIFY, "normalise": {"mean": [50.0], "std": [10.0]}}
    data = tabular.load_task_data(seed=0, data_dir=csv_dir, **declared)
    raw = tabular.load_raw(seed=0, data_dir=csv_dir, **CLASSIFY)
    seen = ~torch.isnan(raw.x_train)
    expected = (raw.x_train - 50.0) / 10.0
    torch.testing.assert_close(data.x_train[seen], expected[seen], rtol=0, atol=1e-15)
    assert data.info["normalisation"]["features"]["method"] == "declared"
    assert data.feature_range[0] == pytest.approx(
        float(torch.cat([data.x_train, data.x_test]).min())
    )
    plain = tabular.load_task_data(seed=0, data_dir=csv_dir, **{**CLASSIFY, "normalise": "none"})
    assert torch.equal(plain.x_train[seen], raw.x_train[seen])
    with pytest.raises(ValueError, match="normalise.std must be one finite number or 7"):
        tabular.load_task_data(
            seed=0, data_dir=csv_dir, **{**CLASSIFY, "normalise": {"mean": 0, "std": [1, 2]}}
        )


def _train_check(key, data, arch: str = "mlp", **options) -> None:
    """A few SGD steps of the generic model, encrypted and plaintext: equal in float64."""
    torch.manual_seed(0)
    io = {"in_features": data.x_train.shape[1]} if data.x_train.ndim == 2 else {}
    if not io:
        io = {"input_shape": tuple(data.x_train.shape[1:])}
    outputs = data.num_classes or data.y_train.shape[1]
    model = models.build_model(arch, num_outputs=outputs, **io, **options)
    classify = data.kind == "classification"
    cmp = compare_training(
        model,
        data.x_train[:32],
        data.y_train[:32],
        key=key,
        loss="cross_entropy" if classify else "mse",
        config=SessionConfig("sgd", {"lr": 0.1, "momentum": 0.9}, batch_size=8, epochs=2, seed=3),
        num_classes=data.num_classes,
        feature_range=data.feature_range,
        target_range=data.target_range,
        x_eval=data.x_test,
    )
    assert cmp.state.abs <= FLOAT64_ABS_TOL and cmp.outputs.abs <= FLOAT64_ABS_TOL, cmp
    assert cmp.passed


@pytest.mark.parametrize(
    ("options", "model"),
    [
        (CLASSIFY, {"hidden": 8, "batch_norm": True, "dropout": 0.1}),
        (REGRESS, {"hidden": [8, 6], "activation": "tanh"}),
    ],
    ids=["classification-bn-dropout", "regression-tanh"],
)
def test_tabular_trains_encrypted_like_plaintext(key, csv_dir: Path, options, model) -> None:
    data = tabular.load_task_data(seed=0, data_dir=csv_dir, **options)
    _train_check(key, data, **model)


# -- malformed tables ----------------------------------------------------------------------


def _refused(tmp_path: Path, rows, options=None, header=HEADER, name="patients.csv") -> str:
    path = tmp_path / name
    if rows is not None:
        _write(path, rows, header)
    with pytest.raises(ValueError) as info:
        tabular.load_task_data(seed=0, data_dir=tmp_path, **{**CLASSIFY, **(options or {})})
    message = str(info.value)
    assert "\n" not in message
    return message


def _cell(rows, row: int, column: str, value: str):
    """``rows`` with the cell at spreadsheet row ``row`` (header = 1) replaced."""
    rows = [list(r) for r in rows]
    rows[row - 2][HEADER.index(column)] = value
    return rows


MALFORMED = {
    "missing file": (None, {}, "patients.csv: file not found"),
    "missing column": (
        _rows(6),
        {"features": ["age", "weight"], "categorical": {}},
        "patients.csv: no column 'weight' (task.options.features); row 1 has 'id'",
    ),
    "missing target column": (_rows(6), {"target": "death"}, "no column 'death'"),
    "non-numeric": (
        _cell(_rows(6), 4, "age", "sixty"),
        {},
        "patients.csv: row 4, column 'age': expected a number ('.' as decimal point",
    ),
    "decimal comma": (_cell(_rows(6), 3, "age", "61,5"), {}, "row 3, column 'age': expected"),
    "infinite": (_cell(_rows(6), 5, "sbp", "1e400"), {}, "row 5, column 'sbp': expected a finite"),
    "unknown class": (
        _cell(_rows(6), 6, "outcome", "discharged"),
        {},
        "row 6, column 'outcome': unknown value 'discharged'; expected one of 'survived', "
        "'died' (task.options.classes)",
    ),
    "unknown category": (
        _cell(_rows(6), 2, "ward", "ICU"),
        {},
        "row 2, column 'ward': unknown value 'ICU'; expected one of 'A', 'B' "
        "(task.options.categorical.ward)",
    ),
    "missing under error": (
        _cell(_rows(3), 3, "age", ""),
        {"missing": "error"},
        "row 3, column 'age': missing value ''; set task.options.missing to drop or impute",
    ),
    "missing class under error": (
        _cell(_rows(6), 3, "outcome", "NA"),
        {"missing": "error"},
        "row 3, column 'outcome': missing class",
    ),
    "empty after dropping": (
        [_cell(_rows(3), r, "sbp", "?")[r - 2] for r in (2, 3, 4)],
        {"missing": "drop"},
        "no rows left after dropping 3 row(s) with missing values",
    ),
    "no rows": ([], {}, "patients.csv: no data rows under the header"),
    "one row": (_rows(1), {}, "1 usable row(s): a site needs at least 2"),
    "short row": ([*_rows(3), ["1", "2"]], {}, "row 5 has 2 cells, expected 8"),
    "column never present": (
        [_cell(_rows(3), r, "age", "")[r - 2] for r in (2, 3, 4)],
        {},
        "column 'age' has no value to impute from",
    ),
    "duplicate header": (_rows(3), {}, "row 1 names column 'age' twice"),
    "no header": ([], {}, "row 1: expected a header row"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tables_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    rows, options, expected = MALFORMED[case]
    header = HEADER
    if case == "duplicate header":
        header = [*HEADER[:-1], "age"]
    if case == "no header":
        (tmp_path / "patients.csv").write_text("\n\n", encoding="utf-8")
        rows = None
    message = _refused(tmp_path, rows, options, header)
    assert expected in message
    assert str(tmp_path / "patients.csv") in message


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "latin.csv").write_bytes(
        b"age,sbp,smoker,ward,outcome\n50,120,never,A,died\n\xe9\xff,1\n"
    )
    msg = _refused(tmp_path, None, {"file": "latin.csv"})
    assert "latin.csv: not utf-8 text" in msg and "task.options.encoding" in msg
    (tmp_path / "table.xlsx").write_bytes(b"PK")
    assert "expected a .csv or .parquet file" in _refused(tmp_path, None, {"file": "table.xlsx"})
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    msg = _refused(tmp_path, None, {"file": "t.parquet"})
    if "pyarrow or fastparquet" in msg:  # a bare install
        assert "t.parquet: reading Parquet needs pyarrow or fastparquet: `pip install" in msg
    else:
        assert "t.parquet: not a readable Parquet file" in msg


def test_semicolon_tables_and_cp1252(tmp_path: Path) -> None:
    text = "age;sbp;smoker;ward;outcome\n50;120;never;A;died\n61.5;;former;B;survived\n"
    text += "70;140;current;B;died\n"
    options = {
        **CLASSIFY,
        "file": "p.csv",
        "delimiter": ";",
        "encoding": "cp1252",
        "categorical": {"smoker": SMOKER, "ward": ["A", "Bé"]},
    }
    (tmp_path / "p.csv").write_bytes(text.replace("B", "Bé").encode("cp1252"))
    raw = tabular.load_raw(seed=0, data_dir=tmp_path, **options)
    assert len(raw.y_train) + len(raw.y_test) == 3
    assert raw.info["missing"]["cells_imputed"] == {"sbp": 1}
    (tmp_path / "p.tsv").write_text(text.replace(";", "\t"), encoding="utf-8")
    tsv = tabular.load_raw(seed=0, data_dir=tmp_path, **{**CLASSIFY, "file": "p.tsv"})
    torch.testing.assert_close(
        torch.cat([tsv.x_train, tsv.x_test])[:, :2],
        torch.cat([raw.x_train, raw.x_test])[:, :2],
        rtol=0,
        atol=0,
        equal_nan=True,
    )


def test_option_errors_name_the_option() -> None:
    cases = [
        ({"nonsense": 1}, "unknown task.options nonsense"),
        ({"kind": "survival"}, "task.options.kind must be classification or regression"),
        ({"classes": None}, "task.options.classes is required for classification"),
        ({"classes": ["a"]}, "at least 2 class values"),
        ({"classes": ["a", "a"]}, "task.options.classes must be distinct values"),
        ({"categorical": {"height": [1, 2]}}, "columns listed in features, got 'height'"),
        ({"target": "age"}, "columns that are not features, got 'age'"),
        ({"missing": "zero"}, "task.options.missing must be error or drop or impute"),
        ({"test_fraction": 1.0}, "task.options.test_fraction must be a number in (0, 1)"),
        ({"file": None}, "task.options needs file"),
        ({"encoding": "klingon"}, "task.options.encoding must be a text encoding"),
    ]
    for change, expected in cases:
        with pytest.raises(ValueError) as info:
            tabular.model_io({**CLASSIFY, **change})
        assert expected in str(info.value), (change, str(info.value))


def test_declared_values_match_numbers_and_booleans(tmp_path: Path) -> None:
    rows = [["1", "2", "yes", "0"], ["2", "3", "No", "1.0"], ["3", "4", "yes", "1"]]
    _write(tmp_path / "b.csv", rows, ["a", "b", "flag", "y"])
    options = {
        "file": "b.csv",
        "features": ["a", "b", "flag"],
        "categorical": {"flag": [False, True]},  # YAML reads yes/no as booleans
        "target": "y",
        "kind": "classification",
        "classes": [0, 1],
        "test_fraction": 0.34,
    }
    raw = tabular.load_raw(seed=0, data_dir=tmp_path, **options)
    x = torch.cat([raw.x_train, raw.x_test])
    y = torch.cat([raw.y_train, raw.y_test])
    order = x[:, 0].argsort()
    assert y[order].tolist() == [0, 1, 1]
    assert x[order, 2:].tolist() == [[0, 1], [1, 0], [0, 1]]
    assert raw.class_names == ("0", "1")


_NUMERIC_CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["", " ", "NA", "nan", "None", "?", "1,5", "1e400", "0x10", "١٢", "1_0"]),
    st.text(min_size=1, max_size=12),
)


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cell=_NUMERIC_CELLS, category=st.one_of(st.sampled_from(SMOKER), st.text(max_size=8)))
def test_fuzzed_cells_load_exactly_or_are_refused_by_name(
    tmp_path: Path, cell: str, category: str
) -> None:
    rows = _cell(_cell(_rows(4), 3, "sbp", cell), 4, "smoker", category)
    path = _write(tmp_path / "patients.csv", rows)
    try:
        raw = tabular.load_raw(seed=0, data_dir=tmp_path, **{**CLASSIFY, "test_fraction": 0.25})
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{path}: ")
        assert ("row 3, column 'sbp'" in message) or ("row 4, column 'smoker'" in message)
        return
    x = torch.cat([raw.x_train, raw.x_test])
    row = x[:, 0].tolist().index(float(rows[1][1]))  # find row 3 by its age
    stripped = cell.strip()
    if stripped.lower() in tabular.MISSING_TOKENS:  # left to the federation's mean
        assert math.isnan(float(x[row, 1]))
    else:
        assert float(x[row, 1]) == float(stripped) and math.isfinite(float(stripped))


# -- arrays --------------------------------------------------------------------------------


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


IMAGES = {"kind": "classification", "num_classes": 3, "input_shape": [1, 6, 6]}
FLAT = {"kind": "regression", "num_outputs": 2, "input_shape": [5], "file": "flat.npz"}


@pytest.fixture
def npz_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 50)
    x = rng.random((50, 1, 6, 6)) + y[:, None, None, None] * 0.3
    _npz(tmp_path / "data.npz", x=x * 255.0, y=y)
    xf = rng.normal(3.0, 2.0, (40, 5))
    yf = np.stack([xf @ rng.normal(size=5), np.sin(xf[:, 0]) * 10 + 100], axis=1)
    _npz(tmp_path / "flat.npz", x=xf, y=yf)
    return tmp_path


def test_arrays_images_and_flat(npz_dir: Path, key) -> None:
    images = arrays.load_task_data(seed=0, data_dir=npz_dir, **IMAGES)
    assert images.x_train.shape == (40, 1, 6, 6) and images.num_classes == 3
    assert arrays.model_io(IMAGES) == {"input_shape": (1, 6, 6), "num_outputs": 3}
    everything = torch.cat([images.x_train, images.x_test])
    assert abs(float(everything.mean())) < 1e-12 and float(everything.std(unbiased=False)) == (
        pytest.approx(1.0)
    )
    assert images.info["normalisation"]["features"]["per_feature"] is False
    assert arrays.split_sizes({**IMAGES, "data_dir": npz_dir}) == (40, 10)
    assert arrays.split_sizes({**IMAGES, "data_dir": npz_dir / "none"}) is None
    _train_check(key, images, "cnn", channels=[3, 4])

    flat = arrays.load_task_data(seed=0, data_dir=npz_dir, **FLAT)
    assert arrays.model_io(FLAT) == {"in_features": 5, "num_outputs": 2}
    np.testing.assert_allclose(torch.cat([flat.x_train, flat.x_test]).mean(0), 0, atol=1e-12)
    assert flat.target_mean is not None and flat.target_mean[1] == pytest.approx(100, abs=10)
    _train_check(key, flat, "linear")


def test_malformed_arrays_are_refused(tmp_path: Path) -> None:
    x, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
    flat = {"kind": "classification", "num_classes": 2, "input_shape": [3]}
    cases = {
        "missing": (None, "data.npz: file not found"),
        "no y": ({"x": x}, "data.npz: no array y; it holds x (expected x and y)"),
        "shape": ({"x": np.zeros((4, 2)), "y": y}, "x has shape (4, 2), expected [N, 3]"),
        "nan": (
            {"x": np.where(np.eye(4, 3) > 0, np.nan, 0.0), "y": y},
            "x[0, 0] is nan, expected a finite number",
        ),
        "class": ({"x": x, "y": np.array([0, 1, 2, 0])}, "y[2] is 2, expected a class index"),
        "fraction": ({"x": x, "y": np.array([0, 0.5, 1, 0])}, "y[1] is 0.5"),
        "rows": ({"x": x, "y": y[:3]}, "y has 3 rows, x has 4"),
        "empty": ({"x": np.zeros((0, 3)), "y": y[:0]}, "x has no rows"),
        "objects": ({"x": np.array([{}, 1], dtype=object), "y": y}, "x holds Python objects"),
        "text": ({"x": np.array([["a"] * 3] * 4), "y": y}, "x has dtype <U1"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / "data.npz"
        path.unlink(missing_ok=True)
        if content is not None:
            np.savez(path, **content)
        with pytest.raises(ValueError) as info:
            arrays.load_raw(seed=0, data_dir=tmp_path, **flat)
        message = str(info.value)
        assert expected in message and str(path) in message and "\n" not in message, name
    (tmp_path / "data.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        arrays.load_raw(seed=0, data_dir=tmp_path, **flat)
    for change, expected in [
        ({"input_shape": [2, 3]}, "input_shape must be [features] or [channels, height"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"num_outputs": 2}, "num_outputs must be absent for classification"),
        ({"kind": "regression"}, "num_classes must be absent for regression"),
    ]:
        with pytest.raises(ValueError, match=expected.replace("[", r"\[")):
            arrays.model_io({**flat, **change})


# -- federation statistics -----------------------------------------------------------------


def test_feature_stats_are_additive() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(1000.0, 3.0, (101, 4))
    x[:, 3] = 7.0  # a constant feature: std 0, standardised by 1
    shares = np.split(x, [10, 55])
    total = sum(feature_stats(torch.from_numpy(s)) for s in shares)
    pooled = feature_stats(x)
    assert isinstance(total, FeatureStats) and total.count == pooled.count == 101
    for name in ("sum", "sum_sq"):
        np.testing.assert_allclose(getattr(total, name), getattr(pooled, name), rtol=1e-14)
    np.testing.assert_array_equal(total.min, x.min(0))
    np.testing.assert_array_equal(total.max, x.max(0))
    np.testing.assert_allclose(total.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(total.std[:3], x.std(0)[:3], rtol=1e-8)
    assert total.std[3] == 0.0 and total.scale[3] == 1.0
    assert (FeatureStats.empty(4) + pooled).count == 101
    back = FeatureStats.from_dict(pooled.to_dict())
    for name in ("sum", "sum_sq", "min", "max"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pooled, name))
    with pytest.raises(ValueError, match="cannot add statistics of 4 and 2 features"):
        _ = pooled + feature_stats(x[:, :2])
    with pytest.raises(ValueError, match="feature statistics lack features.sum_sq"):
        DataStats.from_dict({k: v for k, v in DataStats(pooled).to_dict().items() if "sq" not in k})
    with pytest.raises(ValueError, match="no mean or std"):
        _ = FeatureStats.empty(2).mean


@pytest.mark.parametrize("options", [CLASSIFY, REGRESS], ids=["classification", "regression"])
def test_federation_statistics_normalise_like_the_pooled_data(csv_dir: Path, options) -> None:
    raw = tabular.load_raw(seed=2, data_dir=csv_dir, **options)
    sites = default_site_partition(raw, num_sites=3, scheme="iid", seed=2)
    message = {k: v.copy() for k, v in sum(data_stats(s) for s in sites).to_dict().items()}
    federation = DataStats.from_dict(message)  # what the aggregator sends back
    pooled = default_site_partition(
        tabular.load_task_data(seed=2, data_dir=csv_dir, **options),
        num_sites=3,
        scheme="iid",
        seed=2,
    )
    for site, expected in zip(sites, pooled, strict=True):
        got = prepare(site, federation)
        for name in ("x_train", "x_test", "y_train", "y_test"):
            torch.testing.assert_close(
                getattr(got, name), getattr(expected, name), rtol=1e-12, atol=1e-12
            )
        assert got.feature_range == pytest.approx(expected.feature_range, rel=1e-12)
        if options is REGRESS:
            np.testing.assert_allclose(got.target_mean, expected.target_mean, rtol=1e-12)
            np.testing.assert_allclose(got.target_std, expected.target_std, rtol=1e-12)
            assert got.target_range == pytest.approx(expected.target_range, rel=1e-12)
        # the site's own statistics differ, and they do not cover another site's data
        own = prepare(site)
        assert not torch.allclose(own.x_train, expected.x_train)
    with pytest.raises(ValueError, match="the statistics do not cover this data"):
        normalise(sites[0], data_stats(sites[1]).features)


def test_engine_builds_the_model_from_model_io(csv_dir: Path) -> None:
    """Until the registry names 'tabular', a config reaches it as a task module."""
    options = {k: v for k, v in CLASSIFY.items() if k != "categorical"}
    options["features"] = ["age", "sbp"]
    config = experiment_from_dict(
        {
            "name": "tabular-smoke",
            "task": {
                "module": "federation.tasks.tabular",
                "data_dir": str(csv_dir),
                "options": options,
            },
            "model": {"arch": "mlp", "options": {"hidden": 4, "depth": 1}},
            "sites": {"count": 2},
        },
        base=csv_dir,
    )
    model = initial_model(config)
    assert isinstance(model[0], nn.Linear) and model[0].in_features == 2
    data = site_data(config, 1)
    assert model(data.x_train.to(next(model.parameters()).dtype)).shape[1] == 2
