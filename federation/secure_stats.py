"""Federation statistics under secure aggregation: passes that SecAgg+ only ever averages.

SecAgg+ (see :mod:`federation.secagg`) sums quantised values in ``[-c, c]`` and the
aggregator learns only each round's weighted average ``sum_i n_i v_i / sum_i n_i``. A site's
raw sums, extremes and squares do not fit that (unbounded, and a maximum is not a sum), so
the statistics of :mod:`federation.tasks.stats` are gathered in four passes. Each site's
weight ``n_i`` is its number of rows (train and test), and each entry it sends is divided by
its own count of values, so every average is a federation quantity; each pass fixes public
scales for the next, so that every entry lies in ``[-1, 1]``:

1. ``magnitude``: per feature, a one-hot of the power-of-two bucket ``2^e >= max |x|`` of the
   site's values (``e`` in ``[E_MIN, E_MAX]``; a zero maximum counts as ``2^E_MIN``). A
   bucket whose average exceeds the round's error bound holds some site, and the highest
   one gives the scale ``K >= |x|`` of every value in the federation.
2. ``mean``: ``sum(x / K)``, the count of present (non-NaN) values and of rows: the
   federation's mean ``mu`` and counts (the averages times the federation's value count,
   which the aggregator knows from the sites' clear example counts, rounded to integers).
3. ``spread``: one-hots of the buckets of the site's largest ``x - mu`` and ``mu - x``: the
   interval ``[mu - K_lo, mu + K_hi]`` covers every value (the standardised minimum and
   maximum that shadows and the range check use), and ``K2 = max(K_lo, K_hi)``.
4. ``moment``: ``sum(t)`` and ``sum(t^2)`` with ``t = (x - mu) / K2``: the mean
   ``mu + K2 E[t]`` and variance ``K2^2 (E[t^2] - E[t]^2)``.

Regression targets (training rows only) go through the same passes beside the features.

What the aggregator learns: averages only, never a site's own numbers. For each feature,
the share of the federation's rows held by sites whose largest ``|x|`` (pass 1) and largest
deviation above and below the mean (pass 3) fall in each power-of-two bucket; the mean,
present count, variance and cover above; and each site's row count (in clear, as in every
round). Every site learns the resulting statistics, as without secure aggregation.

Accuracy: each average is within the round's SecAgg+ bound ``b`` (:func:`~federation.secagg.
error_bound`), so with ``P`` present values of ``U`` (``e = b U / P``) the mean is within
``K2 e`` and the variance within ``K2^2 (e (1 + 2|E[t]|) + e^2)`` of the pooled values, plus
float round-off (:attr:`SecureStatistics.accuracy` has them per feature). Counts are exact
while ``b U < 1/2`` (beyond, ``e`` grows by their error); a bucket is found while every
site's share of the rows exceeds ``2b`` (checked: the passes refuse otherwise). A variance
within its bound of 0 counts as a constant feature (std 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from federation import protocol
from federation.tasks.base import TaskData
from federation.tasks.stats import DataStats, FeatureStats

E_MIN, E_MAX = -60, 70
"""The power-of-two buckets of a site's largest value: below ``2^E_MIN`` counts as that
bucket (only precision is lost); beyond ``2^E_MAX`` a site refuses."""
EXPONENTS = np.arange(E_MIN, E_MAX + 2)
"""Bucket ``j`` holds maxima in ``(2^(e-1), 2^e]``, ``e = EXPONENTS[j]``; the last bucket
(``2^(E_MAX+1)``) only for deviations from the mean, which may reach ``2K``."""
BUCKETS = len(EXPONENTS)
PASSES = ("magnitude", "mean", "spread", "moment")
PARTS = ("features", "targets")
CONSTANT = 1e-13
"""Float round-off floor of a variance, relative to ``K2^2``: a variance below it (and its
quantisation bound) is a constant feature. Real data of ``P`` values has variance at least
``K2^2 / 16P`` (one value at distance ``K2 / 2``), far above it."""
_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class StatisticsShape:
    """What the aggregator must know to size the passes: feature count, values per row and
    feature (1 for a table; an image's pixels for its one global feature), target outputs
    (0: no target statistics). Public: fixed by the experiment."""

    features: int
    per_row: int
    targets: int

    def __post_init__(self) -> None:
        for name in ("features", "per_row", "targets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"statistics shape: {name} must be an integer >= 0: {value!r}")
        if self.features < 1 or self.per_row < 1:
            raise ValueError(f"statistics shape needs features and values per row: {self}")

    def to_metrics(self) -> dict[str, int]:
        """The shape as a site reports it in clear (its reply's metrics)."""
        return {
            protocol.STATISTICS_FEATURES: self.features,
            protocol.STATISTICS_PER_ROW: self.per_row,
            protocol.STATISTICS_TARGETS: self.targets,
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> StatisticsShape:
        """The inverse of :meth:`to_metrics`; ValueError for a missing or non-integer entry."""
        values = {}
        for name, key in (
            ("features", protocol.STATISTICS_FEATURES),
            ("per_row", protocol.STATISTICS_PER_ROW),
            ("targets", protocol.STATISTICS_TARGETS),
        ):
            value = metrics.get(key)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value != int(value):
                raise ValueError(f"statistics shape: {key} must be an integer, got {value!r}")
            values[name] = int(value)
        return cls(**values)


def _lengths(shape: StatisticsShape) -> dict[str, int]:
    parts = {"features": shape.features}
    if shape.targets:
        parts["targets"] = shape.targets
    return parts


def _check_pass(name: str) -> None:
    if name not in PASSES:
        raise ValueError(f"unknown statistics pass {name!r}; expected one of {', '.join(PASSES)}")


def vector_length(name: str, width: int) -> int:
    """Entries a pass sends per part of ``width`` features."""
    _check_pass(name)
    blocks = {"magnitude": width * BUCKETS, "mean": 2 * width + 1, "spread": 2 * width * BUCKETS}
    return blocks.get(name, 2 * width)  # moment: 2 * width


def _exponent(peak: np.ndarray) -> np.ndarray:
    """The smallest ``e >= E_MIN`` with ``peak <= 2^e`` (``peak >= 0`` finite)."""
    frac, exp = np.frexp(peak)
    exp = exp - (frac == 0.5)  # an exact power of two is its own bucket
    return np.maximum(np.where(peak > 0, exp, E_MIN), E_MIN)


def _one_hot(peak: np.ndarray, seen: np.ndarray, what: str, limit: int) -> np.ndarray:
    """[width, BUCKETS]: 1 at each seen feature's bucket; ValueError beyond ``2^limit``."""
    exp = _exponent(np.where(seen, peak, 0.0))
    over = seen & (exp > limit)
    if over.any():
        i = int(np.flatnonzero(over)[0])
        raise ValueError(
            f"{what} {i} reaches {float(peak[i]):.4g}, beyond the 2^{limit} that secure "
            "statistics handle: rescale that column"
        )
    out = np.zeros((len(peak), BUCKETS))
    rows = np.flatnonzero(seen)
    out[rows, exp[rows] - E_MIN] = 1.0
    return out


def _parameter(parameters: Mapping[str, object], name: str, width: int) -> np.ndarray:
    """A public parameter of the pass: ``width`` finite numbers (scales positive)."""
    raw = parameters.get(name)
    try:
        value = np.array(raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        value = np.zeros(0)
    if len(value) != width or not np.isfinite(value).all():
        raise ValueError(f"statistics pass parameter {name!r} must be {width} finite numbers")
    if name != "mean" and (value <= 0).any():
        raise ValueError(f"statistics pass parameter {name!r} must be positive")
    return value


def _within_one(t: np.ndarray, seen: np.ndarray, name: str) -> None:
    """A site refuses rather than send an entry the announced scale does not cover."""
    outside = seen & ~(np.abs(t) <= 1.0)
    if outside.any():
        i = int(np.flatnonzero(outside.any(axis=0))[0])
        raise ValueError(
            f"the federation's {name} scale does not cover this site's value(s) of column {i}: "
            "the statistics passes are inconsistent"
        )


def _vector(
    name: str, values: np.ndarray, divisor: int, parameters: Mapping[str, object], what: str
) -> np.ndarray:
    """One part's entries for pass ``name`` (see the module docstring), each in [-1, 1]."""
    width = values.shape[1]
    seen = ~np.isnan(values)
    any_seen = seen.any(axis=0)
    if name == "magnitude":
        peak = np.where(seen, np.abs(values), 0.0).max(axis=0, initial=0.0)
        return _one_hot(peak, any_seen, what, E_MAX).reshape(-1)
    if name == "mean":
        t = values / _parameter(parameters, "scale", width)
        _within_one(t, seen, "magnitude")
        sums = np.where(seen, t, 0.0).sum(axis=0) / divisor
        present = seen.sum(axis=0) / divisor
        return np.concatenate([sums, present, [len(values) / divisor]])
    mean = _parameter(parameters, "mean", width)
    d = values - mean
    if name == "spread":
        up = np.where(seen, d, 0.0).max(axis=0, initial=0.0)
        down = np.where(seen, -d, 0.0).max(axis=0, initial=0.0)
        hot = [_one_hot(p, any_seen, f"{what} deviation of", E_MAX + 1) for p in (up, down)]
        return np.concatenate(hot).reshape(-1)
    _check_pass(name)  # the moment pass, the last one
    t = d / _parameter(parameters, "spread", width)
    _within_one(t, seen, "spread")
    t = np.where(seen, t, 0.0)
    return np.concatenate([t.sum(axis=0) / divisor, (t * t).sum(axis=0) / divisor])


@dataclass(frozen=True, eq=False)
class SiteValues:
    """What one site's statistics are over: ``rows`` (its SecAgg+ weight: train and test
    rows), its feature values ``[rows * per_row, F]`` (NaN: missing) and, for regression,
    its training targets ``[t, q]``. Feature entries are divided by their own count, target
    entries by ``rows``, so the weighted average is the federation's."""

    rows: int
    features: np.ndarray
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"a site's statistics need at least one row, got {self.rows!r}")
        for name in PARTS:
            value = getattr(self, name)
            if value is None:
                continue
            a = np.asarray(value, dtype=np.float64)
            if a.ndim != 2 or not a.shape[1]:
                raise ValueError(f"{name} must be a 2-D array with columns, got {a.shape}")
            if np.isinf(a).any():
                raise ValueError(f"cannot take statistics of infinite {name}")
            object.__setattr__(self, name, a)
        if len(self.features) % self.rows or not len(self.features):
            raise ValueError(f"{len(self.features)} feature rows do not split into {self.rows}")

    @classmethod
    def of(cls, data: TaskData) -> SiteValues:
        """As :func:`federation.tasks.stats.data_stats` takes them: every row's features
        (per feature for flat inputs, one global value for images), training targets."""
        x = torch.cat([data.x_train, data.x_test])
        a = x.detach().cpu().numpy().astype(np.float64).reshape(len(x), -1)
        if x.ndim > 2:
            a = a.reshape(-1, 1)
        targets = None
        if data.kind == "regression":
            y = data.y_train.detach().cpu().numpy().astype(np.float64)
            targets = y.reshape(len(y), -1)
        return cls(len(x), a, targets)

    @property
    def shape(self) -> StatisticsShape:
        q = 0 if self.targets is None else self.targets.shape[1]
        return StatisticsShape(self.features.shape[1], len(self.features) // self.rows, q)

    def vectors(self, name: str, parameters: Mapping[str, object]) -> dict[str, np.ndarray]:
        """This site's entries of pass ``name`` by part, given the pass's public
        ``parameters`` (``{part: {"scale"|"mean"|"spread": [...]}}``); ValueError if they
        do not fit this site's data."""
        _check_pass(name)
        out = {}
        for part, divisor in (("features", len(self.features)), ("targets", self.rows)):
            values = getattr(self, part)
            if values is None:
                continue
            given = parameters.get(part, {}) if isinstance(parameters, Mapping) else None
            if not isinstance(given, Mapping):
                raise ValueError(f"statistics pass parameters for {part} must be a mapping")
            what = "feature" if part == "features" else "target"
            out[part] = _vector(name, values, divisor, given, what)
        return out


@dataclass
class _Part:
    """The aggregator's running knowledge of one part (features or targets)."""

    width: int
    units: int  # the federation's values per feature (rows times values per row)
    scale: np.ndarray = field(init=False)
    present: np.ndarray = field(init=False)
    count: int = field(init=False, default=0)
    count_error: float = field(init=False, default=0.0)
    mu: np.ndarray = field(init=False)
    low: np.ndarray = field(init=False)
    high: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    var: np.ndarray = field(init=False)
    constant: np.ndarray = field(init=False)
    mean_error: np.ndarray = field(init=False)
    var_error: np.ndarray = field(init=False)


def _top_bucket(hot: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of averaged one-hots: ``2^e`` of the highest bucket above ``bound``, and
    whether there is one."""
    found = hot > bound
    has = found.any(axis=1)
    top = BUCKETS - 1 - np.argmax(found[:, ::-1], axis=1)
    return np.where(has, np.ldexp(1.0, EXPONENTS[top].astype(np.int32)), 1.0), has


class SecureStatistics:
    """The aggregator's side of the passes: each pass's public parameters and shapes, and
    the federation's :class:`DataStats` from the averages. Never sees a site's numbers.

    ``rows``: every site's row count, as reported in clear (their sum ``N`` turns averages
    into totals). Use: while :attr:`next_pass`, send :meth:`parameters` and a vector shaped
    like :meth:`template`, then :meth:`absorb` the SecAgg+ average and its bound; finally
    :meth:`result`.
    """

    def __init__(self, shape: StatisticsShape, rows: Sequence[int]) -> None:
        if not rows or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in rows):
            raise ValueError(f"every site needs a positive row count, got {list(rows)}")
        self.shape, self.rows = shape, list(rows)
        total = sum(self.rows)
        self._parts = {
            "features": _Part(shape.features, total * shape.per_row),
        }
        if shape.targets:
            self._parts["targets"] = _Part(shape.targets, total)
        self._done = 0
        self.bound = 0.0

    @property
    def next_pass(self) -> str | None:
        return PASSES[self._done] if self._done < len(PASSES) else None

    def template(self) -> dict[str, np.ndarray]:
        """Zeros shaped like the next pass's vectors (names and order of the masked sum)."""
        name = self._require_pass()
        return {
            part: np.zeros(vector_length(name, width))
            for part, width in _lengths(self.shape).items()
        }

    def parameters(self) -> dict[str, dict[str, list[float]]]:
        """The next pass's public parameters (JSON-able), as :meth:`SiteValues.vectors`
        takes them."""
        name = self._require_pass()
        out: dict[str, dict[str, list[float]]] = {}
        for part, p in self._parts.items():
            given: dict[str, np.ndarray] = {}
            if name == "mean":
                given = {"scale": p.scale}
            elif name == "spread":
                given = {"mean": p.mu}
            elif name == "moment":
                given = {"mean": p.mu, "spread": np.maximum(p.low, p.high)}
            out[part] = {k: [float(v) for v in a] for k, a in given.items()}
        return out

    def absorb(self, averages: Mapping[str, np.ndarray], bound: float) -> None:
        """Take the next pass's weighted average (by part) and the round's error bound;
        ValueError if it is malformed or too coarse to resolve what it must."""
        name = self._require_pass()
        expected = {p: vector_length(name, w) for p, w in _lengths(self.shape).items()}
        got = {p: np.asarray(a, dtype=np.float64).reshape(-1) for p, a in averages.items()}
        if {p: len(a) for p, a in got.items()} != expected:
            sizes = {p: len(a) for p, a in got.items()}
            raise ValueError(f"the {name} pass averaged {sizes}, expected {expected}")
        if not all(np.isfinite(a).all() for a in got.values()):
            raise ValueError(f"the {name} pass averaged non-finite values")
        if not (math.isfinite(bound) and bound >= 0):
            raise ValueError(f"the {name} pass has no valid error bound: {bound!r}")
        total = sum(self.rows)
        if name in ("magnitude", "spread") and min(self.rows) <= 2 * bound * total:
            raise ValueError(
                f"a site with {min(self.rows)} of {total} rows is below the secure statistics' "
                f"resolution ({bound:.3g} per average): fewer sites or more rows each"
            )
        self.bound = max(self.bound, float(bound))
        for part, p in self._parts.items():
            getattr(self, f"_{name}")(p, got[part], bound)
        self._done += 1

    def _require_pass(self) -> str:
        name = self.next_pass
        if name is None:
            raise ValueError("every statistics pass is done")
        return name

    @staticmethod
    def _magnitude(p: _Part, avg: np.ndarray, bound: float) -> None:
        p.scale, _ = _top_bucket(avg.reshape(p.width, BUCKETS), bound)

    @staticmethod
    def _mean(p: _Part, avg: np.ndarray, bound: float) -> None:
        w = p.width
        # Counts are averages times the federation's value count: exact once rounded while
        # the error stays below 1/2, else within it plus the rounding.
        p.count_error = 0.0 if 2 * bound * p.units < 1 else bound * p.units + 0.5
        p.count = int(np.clip(np.rint(avg[2 * w] * p.units), 0, p.units))
        p.present = np.clip(np.rint(avg[w : 2 * w] * p.units), 0, p.count)
        seen = p.present > 0
        mu = np.where(seen, p.scale * avg[:w] * p.units / np.where(seen, p.present, 1), 0.0)
        p.mu = np.clip(mu, -p.scale, p.scale)  # the true mean lies within the scale

    @staticmethod
    def _spread(p: _Part, avg: np.ndarray, bound: float) -> None:
        hot = avg.reshape(2, p.width, BUCKETS)
        p.high, has_high = _top_bucket(hot[0], bound)
        p.low, has_low = _top_bucket(hot[1], bound)
        lost = (p.present > 0) & ~(has_high & has_low)
        if lost.any():
            raise ValueError(
                f"the spread pass found no bucket for column {int(np.flatnonzero(lost)[0])}"
            )

    @staticmethod
    def _moment(p: _Part, avg: np.ndarray, bound: float) -> None:
        w = p.width
        seen = p.present > 0
        per = p.units / np.where(seen, p.present, 1)
        m1, m2 = avg[:w] * per, avg[w:] * per
        k2 = np.maximum(p.low, p.high)
        # The error of E[t] and E[t^2]: the averages' (times U / P), and the present count's.
        e = bound * per + p.count_error / np.where(seen, p.present, 1)
        p.mean = np.where(seen, p.mu + k2 * m1, 0.0)
        p.var = np.where(seen, k2 * k2 * np.maximum(m2 - m1 * m1, 0.0), 0.0)
        quantised = k2 * k2 * (e * (1 + 2 * np.abs(m1)) + e * e)
        p.constant = p.var <= quantised + k2 * k2 * CONSTANT
        p.var = np.where(p.constant, 0.0, p.var)
        # Float round-off of these sums, and of FeatureStats' var from sum and sum_sq.
        p.mean_error = k2 * (e + 64 * _EPS) + 8 * _EPS * np.abs(p.mean)
        p.var_error = quantised + k2 * k2 * 64 * _EPS + 8 * _EPS * (p.var + p.mean**2)

    def result(self) -> DataStats:
        """The federation's statistics (after the last pass)."""
        if self.next_pass is not None:
            raise ValueError(f"the statistics passes are not done: {self.next_pass} is next")
        parts = {part: _feature_stats(p) for part, p in self._parts.items()}
        return DataStats(parts["features"], parts.get("targets"))

    @property
    def accuracy(self) -> dict[str, object]:
        """How far :meth:`result` may lie from the pooled statistics (per part and feature:
        absolute bounds on the mean and on the std), and the rounds' bound per average."""
        if self.next_pass is not None:
            raise ValueError("the statistics passes are not done")
        out: dict[str, object] = {"passes": len(PASSES), "error_bound": self.bound}
        for part, p in self._parts.items():
            std = np.sqrt(p.var)
            root = np.sqrt(p.var_error)  # |sqrt(a) - sqrt(b)| <= sqrt(|a - b|), and
            relative = p.var_error / np.where(std > 0, std, 1)  # <= |a - b| / sqrt(b)
            std_error = np.where(std > 0, np.minimum(root, relative), root)
            out[part] = {
                "counts_exact": p.count_error == 0,
                "mean_error": [float(v) for v in p.mean_error],
                "std_error": [float(v) for v in std_error],
            }
        return out


def _feature_stats(p: _Part) -> FeatureStats:
    """A :class:`FeatureStats` with the passes' mean and variance, and the cover as its
    extremes (widened by a few ulps, so every value is inside it as floats too)."""
    seen = p.present > 0
    mean = np.where(seen, p.mean, 0.0)
    total = mean * p.present
    # A constant feature's sum of squares sits just below sum^2 / present, so FeatureStats'
    # variance, sum_sq / n - (sum / n)^2, is <= 0 whatever the round-off (then exactly 0).
    squares = np.where(
        p.constant, p.present * mean * mean * (1 - 2.0**-40), p.present * (p.var + mean * mean)
    )
    margin = 8 * _EPS * (np.abs(p.mu) + np.maximum(p.low, p.high))
    low = np.where(seen, (p.mu - p.low) - margin, np.inf)
    high = np.where(seen, (p.mu + p.high) + margin, -np.inf)
    return FeatureStats(p.count, total, np.where(seen, squares, 0.0), low, high, p.present)
