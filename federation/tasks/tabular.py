"""The ``tabular`` source: a hospital's own table (CSV, or Parquet) described in YAML alone.

.. code-block:: yaml

    task:
      name: tabular
      data_dir: data/            # the site's folder; file is relative to it
      options:
        file: patients.csv
        features: [age, sbp, smoker, ward]
        categorical: {smoker: [never, former, current], ward: [A, B]}
        target: outcome
        kind: classification
        classes: [survived, died]
        missing: impute          # error (default) | drop | impute
        test_fraction: 0.2
    model: {arch: mlp, options: {hidden: 32}}

Options (``task.options``):

- ``file`` (required): a ``.csv`` (or ``.tsv``, ``.txt``) file, or ``.parquet``/``.pq`` when
  pyarrow or fastparquet is installed; relative to ``task.data_dir`` (else to the working
  directory).
- ``features`` (required): the input columns, in order. Numeric columns must hold numbers
  (``.`` decimal point, no thousands separators); columns named in ``categorical`` are
  one-hot encoded in place from their declared vocabulary.
- ``target`` (required): the target column, or a list of columns (multi-output regression).
- ``kind`` (required): ``classification`` or ``regression``.
- ``classes`` (classification, required): the class values of the target column, in order
  (class ``i`` is the ``i``-th; at least 2).
- ``categorical``: ``{column: [value, ...]}``.
- ``missing``: what to do with a missing cell (empty, ``NA``, ``N/A``, ``NaN``, ``null``,
  ``None``, ``?``; a declared class or vocabulary value always wins): ``error`` (default:
  refuse, naming the cell), ``drop`` the row, or ``impute`` the column's mean over the
  federation (the statistics round sums every site's values present; in a simulation, the
  whole table's; for a categorical column the mean of its one-hot encoding, i.e. the value
  frequencies); ``load_raw`` leaves such cells NaN. A row with a missing target is dropped
  under ``drop`` and ``impute``. ``info["missing"]`` counts what was done.
- ``test_fraction`` (default 0.2): held-out share of the rows, a permutation seeded by the
  experiment seed (at least one train and one test row).
- ``normalise``: features are standardised (mean 0, std 1 per column; one-hot columns
  too) with the statistics of the data (``auto``, the default), or with declared values
  ``{mean: [...], std: [...]}`` (one value, or one per input after one-hot encoding), or
  not at all (``none``). Regression targets are always standardised (metrics are reported
  in the target's units).
- ``delimiter`` (default ``,``; a tab for ``.tsv``) and ``encoding`` (default ``utf-8``;
  a byte-order mark is skipped) of the CSV file.

Every malformed input is refused with one line (``ValueError``) naming the file, the row (as
a spreadsheet numbers it: the header is row 1) or column, and what was expected.

The engine-facing API, beyond the task protocol (:mod:`federation.tasks`):

- :func:`load_raw` gives the data encoded and split but not standardised (targets in their
  own units, ``target_mean`` 0 and ``target_std`` 1);
- :func:`load_task_data` takes ``stats`` (a :class:`~federation.tasks.stats.DataStats`, the
  federation's sum of every site's :func:`~federation.tasks.stats.data_stats` of its raw
  data) and standardises with it; without ``stats`` it uses the loaded data's own, which in
  a simulation (all the federation's rows) are the federation's. See
  :mod:`federation.tasks.stats` for the gathering protocol.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.tasks import models
from federation.tasks.base import TaskData
from federation.tasks.stats import DataStats, FeatureStats, prepare, split_indices

PRIVATE_DATA_DIR = True
"""Real patient tables: the seeded simulation key draws a warning on them."""

KINDS = ("classification", "regression")
MISSING_POLICIES = ("error", "drop", "impute")
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
"""Cells read as missing (case-insensitive, surrounding blanks ignored)."""

DEFAULTS: dict[str, object] = {
    "categorical": {},
    "missing": "error",
    "test_fraction": 0.2,
    "normalise": "auto",
    "delimiter": ",",
    "encoding": "utf-8",
}
"""Defaults of the optional options (``file``, ``features``, ``target``, ``kind`` and, for
classification, ``classes`` have none)."""

REQUIRED = ("file", "features", "target", "kind")
OPTIONS = frozenset({*REQUIRED, "classes", *DEFAULTS})

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_BOOL_WORDS = {True: ("true", "yes", "on"), False: ("false", "no", "off")}


def _fail(name: str, expected: str, value: object) -> ValueError:
    return ValueError(f"tabular: task.options.{name} must be {expected}, got {value!r}")


def _names(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise _fail(name, "a column name or a non-empty list of column names", value)
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(name, "column names (text)", value)
    names = tuple(v.strip() for v in value)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _fail(name, "distinct column names", f"{', '.join(twice)} twice")
    return names


class _Vocabulary:
    """Declared values of a class or categorical column, matched against cells: text
    exactly (blanks stripped), numbers numerically (``1`` matches ``1.0``), YAML booleans
    by true/yes/on and false/no/off (any case)."""

    def __init__(self, name: str, values: object) -> None:
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) < 1:
            raise _fail(name, "a non-empty list of values", values)
        self.values = tuple(values)
        self.text: dict[str, int] = {}
        self.numbers: dict[float, int] = {}
        self.words: dict[str, int] = {}
        for i, v in enumerate(self.values):
            if isinstance(v, bool):
                slots = [(self.words, w) for w in _BOOL_WORDS[v]]
            elif isinstance(v, int | float) and math.isfinite(v):
                slots = [(self.numbers, float(v))]
            elif isinstance(v, str):
                slots = [(self.text, v.strip())]
            else:
                raise _fail(name, "a list of text, number or boolean values", values)
            for table, k in slots:
                if k in table:
                    raise _fail(name, "distinct values", f"{v!r} twice")
                table[k] = i  # type: ignore[index]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(v) if not isinstance(v, bool) else str(v).lower() for v in self.values)

    def index(self, cell: object) -> int | None:
        if isinstance(cell, bool):
            return self.words.get(str(cell).lower())
        if isinstance(cell, int | float | np.number):
            return self.numbers.get(float(cell))
        text = str(cell).strip()
        if text in self.text:
            return self.text[text]
        if text.lower() in self.words:
            return self.words[text.lower()]
        if _NUMBER.fullmatch(text):
            return self.numbers.get(float(text))
        return None

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class TabularSpec:
    """The parsed ``task.options`` (no data read)."""

    file: str
    features: tuple[str, ...]
    targets: tuple[str, ...]
    kind: str
    classes: _Vocabulary | None
    categorical: Mapping[str, _Vocabulary]
    missing: str
    test_fraction: float
    normalise: object
    delimiter: str
    encoding: str

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model's inputs: numeric columns, and ``column=value`` per one-hot entry."""
        names: list[str] = []
        for column in self.features:
            vocab = self.categorical.get(column)
            names += [column] if vocab is None else [f"{column}={v}" for v in vocab.labels]
        return tuple(names)

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else len(self.targets)


def parse_options(options: Mapping[str, Any]) -> TabularSpec:
    """Validate ``task.options`` (without reading data); ``ValueError`` names the option."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(
            f"tabular: unknown task.options {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(OPTIONS))})"
        )
    missing = [name for name in REQUIRED if options.get(name) is None]
    if missing:
        raise ValueError(f"tabular: task.options needs {', '.join(missing)}")
    o = {**DEFAULTS, **options}
    file = o["file"]
    if not isinstance(file, str | Path) or not str(file).strip():
        raise _fail("file", "a file name", file)
    kind = o["kind"]
    if kind not in KINDS:
        raise _fail("kind", " or ".join(KINDS), kind)
    features = _names("features", o["features"])
    targets = _names("target", o["target"])
    both = sorted(set(features) & set(targets))
    if both:
        raise _fail("target", "columns that are not features", ", ".join(both))
    classes = None
    if kind == "classification":
        if len(targets) != 1:
            raise _fail("target", "one column for classification", list(targets))
        if o.get("classes") is None:
            raise ValueError(
                f"tabular: task.options.classes is required for classification: the list of "
                f"class values of column {targets[0]!r}, in order"
            )
        classes = _Vocabulary("classes", o["classes"])
        if len(classes) < 2:
            raise _fail("classes", "at least 2 class values", o["classes"])
    elif o.get("classes") is not None:
        raise _fail("classes", "absent for regression", o["classes"])
    raw_categorical = o["categorical"]
    if not isinstance(raw_categorical, Mapping):
        raise _fail("categorical", "a mapping {column: [values...]}", raw_categorical)
    categorical = {}
    for column, vocab in raw_categorical.items():
        if column not in features:
            raise _fail("categorical", "columns listed in features", column)
        categorical[column] = _Vocabulary(f"categorical.{column}", vocab)
    if o["missing"] not in MISSING_POLICIES:
        raise _fail("missing", " or ".join(MISSING_POLICIES), o["missing"])
    fraction = o["test_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise _fail("test_fraction", "a number in (0, 1)", fraction)
    if not 0 < fraction < 1:
        raise _fail("test_fraction", "a number in (0, 1)", fraction)
    delimiter = o["delimiter"]
    if "delimiter" not in options and str(file).lower().endswith(".tsv"):
        delimiter = "\t"
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '\r\n"':
        raise _fail("delimiter", "one character such as ',' or ';'", delimiter)
    encoding = o["encoding"]
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise _fail("encoding", "a text encoding such as utf-8 or cp1252", encoding) from None
    return TabularSpec(
        file=str(file),
        features=features,
        targets=targets,
        kind=kind,
        classes=classes,
        categorical=categorical,
        missing=o["missing"],
        test_fraction=float(fraction),
        normalise=o["normalise"],
        delimiter=delimiter,
        encoding=str(encoding),
    )


def data_path(file: str, data_dir: str | Path | None) -> Path:
    """``file`` under ``data_dir`` (absolute paths stay as they are)."""
    path = Path(file).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = Path(data_dir).expanduser() / path
    return path


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    path: Path
    columns: tuple[str, ...]
    rows: list[tuple[str, Sequence[object]]]  # (label such as "row 5", cells)
    blank_rows: int


def _short(cell: object) -> str:
    text = repr(cell)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_csv(path: Path, spec: TabularSpec) -> _Table:
    encoding = "utf-8-sig" if codecs.lookup(spec.encoding).name == "utf-8" else spec.encoding
    rows: list[tuple[str, Sequence[object]]] = []
    blank = 0
    try:
        with path.open(encoding=encoding, newline="") as fh:
            reader = csv.reader(fh, delimiter=spec.delimiter)
            try:
                header = next(reader, None)
                if header is None or not any(h.strip() for h in header):
                    raise ValueError(f"{path}: row 1: expected a header row naming the columns")
                columns = tuple(h.strip() for h in header)
                for number, row in enumerate(reader, start=2):
                    if not any(c.strip() for c in row):
                        blank += 1
                        continue
                    if len(row) != len(columns):
                        raise ValueError(
                            f"{path}: row {number} has {len(row)} cells, expected "
                            f"{len(columns)} (one per header column)"
                        )
                    rows.append((f"row {number}", row))
            except csv.Error as exc:
                raise ValueError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not {spec.encoding} text (byte {exc.start}); set task.options.encoding "
            "(e.g. cp1252)"
        ) from None
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found (task.options.file)") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return _Table(path, columns, rows, blank)


def _read_parquet(path: Path) -> _Table:
    if not path.is_file():
        raise ValueError(f"{path}: file not found (task.options.file)")
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow.parquet as pq  # type: ignore[import-not-found]

        try:
            table = pq.read_table(path).to_pydict()
        except Exception as exc:  # pyarrow's own error types
            raise ValueError(f"{path}: not a readable Parquet file: {exc}") from None
        columns = tuple(str(c).strip() for c in table)
        cells = list(zip(*table.values(), strict=True)) if table else []
    elif importlib.util.find_spec("fastparquet") is not None:
        import fastparquet  # type: ignore[import-not-found]

        try:
            frame = fastparquet.ParquetFile(str(path)).to_pandas()
        except Exception as exc:
            raise ValueError(f"{path}: not a readable Parquet file: {exc}") from None
        columns = tuple(str(c).strip() for c in frame.columns)
        cells = [tuple(r) for r in frame.itertuples(index=False, name=None)]
    else:
        raise ValueError(
            f"{path}: reading Parquet needs pyarrow or fastparquet: `pip install pyarrow` "
            "(or save the table as CSV)"
        )
    rows = [(f"record {i + 1}", row) for i, row in enumerate(cells)]
    return _Table(path, columns, rows, 0)


def _read(path: Path, spec: TabularSpec) -> _Table:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        table = _read_parquet(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        table = _read_csv(path, spec)
    else:
        raise ValueError(f"{path}: expected a .csv or .parquet file (task.options.file)")
    seen: set[str] = set()
    for column in table.columns:
        if column in seen:
            raise ValueError(f"{path}: row 1 names column {column!r} twice")
        seen.add(column)
    for option, names in (("features", spec.features), ("target", spec.targets)):
        for name in names:
            if name not in seen:
                header = ", ".join(repr(c) for c in table.columns[:20])
                more = ", ..." if len(table.columns) > 20 else ""
                raise ValueError(
                    f"{path}: no column {name!r} (task.options.{option}); row 1 has {header}{more}"
                )
    return table


# -- cells -----------------------------------------------------------------------------

_MISSING = object()


def _is_missing(cell: object) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float | np.floating) and math.isnan(cell):
        return True
    return isinstance(cell, str) and cell.strip().lower() in MISSING_TOKENS


def _number(cell: object, where: str) -> float | object:
    """A finite float, or _MISSING."""
    if _is_missing(cell):
        return _MISSING
    if isinstance(cell, bool | np.bool_):
        return float(cell)
    if isinstance(cell, int | float | np.number):
        value = float(cell)
    else:
        text = str(cell).strip()
        if not _NUMBER.fullmatch(text):
            raise ValueError(
                f"{where}: expected a number ('.' as decimal point, no thousands separators), "
                f"got {_short(cell)}"
            )
        value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {_short(cell)}")
    return value


def _category(cell: object, vocab: _Vocabulary, where: str, option: str) -> int | object:
    """The vocabulary index of ``cell``, or _MISSING (a declared value wins over missing)."""
    index = vocab.index(cell)
    if index is not None:
        return index
    if _is_missing(cell):
        return _MISSING
    raise ValueError(
        f"{where}: unknown value {_short(cell)}; expected one of "
        f"{', '.join(repr(v) for v in vocab.values)} (task.options.{option})"
    )


# -- loading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoded:
    x: np.ndarray  # [N, in_features] float64, unnormalised
    y: np.ndarray  # [N] int64 class indices, or [N, q] float64 targets
    report: dict[str, object]


def _encode(table: _Table, spec: TabularSpec) -> _Encoded:
    path = table.path
    if not table.rows:
        raise ValueError(f"{path}: no data rows under the header: a site needs rows to train")
    index = {c: i for i, c in enumerate(table.columns)}
    allow_missing = spec.missing != "error"
    hint = "; set task.options.missing to drop or impute"
    targets: list[object] = []
    features: list[list[object]] = []
    dropped_target = dropped_features = 0
    for label, row in table.rows:
        here = f"{path}: {label}"
        # targets
        if spec.classes is not None:
            column = spec.targets[0]
            value: object = _category(
                row[index[column]], spec.classes, f"{here}, column {column!r}", "classes"
            )
            if value is _MISSING and not allow_missing:
                raise ValueError(f"{here}, column {column!r}: missing class{hint}")
            target = value
        else:
            values = []
            for column in spec.targets:
                v = _number(row[index[column]], f"{here}, column {column!r}")
                if v is _MISSING and not allow_missing:
                    raise ValueError(f"{here}, column {column!r}: missing target value{hint}")
                values.append(v)
            target = _MISSING if any(v is _MISSING for v in values) else values
        # features
        cells: list[object] = []
        for column in spec.features:
            where = f"{here}, column {column!r}"
            vocab = spec.categorical.get(column)
            if vocab is None:
                v = _number(row[index[column]], where)
            else:
                v = _category(row[index[column]], vocab, where, f"categorical.{column}")
            if v is _MISSING and not allow_missing:
                raise ValueError(f"{where}: missing value {_short(row[index[column]])}{hint}")
            cells.append(v)
        if target is _MISSING:
            dropped_target += 1
            continue
        if spec.missing == "drop" and any(v is _MISSING for v in cells):
            dropped_features += 1
            continue
        targets.append(target)
        features.append(cells)
    if not features:
        raise ValueError(
            f"{path}: no rows left after dropping {dropped_target + dropped_features} row(s) "
            f"with missing values (task.options.missing: {spec.missing})"
        )

    columns: list[np.ndarray] = []
    imputed_cells: dict[str, int] = {}
    imputed_rows = np.zeros(len(features), dtype=bool)
    for j, column in enumerate(spec.features):
        present = np.array([row[j] is not _MISSING for row in features])
        vocab = spec.categorical.get(column)
        if vocab is None:
            block = np.array([[row[j] if present[i] else 0.0] for i, row in enumerate(features)])
        else:
            block = np.zeros((len(features), len(vocab)))
            for i, row in enumerate(features):
                if present[i]:
                    block[i, row[j]] = 1.0  # type: ignore[index]
        if not present.all():  # filled with the federation's mean when normalised
            block[~present] = np.nan
            imputed_cells[column] = int((~present).sum())
            imputed_rows |= ~present
        columns.append(block)
    x = np.concatenate(columns, axis=1)
    if spec.classes is not None:
        y = np.array(targets, dtype=np.int64)
    else:
        y = np.array(targets, dtype=np.float64).reshape(len(targets), len(spec.targets))
    report: dict[str, object] = {
        "policy": spec.missing,
        "rows_read": len(table.rows),
        "rows_dropped_missing_target": dropped_target,
        "rows_dropped_missing_features": dropped_features,
        "rows_imputed": int(imputed_rows.sum()),
        "cells_imputed": imputed_cells,
    }
    if table.blank_rows:
        report["blank_rows_skipped"] = table.blank_rows
    return _Encoded(x, y, report)


def _spec_and_path(
    options: Mapping[str, Any], data_dir: str | Path | None
) -> tuple[TabularSpec, Path]:
    spec = parse_options(options)
    return spec, data_path(spec.file, data_dir)


def load_raw(*, seed: int = 0, data_dir: str | Path | None = None, **options: Any) -> TaskData:
    """The table encoded (one-hot, imputed) and split, features in their own units and
    regression targets unstandardised (``target_mean`` 0, ``target_std`` 1)."""
    spec, path = _spec_and_path(options, data_dir)
    encoded = _encode(_read(path, spec), spec)
    train, test = split_indices(len(encoded.y), spec.test_fraction, seed, str(path))
    x = torch.from_numpy(encoded.x)
    y = torch.from_numpy(encoded.y)
    info: dict[str, object] = {
        "source": "tabular",
        "file": str(path),
        "inputs": spec.input_names,
        "missing": encoded.report,
    }
    common: dict[str, Any] = {
        "name": "tabular",
        "kind": spec.kind,
        "x_train": x[train],
        "y_train": y[train],
        "x_test": x[test],
        "y_test": y[test],
        "feature_range": (float(np.nanmin(encoded.x)), float(np.nanmax(encoded.x))),
        "info": info,
    }
    if spec.classes is not None:
        return TaskData(**common, num_classes=len(spec.classes), class_names=spec.classes.labels)
    q = len(spec.targets)
    y_train = encoded.y[train]
    return TaskData(
        **common,
        output_names=spec.targets,
        output_units=("",) * q,
        target_mean=np.zeros(q),
        target_std=np.ones(q),
        target_range=(float(y_train.min()), float(y_train.max())),
    )


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    stats: DataStats | FeatureStats | None = None,
    **options: Any,
) -> TaskData:
    """The table, ready to train: features standardised (``normalise`` option) and
    regression targets standardised, with ``stats`` (the federation's, gathered from every
    site's raw data; see :mod:`federation.tasks.stats`) or, without them, the loaded data's
    own statistics."""
    spec, path = _spec_and_path(options, data_dir)
    raw = load_raw(seed=seed, data_dir=data_dir, **options)
    return prepare(raw, stats, declared=spec.normalise, where=str(path))


def model_io(options: Mapping[str, Any]) -> dict[str, int]:
    """The model's input width and output count, from the options alone (no data read)."""
    spec = parse_options({k: v for k, v in options.items() if k not in ("data_dir", "seed")})
    return {"in_features": len(spec.input_names), "num_outputs": spec.num_outputs}


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int] | None:
    """(train, test) row counts; None where the file is not here (an aggregator)."""
    opts = dict(options)
    data_dir = opts.pop("data_dir", None)
    opts.pop("seed", None)
    spec, path = _spec_and_path(opts, data_dir)
    if not path.is_file():
        return None
    raw = load_raw(data_dir=data_dir, **opts)
    return len(raw.y_train), len(raw.y_test)


def build_model(arch: str = "mlp", **options: Any) -> nn.Module:
    """A generic model (:mod:`federation.tasks.models`); the engine passes ``in_features``
    and ``num_outputs`` from :func:`model_io`."""
    return models.build_model(arch, **options)
