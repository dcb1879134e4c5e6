"""Key generation, the key file, loading errors and fingerprints."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.more.keys import KeyFileError, MoreKey, generate_key, load_key, save_key


def test_generated_keys_are_well_conditioned_and_seeded() -> None:
    for seed in range(50):
        k = generate_key(seed)
        assert 1.0 <= k.condition_number <= 10.0
    assert np.array_equal(generate_key(3).matrix, generate_key(3).matrix)
    assert not np.array_equal(generate_key(None).matrix, generate_key(None).matrix)


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
