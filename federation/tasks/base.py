"""What every task hands to the engine: plain tensors, declared ranges and its metrics.

Task modules (MNIST, WBC, angiography) stay plain torch/numpy: they never see a key or a
ciphertext. The declared ranges feed the shadow-value policies of the design note (features:
uniform over the feature range; categorical targets: a valid label; regression targets:
uniform over the normalised target range).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskData:
    """Train and test tensors of one task (centralised, or one site's share).

    ``y`` holds int64 class indices for classification and normalised float targets
    ``[N, q]`` for regression; ``target_mean``/``target_std`` undo the normalisation so
    metrics are reported in physical units.
    """

    name: str
    kind: TaskKind
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_range: tuple[float, float]
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    output_units: tuple[str, ...] = ()
    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None
    target_range: tuple[float, float] | None = None
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"task {self.name!r}: features and targets differ in length")
        if self.kind == "classification" and not self.num_classes:
            raise ValueError(f"task {self.name!r}: a classification task needs num_classes")
        if self.kind == "regression" and (self.target_mean is None or self.target_std is None):
            raise ValueError(f"task {self.name!r}: a regression task needs target_mean/target_std")

    def subset(self, train_idx: np.ndarray, test_idx: np.ndarray) -> TaskData:
        """This task restricted to the given train and test rows (one site's share)."""
        tr = torch.as_tensor(np.asarray(train_idx, dtype=np.int64))
        te = torch.as_tensor(np.asarray(test_idx, dtype=np.int64))
        return replace(
            self,
            x_train=self.x_train[tr],
            y_train=self.y_train[tr],
            x_test=self.x_test[te],
            y_test=self.y_test[te],
        )

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Metrics of decrypted outputs: accuracy, or MAE (physical units) and R2."""
        outputs = outputs.detach().double()
        if self.kind == "classification":
            pred = outputs.argmax(dim=-1)
            return {"accuracy": float((pred == targets).double().mean())}
        assert self.target_mean is not None and self.target_std is not None
        mean = torch.as_tensor(self.target_mean, dtype=torch.float64)
        std = torch.as_tensor(self.target_std, dtype=torch.float64)
        pred = outputs * std + mean
        true = targets.double() * std + mean
        result: dict[str, float] = {}
        names = self.output_names or tuple(f"y{i}" for i in range(pred.shape[1]))
        ss_res = ((pred - true) ** 2).sum(dim=0)
        ss_tot = ((true - true.mean(dim=0)) ** 2).sum(dim=0).clamp_min(1e-300)
        r2 = 1.0 - ss_res / ss_tot
        mae = (pred - true).abs().mean(dim=0)
        for i, name in enumerate(names):
            result[f"mae_{name}"] = float(mae[i])
            result[f"r2_{name}"] = float(r2[i])
        result["r2_min"] = float(r2.min())
        result["r2_mean"] = float(r2.mean())
        return result


def classification_split(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    train: np.ndarray,
    test: np.ndarray,
    class_names: tuple[str, ...],
    info: dict[str, object],
) -> TaskData:
    """A classification task from all its rows and the (train, test) row indices; the
    feature range is the rows' own (raw data, before federation statistics)."""
    return TaskData(
        name=name,
        kind="classification",
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        feature_range=(float(x.min()), float(x.max())),
        num_classes=len(class_names),
        class_names=tuple(class_names),
        info=info,
    )


def iid_partition(n: int, num_sites: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into ``num_sites`` disjoint, nearly equal, shuffled shares."""
    if num_sites < 1 or num_sites > n:
        raise ValueError(f"cannot split {n} examples across {num_sites} sites")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, num_sites)]


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int, min_per_site: int = 1
) -> list[np.ndarray]:
    """Label-skewed shares: each class is spread across sites with Dirichlet(alpha) weights.

    Smaller ``alpha`` gives stronger skew. Resamples (deterministically) until every site
    holds at least ``min_per_site`` examples.
    """
    labels = np.asarray(labels)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    if num_sites < 1 or num_sites * min_per_site > len(labels):
        raise ValueError(f"cannot split {len(labels)} examples across {num_sites} sites")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            weights = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(weights)[:-1] * len(idx)).astype(int)
            for site, part in enumerate(np.split(idx, cuts)):
                shares[site].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shares]
        if min(len(p) for p in parts) >= min_per_site:
            return parts
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gives every site {min_per_site} examples")


def partition_sites(
    data: TaskData,
    *,
    num_sites: int,
    scheme: str,
    seed: int,
    non_iid: Callable[[int], list[np.ndarray]],
    alpha: float | None = None,
) -> list[TaskData]:
    """Every task's site split: train rows iid or by the task's ``non_iid(seed)`` rule, test
    rows always iid (each site evaluates on the population, so the weighted mean of site
    metrics is the global metric). Per-row ``info`` arrays (``*_train``/``*_test``) are cut
    to each site's rows; ``info["partition"]`` records how (``alpha`` when given)."""
    train_seed, test_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    if scheme == "iid":
        train_parts = iid_partition(len(data.y_train), num_sites, train_seed)
    elif scheme == "non-iid":
        train_parts = non_iid(train_seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose 'iid' or 'non-iid'")
    test_parts = iid_partition(len(data.y_test), num_sites, test_seed)
    partition: dict[str, object] = {"scheme": scheme, "num_sites": num_sites, "seed": seed}
    if scheme == "non-iid" and alpha is not None:
        partition["alpha"] = alpha
    sites = []
    for site, (train_idx, test_idx) in enumerate(zip(train_parts, test_parts, strict=True)):
        info = {**data.info, "partition": {**partition, "site": site}}
        for key, value in data.info.items():
            if isinstance(value, np.ndarray) and key.endswith("_train"):
                info[key] = value[train_idx]
            elif isinstance(value, np.ndarray) and key.endswith("_test"):
                info[key] = value[test_idx]
        sites.append(replace(data.subset(train_idx, test_idx), info=info))
    return sites


def quantile_bands(values: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    """Rows split into ``num_sites`` contiguous, nearly equal quantile bands of ``values``
    (ties broken at random, seeded): each site a different range of patients."""
    if num_sites < 1 or num_sites > len(values):
        raise ValueError(f"cannot split {len(values)} examples across {num_sites} sites")
    tie_break = np.random.default_rng(seed).random(len(values))
    order = np.lexsort((tie_break, values))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def default_site_partition(
    data: TaskData, *, num_sites: int, scheme: str, seed: int, alpha: float = 0.5
) -> list[TaskData]:
    """The site split of a task that defines none: ``non-iid`` is label skew by
    Dirichlet(``alpha``) for classification and contiguous bands of the first target for
    regression (each site a different range of patients)."""

    def non_iid(train_seed: int) -> list[np.ndarray]:
        y = data.y_train.numpy()
        if data.kind == "classification":
            return dirichlet_partition(y, num_sites, alpha, train_seed)
        return quantile_bands(y.reshape(len(y), -1)[:, 0], num_sites, train_seed)

    alpha_used = alpha if data.kind == "classification" else None
    return partition_sites(
        data, num_sites=num_sites, scheme=scheme, seed=seed, non_iid=non_iid, alpha=alpha_used
    )
