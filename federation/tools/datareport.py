"""What a site would train on: counts, ranges, missing values and every skipped input.

Plain numbers about a site's own data, for the people at that site (``more-fl data inspect``
and the skip summary ``more-fl train`` prints); nothing here is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from federation.tasks.base import TaskData

MAX_FEATURES = 16
"""Feature ranges are listed one by one up to this many, then summarised."""


def skipped_inputs(data: TaskData) -> list[tuple[str, str]]:
    """Every input the loader left out, with its reason (DICOM files, table rows)."""
    skipped = data.info.get("skipped", ())
    rows = [(str(path), str(reason)) for path, reason in skipped]  # type: ignore[attr-defined]
    return rows


def skip_summary(data: TaskData) -> list[str]:
    """One line per skipped input and a count first; empty when nothing was skipped."""
    skipped = skipped_inputs(data)
    if not skipped:
        return []
    used = len(data.x_train) + len(data.x_test)
    lines = [f"skipped {len(skipped)} of {used + len(skipped)} inputs:"]
    lines += [f"  {path}: {reason}" for path, reason in skipped]
    return lines


def _range(values: torch.Tensor) -> str:
    return f"{float(values.min()):.4g} to {float(values.max()):.4g}"


def _targets(data: TaskData, y: torch.Tensor) -> list[tuple[str, str]]:
    if data.kind == "classification":
        counts = np.bincount(y.numpy().astype(np.int64), minlength=data.num_classes or 0)
        names = data.class_names or tuple(str(i) for i in range(len(counts)))
        return [(f"class {name}", str(int(n))) for name, n in zip(names, counts, strict=False)]
    assert data.target_mean is not None and data.target_std is not None
    physical = y.double() * torch.as_tensor(data.target_std) + torch.as_tensor(data.target_mean)
    names = data.output_names or tuple(f"y{i}" for i in range(physical.shape[1]))
    units = data.output_units or ("",) * len(names)
    rows = []
    for i, (name, unit) in enumerate(zip(names, units, strict=True)):
        col = physical[:, i]
        rows.append(
            (
                f"target {name}",
                f"mean {float(col.mean()):.4g}, sd {float(col.std()):.3g}, "
                f"{_range(col)} {unit}".rstrip(),
            )
        )
    return rows


def _features(data: TaskData) -> list[tuple[str, str]]:
    x = torch.cat([data.x_train, data.x_test]).double()
    lo, hi = data.feature_range
    rows = [
        ("features", f"{tuple(data.x_train.shape[1:])}, shadow range {lo:.4g} to {hi:.4g}"),
    ]
    if x.ndim != 2:
        return [*rows, ("feature values", _range(x))]
    declared = data.info.get("inputs") or data.info.get("input_names") or ()
    names: Sequence[str] = tuple(declared)  # type: ignore[arg-type]
    if len(names) != x.shape[1]:
        names = tuple(f"x{i}" for i in range(x.shape[1]))
    for i, name in enumerate(names[:MAX_FEATURES]):
        rows.append((f"feature {name}", _range(x[:, i])))
    if len(names) > MAX_FEATURES:
        rows.append((f"features {MAX_FEATURES}..", f"{len(names) - MAX_FEATURES} more"))
    return rows


def inspect_data(data: TaskData) -> list[tuple[str, str]]:
    """(label, value) rows: sizes, targets, feature ranges, missing values, skipped inputs."""
    rows = [
        ("task", f"{data.name} ({data.kind})"),
        ("examples", f"{len(data.x_train)} train, {len(data.x_test)} test"),
    ]
    rows += _targets(data, data.y_train)
    rows += _features(data)
    missing = data.info.get("missing")
    if isinstance(missing, dict):
        rows += [(f"missing {k}", str(v)) for k, v in missing.items()]
    skipped = skipped_inputs(data)
    rows.append(("skipped", str(len(skipped))))
    rows += [(f"skipped {path}", reason) for path, reason in skipped]
    return rows
