"""Key generation, the key file, loading errors and fingerprints."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.more.keys import (
    KEY_FORMAT,
    KeyFileError,
    MoreKey,
    generate_key,
    load_key,
    save_key,
)
from tests.hostile import FUZZ, expect, mutate, no_temporaries, quiet, scratch, tried


def test_generated_keys_are_well_conditioned_and_seeded() -> None:
    for seed in range(50):
        k = generate_key(seed)
        assert 1.0 <= k.condition_number <= 10.0
    assert np.array_equal(generate_key(3).matrix, generate_key(3).matrix)
    assert not np.array_equal(generate_key(None).matrix, generate_key(None).matrix)


def test_keys_refuse_what_is_not_a_2x2_matrix_with_a_32_byte_salt() -> None:
    with pytest.raises(ValueError, match=r"a MORE key is a 2x2 matrix, got shape \(3, 3\)"):
        MoreKey(np.eye(3), bytes(32))
    with pytest.raises(ValueError, match="a MORE key needs a 32-byte salt"):
        MoreKey(np.eye(2), bytes(16))
    with pytest.raises(ValueError, match="max_cond must be at least 3, got 2.5"):
        generate_key(0, max_cond=2.5)
    for seed in range(20):  # the smallest limit allowed: condition numbers in [1.5, 3 / 2]
        assert generate_key(seed, max_cond=3.0).condition_number <= 1.5 + 1e-9


def test_repr_never_shows_the_matrix(key: MoreKey) -> None:
    text = repr(key)
    assert key.fingerprint in text
    assert all(f"{v:.3}" not in text for v in key.matrix.ravel())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_save_load_round_trip_is_bit_exact(
    tmp_path_factory: pytest.TempPathFactory, seed: int
) -> None:
    path = tmp_path_factory.mktemp("keys") / "site.key"
    k = generate_key(seed)
    save_key(k, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_key(path)
    assert np.array_equal(loaded.matrix, k.matrix)
    assert loaded.fingerprint == k.fingerprint


def test_save_refuses_overwrite_and_leaves_no_temp_file(tmp_path, key) -> None:
    path = tmp_path / "k.json"
    save_key(key, path)
    with pytest.raises(FileExistsError):
        save_key(generate_key(1), path)
    assert load_key(path).fingerprint == key.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]


@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6))
def test_fingerprints_are_stable_and_distinct(a: int, b: int) -> None:
    assert generate_key(a).fingerprint == generate_key(a).fingerprint
    if a != b:
        assert generate_key(a).fingerprint != generate_key(b).fingerprint


def test_equivalent_keys_share_a_fingerprint(key: MoreKey) -> None:
    # S D encrypts exactly like S for any invertible diagonal D.
    scaled = MoreKey(key.matrix @ np.diag([-3.0, 0.5]), key.salt)
    assert scaled.fingerprint == key.fingerprint
    assert MoreKey(key.matrix, bytes(32)).fingerprint != key.fingerprint


def _write(path, payload) -> None:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    path.chmod(0o600)


def _payload(matrix, fingerprint=None, salt="ab" * 32):
    return {
        "format": "more-fl-key",
        "version": 1,
        "matrix": [[float(v).hex() for v in row] for row in matrix],
        "salt": salt,
        "fingerprint": fingerprint,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ({"format": "other"}, "'format'"),
        ({"format": "more-fl-key", "version": 99}, "unsupported version"),
        ({"format": "more-fl-key", "version": 1, "matrix": [[1, 2], [3, 4]]}, "hex floats"),
        ({"format": "more-fl-key", "version": 1, "matrix": [["0x1p0"]]}, "hex floats"),
        (_payload([[1.0, 2.0], [2.0, 4.0]]), "singular"),
        (_payload([[1.0, 0.0], [0.0, 1e-3]]), "condition number"),
        (_payload([[float("inf"), 0.0], [0.0, 1.0]]), "finite"),
        (_payload([[1.0, 0.2], [0.1, 1.0]], "0000-0000-0000-0000"), "does not match"),
        (_payload([[1.0, 0.2], [0.1, 1.0]], salt="00"), "'salt'"),
        (
            {"format": "more-fl-key", "version": 1, "matrix": [["0x1p0"] * 3] * 2},
            r"2 rows of 2 hex floats \(shape \(2, 3\)\)",
        ),
    ],
)
def test_bad_key_files_are_refused_with_the_file_named(tmp_path, content, message) -> None:
    path = tmp_path / "bad.key"
    _write(path, content)
    with pytest.raises(KeyFileError, match=message) as info:
        load_key(path)
    assert str(path) in str(info.value)


def test_missing_key_file_says_how_to_make_one(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="more-fl keygen"):
        load_key(tmp_path / "absent.key")


def test_keys_refuse_pickling(key: MoreKey) -> None:
    import pickle

    with pytest.raises(TypeError, match="never leaves"):
        pickle.dumps(key)


def _hex_digit_edits(entry: str) -> list[str]:
    """``entry`` with each of its hex digits (mantissa and exponent) changed, and its sign."""
    edits = []
    start = entry.index("x") + 1
    for i in range(start, len(entry)):
        if entry[i] in "0123456789abcdef":
            alphabet = "0123456789" if i > entry.index("p") else "0123456789abcdef"
            new = alphabet[(alphabet.index(entry[i]) + 1) % len(alphabet)]
            edits.append(entry[:i] + new + entry[i + 1 :])
    edits.append(entry[1:] if entry.startswith("-") else "-" + entry)
    return edits


@pytest.mark.parametrize("seed", [0, 1, 2024])
def test_every_edited_digit_of_every_entry_is_refused(tmp_path, seed: int) -> None:
    """The fingerprint rounds (equivalent keys share it); the checksum covers every bit."""
    path = save_key(generate_key(seed), tmp_path / "k.key")
    original = json.loads(path.read_text())
    tried = 0
    for i in range(2):
        for j in range(2):
            for edited in _hex_digit_edits(original["matrix"][i][j]):
                payload = json.loads(json.dumps(original))
                payload["matrix"][i][j] = edited
                _write(path, payload)
                with pytest.raises(KeyFileError, match="corrupt or was edited") as info:
                    load_key(path)
                assert str(path) in str(info.value)
                tried += 1
    assert tried >= 4 * 15  # 13 mantissa digits, the leading digit, an exponent digit, sign


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), entry=st.integers(0, 3), bit=st.integers(0, 63))
def test_any_flipped_bit_of_an_entry_is_refused(
    tmp_path_factory: pytest.TempPathFactory, seed: int, entry: int, bit: int
) -> None:
    path = save_key(generate_key(seed), tmp_path_factory.mktemp("keys") / "k.key")
    payload = json.loads(path.read_text())
    bits = np.array([float.fromhex(v) for row in payload["matrix"] for v in row]).view(np.uint64)
    bits[entry] ^= np.uint64(1) << np.uint64(bit)
    payload["matrix"] = [
        [float(v).hex() for v in row] for row in bits.view(np.float64).reshape(2, 2)
    ]
    _write(path, payload)
    with pytest.raises(KeyFileError):
        load_key(path)


def test_version_1_files_without_a_checksum_still_load(tmp_path, key: MoreKey) -> None:
    path = tmp_path / "old.key"
    _write(path, _payload(key.matrix, key.fingerprint, salt=key.salt.hex()))
    assert load_key(path).fingerprint == key.fingerprint
    saved = json.loads(save_key(key, tmp_path / "new.key").read_text())
    assert saved["version"] == 2 and len(saved["checksum"]) == 64
    del saved["checksum"]
    _write(path, saved)
    with pytest.raises(KeyFileError, match="'checksum' does not match"):
        load_key(path)


def test_a_corrupt_world_readable_key_file_raises_its_error_and_no_warning(tmp_path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("garbage")
    path.chmod(0o644)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyFileError, match="not valid JSON"):
            load_key(path)


def test_a_good_world_readable_key_file_loads_with_a_warning(tmp_path, key: MoreKey) -> None:
    path = save_key(key, tmp_path / "k.key")
    path.chmod(0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        assert load_key(path).fingerprint == key.fingerprint


def test_save_creates_missing_directories_only_when_asked(tmp_path, key: MoreKey) -> None:
    path = tmp_path / "keys" / "site.key"
    with pytest.raises(FileNotFoundError) as info:
        save_key(key, path)
    assert info.value.filename == str(path) and not path.parent.exists()
    assert load_key(save_key(key, path, parents=True)).fingerprint == key.fingerprint
    with pytest.raises(FileExistsError) as exists:
        save_key(key, path)
    assert exists.value.filename == str(path) and "overwrite=True" not in str(exists.value)


def test_a_failed_write_names_the_key_file_not_its_temporary(tmp_path, monkeypatch, key) -> None:
    import tempfile

    def refuse(*_: object, dir: str, **__: object) -> None:
        raise PermissionError(13, "Permission denied", f"{dir}/.site.key.x1y2.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    path = tmp_path / "site.key"
    with pytest.raises(PermissionError) as info:
        save_key(key, path)
    assert info.value.filename == str(path) and ".tmp" not in str(info.value)


# --- Hostile key files (fuzzed: see tests/hostile.py) ---------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
_ENTRY = st.one_of(
    st.floats().map(float.hex),
    st.sampled_from(["nan", "inf", "-inf", "0x0p+0", "0x1p-1074", "", "0x", "1.5"]),
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
)


def _write_key_text(folder: Path, text: str | bytes) -> Path:
    path = folder / "site.key"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(text)
    path.chmod(0o600)
    return path


def _key_payload(key: MoreKey) -> dict[str, Any]:
    return {
        "format": KEY_FORMAT,
        "version": 1,
        "matrix": [[float(v).hex() for v in row] for row in key.matrix],
        "salt": key.salt.hex(),
        "fingerprint": key.fingerprint,
    }


def _loads_or_refuses(path: Path) -> None:
    key = expect(KeyFileError, lambda: load_key(path), MoreKey)
    if isinstance(key, MoreKey):
        stored = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
        assert stored == key.fingerprint


@quiet
@FUZZ
@given(blob=st.binary(max_size=300))
def test_key_loader_refuses_random_bytes(blob: bytes) -> None:
    tried("key file")
    with scratch() as folder:
        expect(KeyFileError, lambda: load_key(_write_key_text(folder, blob)))


@quiet
@FUZZ
@given(payload=_JSON)
def test_key_loader_refuses_random_json(payload: Any) -> None:
    tried("key file")
    with scratch() as folder:
        path = _write_key_text(folder, json.dumps(payload))
        expect(KeyFileError, lambda: load_key(path))


@quiet
@FUZZ
@given(
    fmt=st.sampled_from([KEY_FORMAT, "more-fl-key ", "", None, 1]),
    version=st.sampled_from([1, 1.0, True, 2, "1", None]),
    matrix=st.one_of(
        st.just("real"),
        st.lists(st.lists(_ENTRY, min_size=0, max_size=3), min_size=0, max_size=3),
        _JSON,
    ),
    salt=st.one_of(
        st.just("real"),
        st.binary(max_size=40).map(bytes.hex),
        st.text(max_size=70),
        st.integers(),
        st.none(),
    ),
    fingerprint=st.one_of(st.just("real"), st.text(max_size=20), st.none(), st.integers()),
    seed=st.integers(0, 2**16),
)
def test_key_loader_refuses_key_shaped_garbage(
    fmt: Any, version: Any, matrix: Any, salt: Any, fingerprint: Any, seed: int
) -> None:
    """A near-valid payload loads only when every field is right, else KeyFileError."""
    tried("key file")
    real = _key_payload(generate_key(seed))
    payload = {
        "format": fmt,
        "version": version,
        "matrix": real["matrix"] if matrix == "real" else matrix,
        "salt": real["salt"] if salt == "real" else salt,
        "fingerprint": real["fingerprint"] if fingerprint == "real" else fingerprint,
    }
    with scratch() as folder:
        _loads_or_refuses(_write_key_text(folder, json.dumps(payload)))


@quiet
@FUZZ
@given(seed=st.integers(0, 2**16), data=st.data())
def test_key_loader_refuses_mutated_key_files(seed: int, data: st.DataObject) -> None:
    """Byte mutations of a real key file: refused, or still the key its fingerprint names."""
    blob = json.dumps(_key_payload(generate_key(seed)), indent=2).encode()
    mutated = mutate(blob, data)
    with scratch() as folder:
        path = _write_key_text(folder, mutated)
        tried("key file")
        _loads_or_refuses(path)


@quiet
@FUZZ
@given(
    matrix=st.lists(
        st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from([np.nan, np.inf, -np.inf, 1e-200, 1e200]),
        min_size=4,
        max_size=4,
    )
)
def test_key_loader_refuses_unusable_matrices_with_their_own_fingerprint(
    matrix: list[float],
) -> None:
    """Singular, ill-conditioned or non-finite matrices are refused even when the stored
    fingerprint is self-consistent (a tamperer can recompute it)."""
    tried("key file")
    m, salt = np.array(matrix).reshape(2, 2), bytes(range(32))
    try:
        key = MoreKey(m, salt)
    except ValueError:
        key = None
    payload = {
        "format": KEY_FORMAT,
        "version": 1,
        "matrix": [[float(v).hex() for v in row] for row in m],
        "salt": salt.hex(),
        "fingerprint": key.fingerprint if key else "0000-0000-0000-0000",
    }
    with scratch() as folder:
        path = _write_key_text(folder, json.dumps(payload))
        if key is None:
            expect(KeyFileError, lambda: load_key(path))
        else:
            assert load_key(path).fingerprint == key.fingerprint


@quiet
def test_key_loader_refuses_directories_and_missing_files(tmp_path: Path) -> None:
    tried("key file")
    expect(KeyFileError, lambda: load_key(tmp_path))
    tried("key file")
    expect(KeyFileError, lambda: load_key(tmp_path / "absent.key"))


@quiet
def test_key_loader_refuses_deeply_nested_json(tmp_path: Path) -> None:
    tried("key file")
    with pytest.raises(KeyFileError, match="nested too deeply"):
        load_key(_write_key_text(tmp_path, "[" * 100_000))


@quiet
@pytest.mark.parametrize("entry", [1e200, 1e-200])
def test_key_loader_refuses_huge_and_tiny_entries(tmp_path: Path, entry: float) -> None:
    tried("key file")
    payload = _key_payload(generate_key(0))
    payload["matrix"] = [[entry.hex(), "0x0p+0"], ["0x0p+0", entry.hex()]]
    with pytest.raises(KeyFileError, match="largest entry must have a magnitude between"):
        load_key(_write_key_text(tmp_path, json.dumps(payload)))


@quiet
def test_failed_key_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried("atomic writes")

    def fail(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        save_key(generate_key(1), tmp_path / "site.key")
    no_temporaries(tmp_path, keep=set())
