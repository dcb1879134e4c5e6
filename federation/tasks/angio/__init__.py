"""X-ray coronary angiography: the C-arm view-classification task (the task protocol of
:mod:`federation.tasks`).

Images are synthetic angiograms (:mod:`~federation.tasks.angio.render`, drawn from the 3-D
anatomy of :mod:`~federation.tasks.angio.anatomy`), labelled by the view whose angle box
(:mod:`~federation.tasks.angio.views`) holds their C-arm angles, or by the injected artery;
or a hospital's own folder of XA DICOM files (:mod:`~federation.tasks.angio.dicom`). The
models are in :mod:`~federation.tasks.angio.model`, the montage of ``more-fl data angio`` in
:mod:`~federation.tasks.angio.preview`. Sites are partitioned iid or by home scanners and a
Dirichlet view mix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.tasks.angio.model import build_model
from federation.tasks.angio.render import AngioSet, generate
from federation.tasks.angio.views import ARTERIES, VIEW_CLASSES
from federation.tasks.base import TaskData, partition_sites

__all__ = [
    "DEFAULTS",
    "FEATURE_RANGE",
    "PRIVATE_DATA_DIR",
    "build_model",
    "load_task_data",
    "site_partition",
    "split_sizes",
]

DEFAULTS: dict[str, object] = {
    # load_task_data
    "seed": 0,  # patients, views, scanners and noise are all drawn from it
    "data_dir": None,  # None: synthesise; else a folder of real XA DICOM (see angio.dicom)
    "n_train": 6000,  # synthetic training images
    "n_test": 1200,  # synthetic test images, from held-out patients
    "image_size": 64,  # images are image_size x image_size
    "label": "view",  # "view" (8 classes) | "artery" (LCA/RCA)
    "num_scanners": 3,  # scanner profiles the synthetic patients are spread over
    "images_per_patient": 8,  # views acquired per synthetic patient (one study)
    "labels_csv": None,  # real data: CSV with columns file and artery and/or view
    "frame": "max-contrast",  # real data: frame of a cine run ("max-contrast" | "first" | ...)
    "test_fraction": 0.2,  # real data: share of patients held out for testing
    # site_partition
    "scheme": "iid",  # "iid" | "non-iid" (scanner homes + Dirichlet view skew)
    "alpha": 0.5,  # Dirichlet concentration of the non-iid view skew
    # build_model
    "arch": "cnn",  # "cnn" | "mlp" | "resnet"
    "channels": 8,  # resnet width
    "blocks": 1,  # resnet residual blocks
    # measured plaintext training recipe (SGD + softmax cross-entropy)
    "epochs": 20,  # 6000 images, ~20 s of one core: 94.9-96.4 % on held-out patients
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 1e-4,
}
"""Documented defaults of every option this task reads, plus its measured training recipe."""

FEATURE_RANGE = (0.0, 1.0)
PRIVATE_DATA_DIR = True
"""``task.data_dir`` is a hospital's own DICOM export (so never encrypt it under the public
simulation key without a warning)."""


def _label_names(label: str) -> tuple[str, ...]:
    if label == "view":
        return VIEW_CLASSES
    if label == "artery":
        return ARTERIES
    raise ValueError(f"label must be 'view' or 'artery', got {label!r}")


def _split_patients(data: AngioSet, test_fraction: float, seed: int) -> tuple[AngioSet, ...]:
    """Train/test split of real data by patient, so no patient is on both sides."""
    patients = np.unique(data.patient)
    if len(patients) < 2:
        raise ValueError("a train/test split needs images of at least two patients")
    order = np.random.default_rng(seed).permutation(patients)
    n_test = min(len(patients) - 1, max(1, round(test_fraction * len(patients))))
    test = np.isin(data.patient, order[:n_test])
    return data.take(np.flatnonzero(~test)), data.take(np.flatnonzero(test))


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int] | None:
    """(train, test) example counts of the synthetic data; ``None`` for a DICOM folder
    (known only once it is read)."""
    if options.get("data_dir") is not None:
        return None
    return int(options.get("n_train", DEFAULTS["n_train"])), int(
        options.get("n_test", DEFAULTS["n_test"])
    )


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    n_train: int = 6000,
    n_test: int = 1200,
    image_size: int = 64,
    label: str = "view",
    num_scanners: int = 3,
    images_per_patient: int = 8,
    labels_csv: str | Path | None = None,
    frame: str | int = "max-contrast",
    test_fraction: float = 0.2,
) -> TaskData:
    """The angiography task: x ``[N, 1, S, S]`` float32 in [0, 1] (vessels dark), y int64.

    Without ``data_dir`` the images are synthetic: ``n_train`` from one patient population
    and ``n_test`` from held-out patients (a disjoint seed stream). With ``data_dir`` they
    are the usable XA files of that folder (see :func:`federation.tasks.angio.dicom.read_folder`;
    ``labels_csv`` and ``frame`` apply there), split by patient with ``test_fraction`` of the
    patients held out. ``info`` carries per-image views, arteries, scanners, patients and angles
    (``*_train`` / ``*_test`` arrays), which ``site_partition`` uses.
    """
    names = _label_names(label)
    info: dict[str, object] = {"label": label, "image_size": image_size, "seed": seed}
    if data_dir is None:
        train = generate(
            n_train, seed=seed, stream=0, image_size=image_size, num_scanners=num_scanners,
            images_per_patient=images_per_patient,
        )  # fmt: skip
        test = generate(
            n_test, seed=seed, stream=1, image_size=image_size, num_scanners=num_scanners,
            images_per_patient=images_per_patient,
        )  # fmt: skip
        info.update(source="synthetic", images_per_patient=images_per_patient)
    else:
        from federation.tasks.angio.dicom import read_folder  # pydicom only for real data

        data, skipped = read_folder(
            data_dir, image_size=image_size, labels_csv=labels_csv, label=label, frame=frame
        )
        info.update(
            source="dicom",
            data_dir=str(data_dir),
            skipped=[(str(path), reason) for path, reason in skipped],
        )
        if len(data) < 2:
            reasons = "; ".join(f"{p.name}: {r}" for p, r in skipped[:5])
            raise ValueError(f"{data_dir}: {len(data)} usable XA image(s). Skipped: {reasons}")
        train, test = _split_patients(data, test_fraction, seed)
    info["scanner_names"] = train.scanner_names
    for split, part in (("train", train), ("test", test)):
        info[f"view_{split}"] = part.view
        info[f"artery_{split}"] = part.artery
        info[f"scanner_{split}"] = part.scanner
        info[f"patient_{split}"] = part.patient
        info[f"angles_{split}"] = np.stack([part.primary, part.secondary], axis=1)
    target = "view" if label == "view" else "artery"
    return TaskData(
        name="angio",
        kind="classification",
        x_train=torch.from_numpy(train.images).unsqueeze(1),
        y_train=torch.from_numpy(getattr(train, target)),
        x_test=torch.from_numpy(test.images).unsqueeze(1),
        y_test=torch.from_numpy(getattr(test, target)),
        feature_range=FEATURE_RANGE,
        num_classes=len(names),
        class_names=names,
        info=info,
    )


def _rows(info: dict[str, object], split: str, key: str, default: np.ndarray) -> np.ndarray:
    value = info.get(f"{key}_{split}")
    return np.asarray(value) if isinstance(value, np.ndarray) else default


def _skewed_partition(
    views: np.ndarray,
    scanners: np.ndarray,
    num_sites: int,
    alpha: float,
    seed: int,
    foreign: float = 0.02,
) -> list[np.ndarray]:
    """Sites with home scanners and a Dirichlet(alpha) view mix.

    Each view's images are spread over sites with Dirichlet(alpha) weights (as in
    ``dirichlet_partition``), multiplied by a scanner affinity: 1 for a site's home scanners
    (scanner k belongs to site k mod num_sites; with fewer scanners than sites, site s uses
    scanner s mod num_scanners) and ``foreign`` otherwise. Every image goes to one site, so
    the shares are disjoint and cover the data; redrawn until no site is empty.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    if num_sites < 1 or num_sites > len(views):
        raise ValueError(f"cannot split {len(views)} examples across {num_sites} sites")
    rng = np.random.default_rng(seed)
    groups, group = np.unique(views, return_inverse=True)
    num_scanners = int(scanners.max()) + 1
    site_ids, scanner_ids = np.arange(num_sites)[:, None], np.arange(num_scanners)[None, :]
    if num_scanners >= num_sites:
        home = scanner_ids % num_sites == site_ids
    else:
        home = site_ids % num_scanners == scanner_ids
    affinity = np.where(home, 1.0, foreign)
    for _ in range(1000):
        weights = rng.dirichlet(np.full(num_sites, alpha), size=len(groups)).T
        prob = weights[:, group] * affinity[:, scanners]
        cum = np.cumsum(prob / prob.sum(axis=0), axis=0)
        site = np.minimum((cum < rng.random(len(views))).sum(axis=0), num_sites - 1)
        parts = [np.flatnonzero(site == s) for s in range(num_sites)]
        if min(len(p) for p in parts) > 0:
            return parts
    raise ValueError(f"no non-iid split with alpha={alpha} gives all {num_sites} sites data")


def site_partition(
    data: TaskData, *, num_sites: int, scheme: str, seed: int, alpha: float = 0.5
) -> list[TaskData]:
    """Each site's share of ``data``: disjoint, covering, deterministic from ``seed``.

    ``"iid"`` shuffles train images evenly across sites. ``"non-iid"`` gives each site its
    own scanners (so its own noise, dose and contrast) and a Dirichlet(``alpha``) view mix
    (see ``_skewed_partition``). The test set is split iid either way: every site evaluates
    on the population, so the weighted mean of site metrics is the global metric. Per-image
    ``info`` arrays are cut to each site's rows.
    """
    n_train = len(data.y_train)

    def skewed(train_seed: int) -> list[np.ndarray]:
        views = _rows(data.info, "train", "view", data.y_train.numpy())
        scanners = _rows(data.info, "train", "scanner", np.zeros(n_train, dtype=np.int64))
        return _skewed_partition(views, scanners, num_sites, alpha, train_seed)

    return partition_sites(
        data, num_sites=num_sites, scheme=scheme, seed=seed, non_iid=skewed, alpha=alpha
    )
