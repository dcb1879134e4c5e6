"""Hostile input: the helpers of the fuzzed key-file, config, IDX, DICOM and site-reply tests.

Those tests live with their topics (``engine/test_keys.py``, ``federation/test_config.py``,
``tasks/test_mnist_idx.py``, ``tasks/test_dicom_reader.py``, ``federation/test_aggregation.py``).
Every malformed input must end in the documented error (``KeyFileError``, ``ConfigError``,
``MnistDataError``, a DICOM skip with its reason, ``InvalidUpdate``) and never in another
exception; a writer that fails must leave no partial file behind. Each property is bounded to
a modest number of examples so the suite stays fast; ``tried`` counts every hostile case, and
``tests/conftest.py`` prints the total after the run (summed over the xdist workers). Inputs
that once crashed a library module are pinned by their own tests beside the properties.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

TRIED: Counter[str] = Counter()
"""Hostile cases tried per area in this process (printed by ``tests/conftest.py``)."""

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = settings(FUZZ, max_examples=25)

quiet = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
"""On every hostile-input test: pydicom and numpy warn about the hostile values themselves."""


def tried(area: str) -> None:
    """Count one hostile case of ``area`` ("key file", "config", "idx", ...)."""
    TRIED[area] += 1


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh directory per hypothesis example (function fixtures are shared by examples)."""
    with tempfile.TemporaryDirectory(prefix="hostile-") as name:
        yield Path(name)


def expect(
    error: type[Exception],
    call: Callable[[], Any],
    accept: type | tuple[type, ...] | None = None,
) -> Any:
    """Run ``call``: it must raise ``error`` or (if given) return an ``accept`` instance."""
    try:
        result = call()
    except error as exc:
        assert str(exc), "the error must say what is wrong"
        return exc
    assert accept is not None and isinstance(result, accept), f"accepted hostile input: {result!r}"
    return result


def mutate(blob: bytes, data: st.DataObject) -> bytes:
    """Flip, overwrite, insert, delete or truncate a few bytes of ``blob``."""
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if not out:
            break
        kind = data.draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, len(out) - 1), label="offset")
        if kind == "flip":
            out[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = data.draw(st.binary(min_size=1, max_size=8))
            out[at : at + len(chunk)] = chunk
        elif kind == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[at : at + data.draw(st.integers(1, 16))]
        else:
            del out[at:]
    return bytes(out)


def no_temporaries(folder: Path, keep: set[str]) -> None:
    """Nothing but ``keep`` is left under ``folder`` (no partial or temporary file)."""
    left = sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name not in keep)
    assert left == [], f"partial or temporary files left behind: {left}"
