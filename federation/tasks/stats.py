"""Federation statistics of features and targets, and standardisation with them.

The generic sources (``tabular``, ``arrays``) standardise their data. In a simulation the
loaded data is the whole federation's, so its own statistics are the federation's. In a
deployment each site holds only its own rows, so the engine gathers the statistics:

1. every site loads its data unnormalised (the source's ``load_raw``) and sends
   ``data_stats(raw).to_dict()`` (counts, sums, sums of squares, minima and maxima: only
   aggregates; under secure aggregation :mod:`federation.secure_stats` gathers them
   instead, through SecAgg+ passes that the aggregator sees only averaged);
2. the aggregator adds them up: ``sum(DataStats.from_dict(d) for d in replies)``;
3. every site standardises with the sum: ``prepare(raw, federation_stats, declared=...)``
   (or the source's ``load_task_data(..., stats=federation_stats)``).

Feature statistics cover every row a site holds, train and test (features only): the test
features are encrypted too, with shadows drawn uniformly over ``feature_range``, so the range
must cover them. Target statistics (regression) cover the training targets only: they are
the only targets ever encrypted, and test labels must not shape the training.

Variances come from the sums as ``E[x^2] - E[x]^2`` (clamped at 0); that is what additive
aggregation allows, and it is accurate to ~1e-16 x mean^2 / var, ample for standardising.
A feature whose minimum equals its maximum (constant) gets std 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from federation.tasks.base import TaskData

_FIELDS = ("count", "sum", "sum_sq", "min", "max", "present")


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Sufficient statistics of ``count`` rows of ``num_features`` features.

    ``present`` counts each feature's values that are not missing (NaN: a cell the
    ``impute`` policy left to the federation's mean); sums, minima and maxima are over
    those. Additive: ``a + b`` are the statistics of both sets of rows (``sum`` works,
    starting from 0). ``FeatureStats.empty(n)`` is the neutral element.
    """

    count: int
    sum: np.ndarray
    sum_sq: np.ndarray
    min: np.ndarray
    max: np.ndarray
    present: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or int(self.count) != self.count or self.count < 0:
            raise ValueError(f"FeatureStats count must be a non-negative integer: {self.count}")
        object.__setattr__(self, "count", int(self.count))
        if self.present is None:
            object.__setattr__(self, "present", np.full(len(np.ravel(self.sum)), self.count))
        arrays = {}
        for name in _FIELDS[1:]:
            value = np.array(getattr(self, name), dtype=np.float64).reshape(-1)
            value.setflags(write=False)
            arrays[name] = value
            object.__setattr__(self, name, value)
        sizes = {name: len(value) for name, value in arrays.items()}
        if len(set(sizes.values())) != 1 or not sizes["sum"]:
            raise ValueError(f"FeatureStats arrays differ in length or are empty: {sizes}")
        if not (np.isfinite(self.sum).all() and np.isfinite(self.sum_sq).all()):
            raise ValueError("FeatureStats sums must be finite")
        seen = self.present > 0
        if not (np.isfinite(self.min[seen]).all() and np.isfinite(self.max[seen]).all()):
            raise ValueError("FeatureStats min/max must be finite")
        if (self.present < 0).any() or (self.present > self.count).any():
            raise ValueError(f"FeatureStats present counts must lie in 0..{self.count}")

    @classmethod
    def empty(cls, num_features: int) -> FeatureStats:
        """Statistics of no rows (``empty(n) + s == s``)."""
        zeros = np.zeros(num_features)
        inf = np.full(num_features, np.inf)
        return cls(0, zeros, zeros, inf, -inf, zeros)

    @property
    def num_features(self) -> int:
        return len(self.sum)

    def __add__(self, other: object) -> FeatureStats:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self  # sum([...]) starts from 0
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if other.num_features != self.num_features:
            raise ValueError(
                f"cannot add statistics of {self.num_features} and {other.num_features} features"
            )
        return FeatureStats(
            self.count + other.count,
            self.sum + other.sum,
            self.sum_sq + other.sum_sq,
            np.minimum(self.min, other.min),
            np.maximum(self.max, other.max),
            self.present + other.present,
        )

    __radd__ = __add__

    def _require_rows(self) -> None:
        if self.count == 0:
            raise ValueError("statistics of no rows have no mean or std")
        if (self.present == 0).any():
            empty = ", ".join(str(i) for i in np.flatnonzero(self.present == 0))
            raise ValueError(f"feature(s) {empty} have no value in any row: no mean or std")

    @property
    def mean(self) -> np.ndarray:
        self._require_rows()
        return self.sum / self.present

    @property
    def var(self) -> np.ndarray:
        """Population variance (divisor: the present values); 0 for constant features."""
        mean = self.mean
        var = np.maximum(self.sum_sq / self.present - mean * mean, 0.0)
        return np.where(self.max == self.min, 0.0, var)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation; 0 for constant features."""
        return np.sqrt(self.var)

    @property
    def scale(self) -> np.ndarray:
        """What standardisation divides by: ``std``, with 0 replaced by 1."""
        std = self.std
        return np.where(std > 0.0, std, 1.0)

    def to_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Plain numpy arrays (a Flower ``ArrayRecord``'s contents), keys ``prefix + field``."""
        out = {f"{prefix}count": np.array([self.count], dtype=np.int64)}
        for name in _FIELDS[1:]:
            out[prefix + name] = np.array(getattr(self, name), dtype=np.float64)
        return out

    @classmethod
    def from_dict(cls, arrays: Mapping[str, object], prefix: str = "") -> FeatureStats:
        """The inverse of :meth:`to_dict`; refuses missing keys and malformed arrays."""
        missing = [prefix + name for name in _FIELDS if prefix + name not in arrays]
        if missing:
            raise ValueError(f"feature statistics lack {', '.join(missing)}")
        count = np.asarray(arrays[prefix + "count"]).reshape(-1)
        if count.shape != (1,) or not np.issubdtype(count.dtype, np.integer):
            raise ValueError(f"{prefix}count must be one integer, got {count!r}")
        values = {}
        for name in _FIELDS[1:]:
            value = np.asarray(arrays[prefix + name])
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"{prefix}{name} must be a 1-D float array, got {value!r}")
            values[name] = value
        return cls(int(count[0]), **values)


def feature_stats(x: torch.Tensor | np.ndarray) -> FeatureStats:
    """Statistics of the rows of ``x``: ``[N]`` is one feature, ``[N, F]`` F features,
    ``[N, ...]`` one feature per position (reshape to ``[-1, 1]`` for one global one)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(np.float64, copy=False).reshape(len(a), -1)
    if np.isinf(a).any():
        raise ValueError("cannot take statistics of infinite values")
    if not len(a):
        return FeatureStats.empty(a.shape[1])
    seen = ~np.isnan(a)
    inf = np.inf
    return FeatureStats(
        len(a),
        np.where(seen, a, 0.0).sum(axis=0),
        np.where(seen, a * a, 0.0).sum(axis=0),
        np.where(seen, a, inf).min(axis=0),
        np.where(seen, a, -inf).max(axis=0),
        seen.sum(axis=0),
    )


@dataclass(frozen=True, eq=False)
class DataStats:
    """A site's (or the federation's) statistics: features, and regression targets."""

    features: FeatureStats
    targets: FeatureStats | None = None

    def __add__(self, other: object) -> DataStats:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        if not isinstance(other, DataStats):
            return NotImplemented
        if (self.targets is None) != (other.targets is None):
            raise ValueError("cannot add statistics with and without target statistics")
        targets = None
        if self.targets is not None and other.targets is not None:
            targets = self.targets + other.targets
        return DataStats(self.features + other.features, targets)

    __radd__ = __add__

    def to_dict(self) -> dict[str, np.ndarray]:
        """Keys ``features.*`` and (regression) ``targets.*``: one Flower message."""
        out = self.features.to_dict("features.")
        if self.targets is not None:
            out.update(self.targets.to_dict("targets."))
        return out

    @classmethod
    def from_dict(cls, arrays: Mapping[str, object]) -> DataStats:
        known = {f"{part}.{name}" for part in ("features", "targets") for name in _FIELDS}
        unknown = sorted(set(arrays) - known)
        if unknown:
            raise ValueError(f"unknown statistics entries: {', '.join(unknown)}")
        has_targets = any(k.startswith("targets.") for k in arrays)
        targets = FeatureStats.from_dict(arrays, "targets.") if has_targets else None
        return cls(FeatureStats.from_dict(arrays, "features."), targets)


def data_stats(data: TaskData) -> DataStats:
    """The statistics a site contributes: its features (train and test rows; per feature for
    flat ``[N, F]`` inputs, one global value for images ``[N, C, H, W]``) and, for
    regression, its training targets."""
    x = torch.cat([data.x_train, data.x_test])
    flat = x.ndim <= 2
    features = feature_stats(x if flat else x.reshape(-1, 1))
    targets = None
    if data.kind == "regression":
        targets = feature_stats(data.y_train.reshape(len(data.y_train), -1))
    return DataStats(features, targets)


def _declared(
    value: object, num_features: int, where: str
) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """The ``normalise`` option: (method, mean, std); mean/std None for 'from statistics'."""
    if value is None or value == "auto":
        return "standardised", None, None
    if value == "none" or value is False:
        return "none", np.zeros(1), np.ones(1)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{where}: option normalise must be 'auto', 'none' or {{mean: [...], std: [...]}}, "
            f"got {value!r}"
        )
    unknown = sorted(set(value) - {"mean", "std"})
    if unknown or set(value) != {"mean", "std"}:
        raise ValueError(
            f"{where}: option normalise takes exactly 'mean' and 'std', got {sorted(value)}"
        )
    parts = []
    for name in ("mean", "std"):
        raw = value[name]
        items = list(raw) if isinstance(raw, Sequence) and not isinstance(raw, str) else [raw]
        try:
            arr = np.array(items, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: normalise.{name} must be numbers, got {raw!r}") from None
        if arr.ndim != 1 or len(arr) not in (1, num_features) or not np.isfinite(arr).all():
            raise ValueError(
                f"{where}: normalise.{name} must be one finite number or {num_features} "
                f"(one per input feature), got {raw!r}"
            )
        parts.append(arr)
    if (parts[1] <= 0).any():
        raise ValueError(f"{where}: normalise.std must be positive, got {value['std']!r}")
    return "declared", parts[0], parts[1]


def _summary(method: str, stats: FeatureStats, mean: np.ndarray, std: np.ndarray) -> dict:
    return {
        "method": method,
        "rows": stats.count,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def normalise(
    data: TaskData, stats: FeatureStats, *, declared: object = None, where: str | None = None
) -> TaskData:
    """``data`` with x_train/x_test standardised by ``stats`` (per feature, or one global
    mean/std when ``stats`` has one feature); std 0 counts as 1.

    ``declared`` (the ``normalise`` option) overrides: ``{"mean": [...], "std": [...]}``
    (one value, or one per feature) or ``"none"`` (no scaling). ``feature_range`` becomes the
    standardised minimum and maximum of ``stats``, so with federation statistics it covers
    every site's data; data outside it (statistics that do not include this data) is
    refused. ``info["normalisation"]["features"]`` records what was used.
    """
    where = where or data.name
    shape = tuple(data.x_train.shape[1:])
    width = math.prod(shape)
    if stats.num_features not in (1, width):
        raise ValueError(
            f"{where}: statistics of {stats.num_features} features cannot standardise inputs "
            f"of shape {shape}"
        )
    if stats.count == 0:
        raise ValueError(f"{where}: statistics of no rows cannot standardise data")
    if (stats.present == 0).any():
        inputs = tuple(data.info.get("inputs", ()))  # type: ignore[arg-type]
        empty = [
            repr(inputs[i]) if len(inputs) == stats.num_features else f"feature {i}"
            for i in np.flatnonzero(stats.present == 0)
        ]
        raise ValueError(
            f"{where}: column {', '.join(empty)} has no value to impute from (every row of "
            "the federation misses it)"
        )
    method, mean, std = _declared(declared, width, where)
    if mean is None or std is None:
        mean, std = stats.mean, stats.scale
    lo = float(((stats.min - mean) / std).min())
    hi = float(((stats.max - mean) / std).max())

    def apply(x: torch.Tensor, split: str) -> torch.Tensor:
        a = x.detach().cpu().numpy().astype(np.float64).reshape(len(x), -1)
        a = np.where(np.isnan(a), stats.mean, a)  # missing cells: the federation's mean
        out = (a - mean) / std
        if len(out) and not (out.min() >= lo and out.max() <= hi):
            raise ValueError(
                f"{where}: the {split} features lie outside the statistics' range "
                f"[{lo:.6g}, {hi:.6g}] after standardising: the statistics do not cover this data"
            )
        return torch.as_tensor(out.reshape(x.shape), dtype=x.dtype)

    info = dict(data.info)
    norm = dict(info.get("normalisation", {}))  # type: ignore[arg-type]
    norm["features"] = _summary(method, stats, mean, std)
    norm["features"]["per_feature"] = stats.num_features > 1 or len(mean) > 1
    info["normalisation"] = norm
    return replace(
        data,
        x_train=apply(data.x_train, "train"),
        x_test=apply(data.x_test, "test"),
        feature_range=(lo, hi),
        info=info,
    )


def standardise_targets(
    data: TaskData, stats: FeatureStats, *, where: str | None = None
) -> TaskData:
    """A regression task whose targets are in physical units (``target_mean`` 0,
    ``target_std`` 1) standardised by ``stats`` (the federation's training targets):
    ``target_mean``/``target_std``/``target_range`` set, ``info`` recording them."""
    where = where or data.name
    if data.kind != "regression":
        return data
    q = data.y_train.reshape(len(data.y_train), -1).shape[1]
    if stats.num_features != q or stats.count == 0:
        raise ValueError(
            f"{where}: target statistics of {stats.num_features} outputs over {stats.count} "
            f"rows cannot standardise {q} targets"
        )
    if data.target_mean is None or data.target_std is None:
        raise ValueError(f"{where}: a regression task needs target_mean/target_std")
    if np.any(data.target_mean != 0) or np.any(data.target_std != 1):
        raise ValueError(f"{where}: the targets are standardised already")
    mean, std = stats.mean, stats.scale
    lo = float(((stats.min - mean) / std).min())
    hi = float(((stats.max - mean) / std).max())

    def apply(y: torch.Tensor, split: str) -> torch.Tensor:
        a = y.detach().cpu().numpy().astype(np.float64).reshape(len(y), -1)
        out = (a - mean) / std
        if split == "train" and len(out) and not (out.min() >= lo and out.max() <= hi):
            raise ValueError(
                f"{where}: the training targets lie outside the statistics' range: the "
                "target statistics do not cover this data"
            )
        return torch.as_tensor(out.reshape(y.shape), dtype=y.dtype)

    info = dict(data.info)
    norm = dict(info.get("normalisation", {}))  # type: ignore[arg-type]
    norm["targets"] = _summary("standardised", stats, mean, std)
    info["normalisation"] = norm
    return replace(
        data,
        y_train=apply(data.y_train, "train"),
        y_test=apply(data.y_test, "test"),
        target_mean=mean.copy(),
        target_std=std.copy(),
        target_range=(lo, hi),
        info=info,
    )


def prepare(
    data: TaskData,
    stats: DataStats | FeatureStats | None = None,
    *,
    declared: object = None,
    where: str | None = None,
) -> TaskData:
    """Raw (unnormalised) data -> what training takes: features by :func:`normalise`,
    regression targets by :func:`standardise_targets`. ``stats`` None uses the data's own
    (in a simulation: the federation's); a bare :class:`FeatureStats` covers the features
    and the targets then use the data's own."""
    if stats is not None and not isinstance(stats, DataStats | FeatureStats):
        raise TypeError(f"stats must be DataStats or FeatureStats, got {type(stats).__name__}")
    if stats is None:
        stats = data_stats(data)
    elif isinstance(stats, FeatureStats):
        stats = DataStats(stats, data_stats(data).targets)
    out = normalise(data, stats.features, declared=declared, where=where)
    if data.kind == "regression":
        targets = stats.targets if stats.targets is not None else data_stats(data).targets
        assert targets is not None
        out = standardise_targets(out, targets, where=where)
    return out


def split_indices(
    n: int, test_fraction: float, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices, seeded; at least one row each (needs 2 rows)."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float):
        raise ValueError(
            f"{where}: test_fraction must be a number in (0, 1), got {test_fraction!r}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{where}: test_fraction must lie in (0, 1), got {test_fraction!r}")
    if n < 2:
        raise ValueError(
            f"{where}: {n} usable row(s): a site needs at least 2 (one train, one test)"
        )
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
