"""The ``arrays`` source: a site's data as one ``.npz`` archive with arrays ``x`` and ``y``.

.. code-block:: yaml

    task:
      name: arrays
      data_dir: data/
      options:
        file: scans.npz          # default data.npz, relative to task.data_dir
        kind: classification
        num_classes: 3
        input_shape: [1, 32, 32] # [F] for flat features, [C, H, W] for images
    model: {arch: cnn}

Options (``task.options``):

- ``file`` (default ``data.npz``): a NumPy ``.npz`` archive (``np.savez``) holding ``x``
  (``[N, *input_shape]``, any real numbers) and ``y``; read without pickles.
- ``kind`` (required): ``classification`` (``y``: ``[N]`` integer class indices in
  ``0..num_classes-1``) or ``regression`` (``y``: ``[N]`` or ``[N, num_outputs]``).
- ``num_classes`` (classification, required, >= 2) or ``num_outputs`` (regression,
  default 1).
- ``input_shape`` (required): the shape of one example, checked against ``x``.
- ``test_fraction`` (default 0.2): held-out share of the rows, seeded by the experiment seed.
- ``normalise``: ``auto`` (default: standardise with the statistics of the data, per feature
  for flat inputs, one global mean/std for images), ``none``, or ``{mean: ..., std: ...}``
  (one value, or one per flat feature).

Malformed input is refused with one line (``ValueError``) naming the file, the array and
the (0-based, NumPy) index of the offending entry. ``load_raw``, ``load_task_data(...,
stats=...)`` and the statistics protocol are as for :mod:`federation.tasks.tabular`.
"""

from __future__ import annotations

import zipfile
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
from federation.tasks.tabular import KINDS, data_path

PRIVATE_DATA_DIR = True
"""A study's own arrays: the seeded simulation key draws a warning on them."""

DEFAULTS: dict[str, object] = {
    "file": "data.npz",
    "num_outputs": 1,
    "test_fraction": 0.2,
    "normalise": "auto",
}
"""Defaults of the optional options (``kind``, ``input_shape`` and, for classification,
``num_classes`` have none)."""

REQUIRED = ("kind", "input_shape")
OPTIONS = frozenset({*REQUIRED, "num_classes", *DEFAULTS})


def _fail(name: str, expected: str, value: object) -> ValueError:
    return ValueError(f"arrays: task.options.{name} must be {expected}, got {value!r}")


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, f"an integer >= {minimum}", value)
    return value


@dataclass(frozen=True)
class ArraysSpec:
    """The parsed ``task.options`` (no data read)."""

    file: str
    kind: str
    num_outputs: int  # classes, or regression outputs
    input_shape: tuple[int, ...]
    test_fraction: float
    normalise: object


def parse_options(options: Mapping[str, Any]) -> ArraysSpec:
    """Validate ``task.options`` (without reading data); ``ValueError`` names the option."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(
            f"arrays: unknown task.options {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(OPTIONS))})"
        )
    missing = [name for name in REQUIRED if options.get(name) is None]
    if missing:
        raise ValueError(f"arrays: task.options needs {', '.join(missing)}")
    o = {**DEFAULTS, **options}
    kind = o["kind"]
    if kind not in KINDS:
        raise _fail("kind", " or ".join(KINDS), kind)
    if kind == "classification":
        if o.get("num_classes") is None:
            raise ValueError("arrays: task.options.num_classes is required for classification")
        outputs = _positive("num_classes", o["num_classes"], 2)
        if "num_outputs" in options:
            raise _fail("num_outputs", "absent for classification (num_classes counts)", 0)
    else:
        if o.get("num_classes") is not None:
            raise _fail("num_classes", "absent for regression (use num_outputs)", o["num_classes"])
        outputs = _positive("num_outputs", o["num_outputs"])
    shape = o["input_shape"]
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = [shape]
    if isinstance(shape, str) or not isinstance(shape, Sequence) or len(shape) not in (1, 3):
        raise _fail("input_shape", "[features] or [channels, height, width]", shape)
    dims = tuple(_positive(f"input_shape[{i}]", s) for i, s in enumerate(shape))
    fraction = o["test_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise _fail("test_fraction", "a number in (0, 1)", fraction)
    file = o["file"]
    if not isinstance(file, str | Path) or not str(file).strip():
        raise _fail("file", "a file name", file)
    return ArraysSpec(str(file), kind, outputs, dims, float(fraction), o["normalise"])


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _index(idx: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in idx) + "]"


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found (task.options.file)")
    try:
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError(f"{path}: expected an .npz archive (np.savez) with x and y")
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise ValueError(
                    f"{path}: no array {' or '.join(missing)}; it holds "
                    f"{', '.join(archive.files) or 'nothing'} (expected x and y)"
                )
            arrays = []
            for name in ("x", "y"):
                try:
                    arrays.append(archive[name])
                except ValueError:
                    raise ValueError(
                        f"{path}: array {name} holds Python objects; save numbers "
                        "(np.savez with numeric arrays)"
                    ) from None
            return arrays[0], arrays[1]
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz archive: {exc}") from None
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz archive: {exc}") from None


def _check_x(path: Path, x: np.ndarray, spec: ArraysSpec) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise ValueError(f"{path}: x has dtype {x.dtype}, expected real numbers")
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{path}: x has no rows: a site needs rows to train")
    if tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"{path}: x has shape {tuple(x.shape)}, expected [N, "
            f"{', '.join(map(str, spec.input_shape))}] (task.options.input_shape)"
        )
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            idx = _first(bad)
            raise ValueError(f"{path}: x{_index(idx)} is {x[idx]}, expected a finite number")
    return x


def _check_y(path: Path, y: np.ndarray, n: int, spec: ArraysSpec) -> np.ndarray:
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_) or np.iscomplexobj(y):
        raise ValueError(f"{path}: y has dtype {y.dtype}, expected real numbers")
    if y.ndim == 0 or len(y) != n:
        raise ValueError(f"{path}: y has {0 if y.ndim == 0 else len(y)} rows, x has {n}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y)
        if bad.any():
            idx = _first(bad)
            raise ValueError(f"{path}: y{_index(idx)} is {y[idx]}, expected a finite number")
    if spec.kind == "classification":
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"{path}: y has shape {tuple(y.shape)}, expected [N] class indices")
        bad = (y != np.round(y)) | (y < 0) | (y >= spec.num_outputs)
        if bad.any():
            idx = _first(bad)
            raise ValueError(
                f"{path}: y{_index(idx)} is {y[idx]}, expected a class index in "
                f"0..{spec.num_outputs - 1} (task.options.num_classes {spec.num_outputs})"
            )
        return y.astype(np.int64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != spec.num_outputs:
        raise ValueError(
            f"{path}: y has shape {tuple(y.shape)}, expected [N, {spec.num_outputs}] "
            "(task.options.num_outputs)"
        )
    return y.astype(np.float64)


def load_raw(*, seed: int = 0, data_dir: str | Path | None = None, **options: Any) -> TaskData:
    """The arrays checked and split, unnormalised (regression targets in their units,
    ``target_mean`` 0, ``target_std`` 1)."""
    spec = parse_options(options)
    path = data_path(spec.file, data_dir)
    x, y = _read(path)
    x = _check_x(path, x, spec)
    y = _check_y(path, y, len(x), spec)
    train, test = split_indices(len(x), spec.test_fraction, seed, str(path))
    dtype = torch.float64 if x.dtype == np.float64 else torch.float32
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)
    yt = torch.from_numpy(np.ascontiguousarray(y))
    common: dict[str, Any] = {
        "name": "arrays",
        "kind": spec.kind,
        "x_train": xt[train],
        "y_train": yt[train],
        "x_test": xt[test],
        "y_test": yt[test],
        "feature_range": (float(x.min()), float(x.max())),
        "info": {"source": "arrays", "file": str(path), "input_shape": spec.input_shape},
    }
    if spec.kind == "classification":
        names = tuple(str(i) for i in range(spec.num_outputs))
        return TaskData(**common, num_classes=spec.num_outputs, class_names=names)
    q = spec.num_outputs
    return TaskData(
        **common,
        output_names=tuple(f"y{i}" for i in range(q)),
        output_units=("",) * q,
        target_mean=np.zeros(q),
        target_std=np.ones(q),
        target_range=(float(y[train].min()), float(y[train].max())),
    )


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    stats: DataStats | FeatureStats | None = None,
    **options: Any,
) -> TaskData:
    """The arrays, ready to train: standardised (``normalise`` option) with ``stats`` (the
    federation's; :mod:`federation.tasks.stats`) or the loaded data's own, regression
    targets standardised."""
    spec = parse_options(options)
    raw = load_raw(seed=seed, data_dir=data_dir, **options)
    where = str(data_path(spec.file, data_dir))
    return prepare(raw, stats, declared=spec.normalise, where=where)


def model_io(options: Mapping[str, Any]) -> dict[str, Any]:
    """``in_features`` (flat) or ``input_shape`` (images) and ``num_outputs``, from the
    options alone (no data read)."""
    spec = parse_options({k: v for k, v in options.items() if k not in ("data_dir", "seed")})
    if len(spec.input_shape) == 1:
        return {"in_features": spec.input_shape[0], "num_outputs": spec.num_outputs}
    return {"input_shape": spec.input_shape, "num_outputs": spec.num_outputs}


def _rows(path: Path) -> int:
    """Rows of ``x`` from its header alone (``np.load`` would read the whole array)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape = read(fh)[0]
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz archive with x: {exc}") from None
    if not shape:
        raise ValueError(f"{path}: x has no rows")
    return int(shape[0])


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int] | None:
    """(train, test) row counts; None where the file is not here (an aggregator)."""
    opts = dict(options)
    data_dir = opts.pop("data_dir", None)
    opts.pop("seed", None)
    spec = parse_options(opts)
    path = data_path(spec.file, data_dir)
    if not path.is_file():
        return None
    train, test = split_indices(_rows(path), spec.test_fraction, 0, str(path))
    return len(train), len(test)


def build_model(arch: str = "mlp", **options: Any) -> nn.Module:
    """A generic model (:mod:`federation.tasks.models`); the engine passes ``in_features``
    or ``input_shape`` and ``num_outputs`` from :func:`model_io`."""
    return models.build_model(arch, **options)
