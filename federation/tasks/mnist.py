"""MNIST: verified IDX loading, carved splits, site partitions and engine-compatible models.

Offline, only the 10,000-digit test split is usually at hand, so the task can carve disjoint
train/evaluation sets out of it; where all four standard files are present it uses the real
60,000/10,000 split. Every canonical ``.gz`` file is checked against its published md5, so a
run is known to use the real digits; raw (uncompressed) files have no published checksum and are
checked by structure instead (magic number, dtype, dimensions, exact size, label values).

Models are one ``nn.Sequential`` of layers the encrypted engine implements: smooth ones (Flatten,
Linear, Conv2d, AvgPool2d, Sigmoid, Tanh, Softplus) for ``mlp`` and ``cnn``, and ReLU,
BatchNorm2d and MaxPool2d for the modern ``relu-cnn``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.tasks.base import TaskData, dirichlet_partition, partition_sites

ENV_DIR = "MORE_FL_MNIST_DIR"
"""Environment variable naming the MNIST directory when ``data_dir`` is not given."""

DEFAULT_DIR = Path("~") / ".cache" / "more-fl" / "mnist"
"""Where MNIST is looked for (and downloaded to) when neither argument nor variable is set."""

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
"""Download sources, tried in order (the same files, so the same md5s, on each)."""

_MODEL_DEFAULTS: dict[str, int | str | bool] = {
    "hidden": 128,  # mlp hidden width
    "activation": "tanh",  # "sigmoid" | "tanh" | "softplus" (mlp, cnn)
    "channels": 8,  # cnn convolution channels; relu-cnn first-stage channels (then twice)
    "batch_norm": True,  # relu-cnn: BatchNorm2d after each convolution
}

RECIPES: dict[str, dict[str, int | float]] = {
    # 784-128-10 Tanh: 95.3-95.8 % test accuracy over five seeds (carved 8,000/2,000 split),
    # ~7 s of CPU on one thread
    "mlp": {"epochs": 15, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    # Conv(1,8,5,s2,p2)-Tanh-AvgPool(2)-Linear: 96.4-97.3 % (same protocol), ~9-10 s of CPU
    "cnn": {"epochs": 12, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    # Conv(1,8,5,s2,p2)-BN-ReLU-MaxPool-Conv(8,16,3,p1)-BN-ReLU-MaxPool-Linear, float64 at
    # batch 64 as configs/mnist-relu.yaml: 95.1-97.7 % after 15 epochs over three seeds
    # (97.7-97.8 % at the best epoch), 40-90 s of CPU on one thread
    "relu-cnn": {"epochs": 15, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
}
"""Measured plaintext SGD recipes per arch (constant lr, no schedule, shuffled mini-batches)."""

DEFAULTS: dict[str, object] = {
    # load_task_data
    "seed": 0,  # carving permutation (split mode "carve"/"auto" without train files)
    "data_dir": None,  # None: $MORE_FL_MNIST_DIR, else ~/.cache/more-fl/mnist
    "split": "auto",  # "auto" | "standard" | "carve"
    "n_train": 8000,  # carved training digits (ignored by the standard split)
    "n_test": 2000,  # carved evaluation digits (ignored by the standard split)
    "download": False,  # fetch missing files from MIRRORS (explicit opt-in only)
    # site_partition
    "scheme": "iid",  # "iid" | "non-iid"
    "alpha": 0.5,  # Dirichlet concentration of the non-iid label skew
    # build_model
    "arch": "mlp",  # "mlp" | "cnn" | "relu-cnn"
    **_MODEL_DEFAULTS,
    # training recipe of the default arch (SGD + softmax cross-entropy), see RECIPES
    **RECIPES["mlp"],
}
"""Documented defaults of every option this task reads, plus the default arch's recipe."""

IMAGE_SIZE = 28
NUM_CLASSES = 10
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"
_KIND = {
    _IMAGES_MAGIC: "MNIST images: unsigned bytes, 3 dimensions",
    _LABELS_MAGIC: "MNIST labels: unsigned bytes, 1 dimension",
}

# IDX type code -> big-endian numpy dtype (Y. LeCun's format description).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MnistDataError(ValueError):
    """An MNIST file is unreadable, corrupt, truncated or not the canonical file."""


class MnistFilesMissingError(MnistDataError, FileNotFoundError):
    """Required MNIST files are absent (and were not asked to be downloaded)."""


@dataclass(frozen=True)
class _Spec:
    """One standard MNIST file: its stem, canonical gzip md5 and expected contents."""

    stem: str
    md5: str
    magic: int
    count: int

    @property
    def gz_name(self) -> str:
        return self.stem + ".gz"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.magic == _IMAGES_MAGIC:
            return (self.count, IMAGE_SIZE, IMAGE_SIZE)
        return (self.count,)


TRAIN_IMAGES = _Spec(
    "train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873", _IMAGES_MAGIC, 60000
)
TRAIN_LABELS = _Spec(
    "train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432", _LABELS_MAGIC, 60000
)
TEST_IMAGES = _Spec(
    "t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3", _IMAGES_MAGIC, 10000
)
TEST_LABELS = _Spec(
    "t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c", _LABELS_MAGIC, 10000
)
STANDARD_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
"""The four standard files; their md5s are the canonical published ones (of the ``.gz``)."""


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The MNIST directory: the argument, else ``$MORE_FL_MNIST_DIR``, else the user cache."""
    env = os.environ.get(ENV_DIR)
    chosen = data_dir if data_dir is not None else env or DEFAULT_DIR
    return Path(chosen).expanduser()


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or raw) into an array of its declared dtype and dims.

    Any structural problem raises :class:`MnistDataError` naming the file and the fault, so a
    bad download is diagnosed instead of surfacing later as a reshape error.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MnistDataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _parse_idx(blob: bytes, path: Path, expect_magic: int | None = None) -> np.ndarray:
    if blob[:2] == _GZIP_MAGIC:
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as exc:
            raise MnistDataError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if len(blob) < 4:
        raise MnistDataError(f"{path}: only {len(blob)} bytes, too short for an IDX header")
    zero, code, ndim = int.from_bytes(blob[:2], "big"), blob[2], blob[3]
    magic = int.from_bytes(blob[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        raise MnistDataError(
            f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expect_magic:08x} "
            f"({_KIND[expect_magic]})"
        )
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise MnistDataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x0000TTDD with a known "
            "type code TT and at least one dimension DD); not an IDX file"
        )
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise MnistDataError(f"{path}: truncated IDX header ({len(blob)} of {header} bytes)")
    dims = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    if math.prod(d for d in dims if d) * dtype.itemsize >= np.iinfo(np.intp).max:
        raise MnistDataError(f"{path}: dims {dims} describe an impossibly large array")
    expected = header + math.prod(dims) * dtype.itemsize
    if len(blob) < expected:
        raise MnistDataError(
            f"{path}: truncated: dims {dims} need {expected} bytes, file has {len(blob)}"
        )
    if len(blob) > expected:
        raise MnistDataError(
            f"{path}: {len(blob) - expected} unexpected trailing bytes after dims {dims}"
        )
    data = np.frombuffer(blob, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _locate(directory: Path, spec: _Spec) -> Path | None:
    """The file holding ``spec`` in ``directory`` (canonical ``.gz`` preferred), if any."""
    for name in (spec.gz_name, spec.stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _read_verified(path: Path, spec: _Spec) -> tuple[np.ndarray, str]:
    """Read ``path`` as ``spec`` and verify it; returns the array and how it was verified."""
    blob = _read_bytes(path)
    if path.name == spec.gz_name:
        digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
        if digest != spec.md5:
            raise MnistDataError(
                f"{path}: md5 checksum mismatch: got {digest}, expected the canonical {spec.md5} "
                "(corrupt, incomplete or not the original MNIST file)"
            )
        verified = "md5"
    else:
        if blob[:2] == _GZIP_MAGIC:
            raise MnistDataError(f"{path}: is gzip-compressed; name it {spec.gz_name}")
        verified = "structure"
    array = _parse_idx(blob, path, expect_magic=spec.magic)
    if array.shape != spec.shape:
        raise MnistDataError(f"{path}: dims {array.shape}, expected {spec.shape}")
    if spec.magic == _LABELS_MAGIC and int(array.max()) >= NUM_CLASSES:
        raise MnistDataError(f"{path}: label {int(array.max())} outside 0..{NUM_CLASSES - 1}")
    return array, verified


def download_mnist(
    data_dir: str | Path | None = None,
    files: tuple[_Spec, ...] = STANDARD_FILES,
    *,
    mirrors: tuple[str, ...] | None = None,
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch the missing ``files`` into ``data_dir``; returns the paths written.

    Each file streams to a temporary file beside its target, is md5-verified, then moved into
    place with ``os.replace``, so an interrupted or tampered download never leaves a file that
    looks valid. ``mirrors`` (default :data:`MIRRORS`) are tried in order.
    """
    directory = resolve_data_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for spec in files:
        if _locate(directory, spec) is not None:
            continue
        target = directory / spec.gz_name
        failures: list[str] = []
        for mirror in MIRRORS if mirrors is None else mirrors:
            url = mirror + spec.gz_name
            error = _fetch(url, target, spec.md5, timeout)
            if error is None:
                written.append(target)
                break
            failures.append(f"{url}: {error}")
        else:
            raise MnistDataError(
                f"could not download {spec.gz_name} into {directory}:\n  " + "\n  ".join(failures)
            )
    return written


def _fetch(url: str, target: Path, md5: str, timeout: float) -> str | None:
    """Download ``url`` to ``target`` atomically if its md5 matches; the failure reason if not."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            return f"md5 {digest.hexdigest()} does not match the canonical {md5}"
        os.replace(tmp, target)
        return None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        tmp.unlink(missing_ok=True)


def _missing_error(directory: Path, missing: list[_Spec], why: str) -> MnistFilesMissingError:
    names = ", ".join(spec.gz_name for spec in missing)
    return MnistFilesMissingError(
        f"MNIST files missing from {directory} ({why}): {names}. Put them there (gzip as "
        "published, or uncompressed without the .gz suffix), point the experiment's "
        f"task.data_dir (`more-fl data mnist --data-dir`) or ${ENV_DIR} at the directory that "
        "holds them, or set task.options.download: true where a network is available."
    )


def _pair(
    paths: dict[_Spec, Path], images: _Spec, labels: _Spec
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Verified images and labels of one split, with how each file was verified."""
    x, x_check = _read_verified(paths[images], images)
    y, y_check = _read_verified(paths[labels], labels)
    return x, y, {str(paths[images]): x_check, str(paths[labels]): y_check}


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def carve_indices(
    total: int, n_train: int, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted train/evaluation rows of a ``total``-row split, fixed by ``seed``."""
    if n_train < 1 or n_test < 1 or n_train + n_test > total:
        raise ValueError(
            f"cannot carve n_train={n_train} and n_test={n_test} (task.options) disjoint "
            f"digits out of {total}: each must be at least 1 and together at most {total}"
        )
    perm = np.random.default_rng(seed).permutation(total)
    return np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_test])


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int]:
    """(train, test) example counts at most (the carve sizes unless the standard split is
    asked for: ``auto`` may carve), without reading the files."""
    if options.get("split", DEFAULTS["split"]) == "standard":
        return 60_000, 10_000
    return int(options.get("n_train", DEFAULTS["n_train"])), int(
        options.get("n_test", DEFAULTS["n_test"])
    )


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    split: str = "auto",
    n_train: int = 8000,
    n_test: int = 2000,
    download: bool = False,
) -> TaskData:
    """MNIST as a classification task: x ``[N, 1, 28, 28]`` float32 in [0, 1], y int64.

    ``split``: ``"standard"`` uses the 60,000/10,000 files; ``"carve"`` draws ``n_train`` and
    ``n_test`` disjoint digits from the 10,000-digit test split with a ``seed``-determined
    permutation (the only option offline); ``"auto"`` is standard when all four files are
    present and carve otherwise. ``download=True`` first fetches the files the mode needs.
    """
    if split not in ("auto", "standard", "carve"):
        raise ValueError(f"task.options.split must be 'auto', 'standard' or 'carve', got {split!r}")
    directory = resolve_data_dir(data_dir)
    if download:
        download_mnist(
            directory, (TEST_IMAGES, TEST_LABELS) if split == "carve" else STANDARD_FILES
        )
    paths = {spec: path for spec in STANDARD_FILES if (path := _locate(directory, spec))}
    standard = split == "standard" or (split == "auto" and len(paths) == len(STANDARD_FILES))
    needed = STANDARD_FILES if standard else (TEST_IMAGES, TEST_LABELS)
    missing = [spec for spec in needed if spec not in paths]
    if missing:
        why = "the standard split needs all four" if standard else "carving needs the test split"
        raise _missing_error(directory, missing, why)

    info: dict[str, object] = {"data_dir": str(directory), "split": split}
    if standard:
        train_images, train_labels, provenance = _pair(paths, TRAIN_IMAGES, TRAIN_LABELS)
        test_images, test_labels, test_provenance = _pair(paths, TEST_IMAGES, TEST_LABELS)
        provenance.update(test_provenance)
        info["mode"] = "standard"
    else:
        train_idx, test_idx = carve_indices(TEST_LABELS.count, n_train, n_test, seed)
        images, labels, provenance = _pair(paths, TEST_IMAGES, TEST_LABELS)
        train_images, train_labels = images[train_idx], labels[train_idx]
        test_images, test_labels = images[test_idx], labels[test_idx]
        info.update(mode="carve", seed=seed, n_train=n_train, n_test=n_test)
    info["files"] = provenance
    x_train, y_train = _to_tensors(train_images, train_labels)
    x_test, y_test = _to_tensors(test_images, test_labels)
    return TaskData(
        name="mnist",
        kind="classification",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        feature_range=(0.0, 1.0),
        num_classes=NUM_CLASSES,
        class_names=tuple(str(digit) for digit in range(NUM_CLASSES)),
        info=info,
    )


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}


_ALLOWED_OPTIONS: dict[str, set[str]] = {
    "mlp": {"hidden", "activation"},
    "cnn": {"channels", "activation"},
    "relu-cnn": {"channels", "batch_norm"},
}


def _relu_cnn(channels: int, batch_norm: bool) -> nn.Sequential:
    """Two Conv -> [BatchNorm] -> ReLU -> MaxPool stages, then a Linear to the logits."""
    if channels < 1:
        raise ValueError(f"model.options.channels must be at least 1, got {channels}")
    wide = 2 * channels

    def norm(width: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(width)] if batch_norm else []

    return nn.Sequential(
        # a bias right before batch norm only shifts what the norm subtracts: none there
        nn.Conv2d(1, channels, kernel_size=5, stride=2, padding=2, bias=not batch_norm),  # 14x14
        *norm(channels),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 7x7
        nn.Conv2d(channels, wide, kernel_size=3, padding=1, bias=not batch_norm),
        *norm(wide),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 3x3
        nn.Flatten(),
        nn.Linear(wide * 3 * 3, NUM_CLASSES),
    )


def build_model(arch: str = "mlp", **options: int | str | bool) -> nn.Sequential:
    """A small MNIST classifier made only of layers the encrypted engine supports.

    ``mlp``: Flatten -> Linear(784, hidden) -> act -> Linear(hidden, 10); options ``hidden``,
    ``activation``. ``cnn``: Conv2d(1, channels, 5, stride=2, padding=2) -> act -> AvgPool2d(2)
    -> Flatten -> Linear(channels*7*7, 10); options ``channels``, ``activation``. ``relu-cnn``:
    Conv2d(1, channels, 5, stride=2, padding=2) -> BatchNorm2d -> ReLU -> MaxPool2d(2) ->
    Conv2d(channels, 2*channels, 3, padding=1) -> BatchNorm2d -> ReLU -> MaxPool2d(2) ->
    Flatten -> Linear(2*channels*3*3, 10) (2.9k parameters at 8 channels, about 1.5x the
    encrypted cost of ``cnn``); options ``channels``, ``batch_norm`` (false: biased
    convolutions and no normalisation). Outputs are logits for softmax cross-entropy.
    """
    if arch not in _ALLOWED_OPTIONS:
        choices = ", ".join(repr(name) for name in _ALLOWED_OPTIONS)
        raise ValueError(f"unknown MNIST arch {arch!r} (model.arch); choose {choices}")
    allowed = _ALLOWED_OPTIONS[arch]
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(
            f"unknown model.options for {arch!r}: {', '.join(sorted(unknown))} "
            f"(it takes {', '.join(sorted(allowed))})"
        )
    settings = {**_MODEL_DEFAULTS, **options}
    if arch == "relu-cnn":
        batch_norm = settings["batch_norm"]
        if not isinstance(batch_norm, bool):
            raise ValueError(f"model.options.batch_norm must be true or false, got {batch_norm!r}")
        return _relu_cnn(int(settings["channels"]), batch_norm)
    activation = str(settings["activation"])
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"model.options.activation must be one of {', '.join(sorted(_ACTIVATIONS))}, "
            f"got {activation!r}"
        )
    act = _ACTIVATIONS[activation]
    if arch == "mlp":
        hidden = int(settings["hidden"])
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden),
            act(),
            nn.Linear(hidden, NUM_CLASSES),
        )
    channels = int(settings["channels"])
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel_size=5, stride=2, padding=2),  # 28x28 -> 14x14
        act(),
        nn.AvgPool2d(2),  # -> 7x7
        nn.Flatten(),
        nn.Linear(channels * 7 * 7, NUM_CLASSES),
    )


def site_partition(
    data: TaskData, *, num_sites: int, scheme: str, seed: int, alpha: float = 0.5
) -> list[TaskData]:
    """Each site's share of ``data``: disjoint, covering, deterministic from ``seed``.

    ``"iid"`` shuffles train and test evenly across sites. ``"non-iid"`` skews the train labels
    with Dirichlet(``alpha``) weights per class but still splits the test set iid: every site
    then evaluates on the population distribution, so iid and non-iid runs are compared on
    the same kind of test data and the weighted mean of site metrics is the global metric.
    """
    return partition_sites(
        data,
        num_sites=num_sites,
        scheme=scheme,
        seed=seed,
        non_iid=lambda s: dirichlet_partition(data.y_train.numpy(), num_sites, alpha, s),
        alpha=alpha,
    )
