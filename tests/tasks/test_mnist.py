"""MNIST task: verified loading of the shared digits, loader failure modes, partitions, models.

Uses the real 10,000-digit test split from ``../shared/data/mnist`` (beside the checkout); the
standard 60,000-digit training files are synthesised (raw IDX) where a test needs all four.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from federation.tasks import mnist
from federation.tasks.base import TaskData
from federation.tasks.mnist import (
    DEFAULTS,
    ENV_DIR,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    MnistDataError,
    MnistFilesMissingError,
    build_model,
    carve_indices,
    download_mnist,
    load_task_data,
    read_idx,
    site_partition,
)
from tests.paths import SHARED_MNIST

SHARED = SHARED_MNIST
IMAGES_GZ = SHARED / TEST_IMAGES.gz_name
LABELS_GZ = SHARED / TEST_LABELS.gz_name
# Published with MNIST (and in shared/data/mnist/README.md); kept here independently of the
# module so a typo in either place fails the test.
CANONICAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
ENGINE_LAYERS = (nn.Flatten, nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.Sigmoid, nn.Tanh, nn.Softplus)

pytestmark = pytest.mark.skipif(
    not (IMAGES_GZ.is_file() and LABELS_GZ.is_file()),
    reason=f"shared MNIST test split not found in {SHARED} (expected beside the checkout)",
)


@pytest.fixture(scope="module")
def data() -> TaskData:
    return load_task_data(data_dir=SHARED)


@pytest.fixture(scope="module")
def raw_test_split() -> tuple[bytes, bytes]:
    """Decompressed (raw IDX) bytes of the shared images and labels."""
    return gzip.decompress(IMAGES_GZ.read_bytes()), gzip.decompress(LABELS_GZ.read_bytes())


def _copy_shared(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for src in (IMAGES_GZ, LABELS_GZ):
        shutil.copyfile(src, directory / src.name)
    return directory


def _write_raw(directory: Path, raw: tuple[bytes, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TEST_IMAGES.stem).write_bytes(raw[0])
    (directory / TEST_LABELS.stem).write_bytes(raw[1])
    return directory


# --- the shared split -------------------------------------------------------------------------


def test_shared_files_have_canonical_checksums() -> None:
    for path in (IMAGES_GZ, LABELS_GZ):
        assert hashlib.md5(path.read_bytes()).hexdigest() == CANONICAL_MD5[path.name]
    specs = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
    assert {spec.gz_name: spec.md5 for spec in specs} == CANONICAL_MD5


def test_default_load_carves_8000_and_2000_real_digits(data: TaskData) -> None:
    assert data.kind == "classification" and data.num_classes == 10
    assert data.class_names == tuple("0123456789")
    assert data.feature_range == (0.0, 1.0)
    assert data.x_train.shape == (8000, 1, 28, 28) and data.x_test.shape == (2000, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    for x in (data.x_train, data.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    for y in (data.y_train, data.y_test):
        counts = torch.bincount(y, minlength=10)
        assert len(counts) == 10 and int(counts.min()) > 0.05 * len(y)
    assert data.info["mode"] == "carve" and data.info["split"] == "auto"
    assert data.info["files"] == {str(IMAGES_GZ): "md5", str(LABELS_GZ): "md5"}


def test_carving_is_deterministic_disjoint_and_matches_the_files(data: TaskData) -> None:
    train_idx, test_idx = carve_indices(10000, 8000, 2000, seed=0)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert len(np.union1d(train_idx, test_idx)) == 10000
    images, labels = read_idx(IMAGES_GZ), read_idx(LABELS_GZ)
    assert torch.equal(data.y_train, torch.from_numpy(labels[train_idx].astype(np.int64)))
    assert torch.equal(data.x_test[:, 0] * 255, torch.from_numpy(images[test_idx]).float())
    again = carve_indices(10000, 8000, 2000, seed=0)
    other = carve_indices(10000, 8000, 2000, seed=1)
    assert np.array_equal(again[0], train_idx) and not np.array_equal(other[0], train_idx)


def test_carve_sizes_and_seed() -> None:
    small = load_task_data(data_dir=SHARED, split="carve", n_train=300, n_test=100, seed=7)
    assert len(small.y_train) == 300 and len(small.y_test) == 100
    again = load_task_data(data_dir=SHARED, split="carve", n_train=300, n_test=100, seed=7)
    assert torch.equal(small.x_train, again.x_train) and torch.equal(small.y_test, again.y_test)
    for n_train, n_test in ((9000, 1001), (0, 10), (10, 0)):
        with pytest.raises(ValueError, match="cannot carve"):
            load_task_data(data_dir=SHARED, n_train=n_train, n_test=n_test)
    with pytest.raises(ValueError, match="split must be"):
        load_task_data(data_dir=SHARED, split="train")


def test_defaults_match_signatures() -> None:
    for fn in (load_task_data, site_partition):
        for name, param in inspect.signature(fn).parameters.items():
            if param.default is not inspect.Parameter.empty:
                assert DEFAULTS[name] == param.default, name
    layers = build_model(DEFAULTS["arch"])  # type: ignore[arg-type]
    assert layers[1].out_features == DEFAULTS["hidden"]
    assert build_model("cnn")[0].out_channels == DEFAULTS["channels"]


# --- where the data comes from ----------------------------------------------------------------


def test_missing_files_name_the_files_and_directory(tmp_path: Path) -> None:
    with pytest.raises(MnistFilesMissingError) as caught:
        load_task_data(data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert TEST_IMAGES.gz_name in message and TEST_LABELS.gz_name in message
    assert ENV_DIR in message and "task.options.download" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_standard_split_requires_all_four_files(tmp_path: Path) -> None:
    _copy_shared(tmp_path)
    with pytest.raises(MnistFilesMissingError, match=re.escape(TRAIN_IMAGES.gz_name)) as caught:
        load_task_data(data_dir=tmp_path, split="standard")
    assert TRAIN_LABELS.gz_name in str(caught.value)
    assert TEST_IMAGES.gz_name not in str(caught.value)


def test_auto_uses_the_standard_split_when_all_four_files_exist(tmp_path: Path) -> None:
    _copy_shared(tmp_path)
    images, labels = read_idx(IMAGES_GZ), read_idx(LABELS_GZ)
    header_x = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (60000, 28, 28))
    header_y = (0x801).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    (tmp_path / TRAIN_IMAGES.stem).write_bytes(header_x + np.tile(images, (6, 1, 1)).tobytes())
    (tmp_path / TRAIN_LABELS.stem).write_bytes(header_y + np.tile(labels, 6).tobytes())
    full = load_task_data(data_dir=tmp_path)
    assert full.info["mode"] == "standard"
    assert len(full.y_train) == 60000 and len(full.y_test) == 10000
    assert full.info["files"][str(tmp_path / TRAIN_IMAGES.stem)] == "structure"  # type: ignore[index]
    assert full.info["files"][str(tmp_path / TEST_IMAGES.gz_name)] == "md5"  # type: ignore[index]
    carved = load_task_data(data_dir=tmp_path, split="carve")
    assert carved.info["mode"] == "carve" and len(carved.y_train) == 8000


def test_env_var_is_used_and_argument_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DIR, str(SHARED))
    assert load_task_data(n_train=10, n_test=10).info["data_dir"] == str(SHARED)
    with pytest.raises(MnistFilesMissingError, match=re.escape(str(tmp_path))):
        load_task_data(data_dir=tmp_path)


def test_raw_files_are_accepted_and_structure_checked(
    tmp_path: Path, raw_test_split: tuple[bytes, bytes], data: TaskData
) -> None:
    _write_raw(tmp_path, raw_test_split)
    raw = load_task_data(data_dir=tmp_path)
    assert torch.equal(raw.x_train, data.x_train) and torch.equal(raw.y_test, data.y_test)
    assert set(raw.info["files"].values()) == {"structure"}  # type: ignore[attr-defined]


# --- corrupt files ----------------------------------------------------------------------------


def test_bad_checksum_names_the_file(tmp_path: Path) -> None:
    _copy_shared(tmp_path)
    with (tmp_path / TEST_LABELS.gz_name).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MnistDataError, match=r"t10k-labels-idx1-ubyte\.gz: md5 checksum mismatch"):
        load_task_data(data_dir=tmp_path)


def test_recompressed_gzip_fails_the_checksum(
    tmp_path: Path, raw_test_split: tuple[bytes, bytes]
) -> None:
    _copy_shared(tmp_path)
    (tmp_path / TEST_IMAGES.gz_name).write_bytes(
        gzip.compress(raw_test_split[0], compresslevel=1, mtime=0)
    )
    with pytest.raises(MnistDataError, match="md5 checksum mismatch"):
        load_task_data(data_dir=tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-1000], "truncated: dims"),
        (lambda b: b[:10], r"truncated IDX header \(10 of 16 bytes\)"),
        (lambda b: b[:3], "too short for an IDX header"),
        (lambda b: b + b"\0\0", "2 unexpected trailing bytes"),
        (lambda b: (0x801).to_bytes(4, "big") + b[4:], "wrong magic number 0x00000801"),
        (lambda b: b"\x89PNG" + b[4:], "wrong magic number 0x89504e47"),
        (lambda b: b[:4] + (9999).to_bytes(4, "big") + b[8 : 16 + 9999 * 784], r"dims \(9999,"),
        (
            lambda b: gzip.compress(b, compresslevel=1),
            "is gzip-compressed; name it t10k-images-idx3-ubyte.gz",
        ),
    ],
)
def test_corrupt_raw_images_give_clear_errors(
    tmp_path: Path, raw_test_split: tuple[bytes, bytes], damage, message: str
) -> None:
    _write_raw(tmp_path, raw_test_split)
    path = tmp_path / TEST_IMAGES.stem
    path.write_bytes(damage(raw_test_split[0]))
    with pytest.raises(MnistDataError, match=message) as caught:
        load_task_data(data_dir=tmp_path)
    assert str(path) in str(caught.value)


def test_labels_out_of_range_and_swapped_files(
    tmp_path: Path, raw_test_split: tuple[bytes, bytes]
) -> None:
    images, labels = raw_test_split
    _write_raw(tmp_path, (images, labels[:-1] + b"\x0a"))
    with pytest.raises(MnistDataError, match=r"label 10 outside 0\.\.9"):
        load_task_data(data_dir=tmp_path)
    _write_raw(tmp_path, (labels, images))
    with pytest.raises(MnistDataError, match="wrong magic number 0x00000801"):
        load_task_data(data_dir=tmp_path)


def test_read_idx_parses_generic_idx_and_rejects_garbage(tmp_path: Path) -> None:
    values = np.arange(6, dtype=">i2").reshape(2, 3)
    path = tmp_path / "shorts.idx"
    path.write_bytes(
        b"\0\0\x0b\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + values.tobytes()
    )
    assert np.array_equal(read_idx(path), values)
    path.write_bytes(gzip.compress(path.read_bytes()))
    assert np.array_equal(read_idx(path), values)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(MnistDataError, match="corrupt or truncated gzip"):
        read_idx(path)
    path.write_bytes(b"\0\0\x07\x01" + (1).to_bytes(4, "big") + b"\0")
    with pytest.raises(MnistDataError, match="bad IDX magic number 0x00000701"):
        read_idx(path)
    with pytest.raises(MnistDataError, match="cannot read"):
        read_idx(tmp_path / "absent")


# --- download (through file:// mirrors: tests never touch the network) ---------------------


def test_download_fetches_verifies_and_falls_back(tmp_path: Path) -> None:
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    (bad / TEST_IMAGES.gz_name).write_bytes(b"not mnist")
    target = tmp_path / "data"
    mirrors = (bad.as_uri() + "/", SHARED.as_uri() + "/")
    written = download_mnist(target, (TEST_IMAGES, TEST_LABELS), mirrors=mirrors)
    assert written == [target / TEST_IMAGES.gz_name, target / TEST_LABELS.gz_name]
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in written)
    assert download_mnist(target, (TEST_IMAGES, TEST_LABELS), mirrors=mirrors) == []


def test_download_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    (bad / TEST_IMAGES.gz_name).write_bytes(b"not mnist")
    target = tmp_path / "data"
    with pytest.raises(MnistDataError, match="does not match the canonical") as caught:
        download_mnist(target, (TEST_IMAGES,), mirrors=(bad.as_uri() + "/",))
    assert "could not download t10k-images-idx3-ubyte.gz" in str(caught.value)
    assert list(target.iterdir()) == []


def test_load_downloads_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "MIRRORS", (SHARED.as_uri() + "/",))
    with pytest.raises(MnistFilesMissingError):
        load_task_data(data_dir=tmp_path)
    got = load_task_data(data_dir=tmp_path, split="carve", download=True, n_train=50, n_test=50)
    assert got.info["files"] == {
        str(tmp_path / TEST_IMAGES.gz_name): "md5",
        str(tmp_path / TEST_LABELS.gz_name): "md5",
    }
    with pytest.raises(MnistDataError, match=r"could not download train-images-idx3-ubyte\.gz"):
        load_task_data(data_dir=tmp_path, download=True)


# --- partitions -------------------------------------------------------------------------------


def _indexed(data: TaskData) -> TaskData:
    """``data`` with each feature row replaced by its row number, so shares reveal their rows."""
    return replace(
        data,
        x_train=torch.arange(len(data.y_train)).float(),
        x_test=torch.arange(len(data.y_test)).float(),
    )


def _rows(parts: list[TaskData], attr: str) -> list[np.ndarray]:
    return [getattr(p, attr).long().numpy() for p in parts]


@pytest.mark.parametrize("scheme", ["iid", "non-iid"])
def test_partitions_are_deterministic_disjoint_and_covering(data: TaskData, scheme: str) -> None:
    indexed = _indexed(data)
    parts = site_partition(indexed, num_sites=5, scheme=scheme, seed=3)
    again = site_partition(indexed, num_sites=5, scheme=scheme, seed=3)
    other = site_partition(indexed, num_sites=5, scheme=scheme, seed=4)
    for attr, n in (("x_train", 8000), ("x_test", 2000)):
        rows = _rows(parts, attr)
        assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(n))
        assert all(np.array_equal(a, b) for a, b in zip(rows, _rows(again, attr), strict=True))
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(_rows(parts, "x_train"), _rows(other, "x_train"), strict=True)
    )
    for site, part in enumerate(parts):
        assert torch.equal(part.y_train, data.y_train[part.x_train.long()])
        assert part.info["partition"]["site"] == site  # type: ignore[index]
        assert part.info["mode"] == "carve"
    assert [len(p.y_test) for p in parts] == [400] * 5  # the test split is iid in both schemes


def _skew(parts: list[TaskData], labels: torch.Tensor) -> float:
    """Largest total-variation distance between a site's label mix and the global one."""
    overall = torch.bincount(labels, minlength=10).double() / len(labels)
    return max(
        0.5
        * float(
            (torch.bincount(p.y_train, minlength=10).double() / len(p.y_train) - overall)
            .abs()
            .sum()
        )
        for p in parts
    )


def test_non_iid_skews_labels_and_iid_does_not(data: TaskData) -> None:
    iid = site_partition(data, num_sites=5, scheme="iid", seed=0)
    skewed = site_partition(data, num_sites=5, scheme="non-iid", seed=0, alpha=0.1)
    assert max(abs(len(p.y_train) - 1600) for p in iid) <= 1
    assert _skew(iid, data.y_train) < 0.05
    assert _skew(skewed, data.y_train) > 0.4
    assert skewed[0].info["partition"]["alpha"] == 0.1  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown partition scheme"):
        site_partition(data, num_sites=2, scheme="dirichlet", seed=0)


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("mlp", {}),
        ("mlp", {"hidden": 32, "activation": "sigmoid"}),
        ("cnn", {}),
        ("cnn", {"channels": 4, "activation": "softplus"}),
    ],
)
def test_models_use_engine_layers_and_output_logits(arch: str, options: dict) -> None:
    model = build_model(arch, **options)
    assert isinstance(model, nn.Sequential)
    assert all(isinstance(layer, ENGINE_LAYERS) for layer in model)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_model_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown MNIST arch"):
        build_model("resnet")
    with pytest.raises(TypeError, match="channels"):
        build_model("mlp", channels=4)
    with pytest.raises(ValueError, match="activation must be one of"):
        build_model("mlp", activation="relu")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small batches train faster on one thread (and do not fight parallel test workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_short_training_learns(data: TaskData) -> None:
    """One epoch of the documented recipe already classifies most held-out digits."""
    torch.manual_seed(0)
    model = build_model("mlp")
    recipe = mnist.RECIPES["mlp"]
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe["lr"],
        momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"],
    )
    batch = int(recipe["batch_size"])
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = data.metrics(model(data.x_test), data.y_test)["accuracy"]
    assert accuracy > 0.8, accuracy
