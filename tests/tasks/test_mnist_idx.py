"""IDX files (the MNIST format) as a hostile party writes them: ``read_idx`` and the MNIST
loader refuse every malformed file with ``MnistDataError`` (fuzzed: see tests/hostile.py).

Apart from ``test_mnist.py`` because these need no shared MNIST files (that module skips
without them).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.tasks.mnist import MnistDataError, load_task_data, read_idx
from tests.hostile import FUZZ, SMALL, expect, mutate, quiet, scratch, tried

_IDX_CODES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    header = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


def _check_idx(path: Path, blob: bytes) -> None:
    """read_idx either raises MnistDataError or returns exactly what the header declares."""
    result = expect(MnistDataError, lambda: read_idx(path), np.ndarray)
    if isinstance(result, np.ndarray):
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3]))
        assert result.shape == dims
        assert result.dtype == np.dtype(_IDX_CODES[raw[2]]).newbyteorder("=")


@quiet
@FUZZ
@given(blob=st.binary(max_size=64), gz=st.booleans())
def test_idx_reader_refuses_random_bytes(blob: bytes, gz: bool) -> None:
    tried("idx")
    blob = gzip.compress(blob) if gz else blob
    with scratch() as folder:
        path = folder / "random-idx"
        path.write_bytes(blob)
        _check_idx(path, blob)


@quiet
@FUZZ
@given(
    code=st.sampled_from([*_IDX_CODES, 0x00, 0x0A, 0xFF]),
    dims=st.lists(
        st.one_of(st.integers(0, 4), st.just(2**32 - 1), st.integers(0, 2**32 - 1)), max_size=4
    ),
    extra=st.integers(-8, 8),
    gz=st.sampled_from(["raw", "gzip", "truncated gzip"]),
    data=st.data(),
)
def test_idx_reader_checks_header_against_size(
    code: int, dims: list[int], extra: int, gz: str, data: st.DataObject
) -> None:
    """Headers that lie about type, rank or size are refused; honest ones parse exactly."""
    itemsize = np.dtype(_IDX_CODES.get(code, "u1")).itemsize
    tried("idx")
    size = math.prod(dims) if dims else 0
    wanted = max(0, min(size * itemsize, 256) + extra)
    blob = _idx(code, tuple(dims), data.draw(st.binary(min_size=wanted, max_size=wanted)))
    if gz != "raw":
        blob = gzip.compress(blob)
        if gz == "truncated gzip":
            blob = blob[: data.draw(st.integers(2, max(2, len(blob) - 1)))]
    with scratch() as folder:
        path = folder / "header.idx"
        path.write_bytes(blob)
        if gz == "truncated gzip":
            expect(MnistDataError, lambda: read_idx(path))
        else:
            _check_idx(path, blob)


@quiet
@FUZZ
@given(labels=st.lists(st.integers(0, 255), min_size=1, max_size=32), data=st.data())
def test_idx_reader_refuses_mutated_label_files(labels: list[int], data: st.DataObject) -> None:
    tried("idx")
    blob = mutate(_idx(0x08, (len(labels),), bytes(labels)), data)
    with scratch() as folder:
        path = folder / "labels-idx1-ubyte"
        path.write_bytes(blob)
        _check_idx(path, blob)


@quiet
@pytest.mark.parametrize(
    ("code", "dims"), [(0x08, (0, 2**32 - 1, 2**32 - 1)), (0x0E, (2**31, 2**31, 0, 2))]
)
def test_idx_reader_refuses_empty_arrays_with_impossible_dims(
    tmp_path: Path, code: int, dims: tuple[int, ...]
) -> None:
    tried("idx")
    path = tmp_path / "empty-idx"
    path.write_bytes(_idx(code, dims, b""))
    with pytest.raises(MnistDataError, match="impossibly large array") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


@quiet
def test_idx_reader_refuses_directories_and_missing_files(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "absent"):
        tried("idx")
        expect(MnistDataError, lambda path=path: read_idx(path))


@quiet
@SMALL
@given(
    images=st.binary(max_size=64) | st.just(_idx(0x08, (3, 28, 28), bytes(3 * 28 * 28))),
    labels=st.binary(max_size=32) | st.just(_idx(0x08, (3,), b"\x01\x0a\xff")),
    gz_names=st.booleans(),
)
def test_mnist_loader_refuses_hostile_files(images: bytes, labels: bytes, gz_names: bool) -> None:
    """Whatever sits under the canonical names, the loader raises MnistDataError."""
    tried("idx")
    suffix = ".gz" if gz_names else ""
    with scratch() as folder:
        (folder / f"t10k-images-idx3-ubyte{suffix}").write_bytes(images)
        (folder / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(labels)
        expect(MnistDataError, lambda: load_task_data(data_dir=folder, split="carve"))
