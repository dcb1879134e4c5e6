"""MORE secret keys: generation, a documented key file, loading with checks, fingerprints.

A key is a real invertible 2x2 matrix ``S``. Encryption maps ``x`` to ``S diag(x, r) S^-1``,
so decryption error grows like ``cond(S)^2``: keys are drawn with a bounded condition number
and loading refuses ill-conditioned ones, and ones whose largest entry lies outside
[1e-100, 1e100] (where products of entries would over- or underflow).

Key file format (JSON, UTF-8, written atomically with mode 0600)::

    {
      "format": "more-fl-key",
      "version": 2,
      "matrix": [["<float.hex>", "<float.hex>"], ["<float.hex>", "<float.hex>"]],
      "salt": "<64 hex digits>",
      "fingerprint": "<fingerprint of the key, checked on load>",
      "checksum": "<64 hex digits: SHA-256 of the exact bits of the entries and the salt>"
    }

Entries are stored with ``float.hex`` so a key round-trips bit for bit. The fingerprint is
``SHA-256(domain, salt, canonical S)``: the secret salt makes it useless for confirming a
guessed key (without it, an attacker who recovers an equivalent key from one ciphertext,
see SECURITY.md, could use the public fingerprint to learn which channel holds the data).
The canonical form is rounded so that equivalent keys ``S D`` share the fingerprint, which
therefore cannot notice an edit of the last digits of an entry: the checksum covers the
exact IEEE bits, so any edited digit is refused. Version 1 files (no checksum) still load,
checked by their fingerprint only; rewriting them with :func:`save_key` adds the checksum.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import warnings
from pathlib import Path

import numpy as np

from federation.atomic import atomic_write_bytes

KEY_FORMAT = "more-fl-key"
KEY_VERSION = 2
_READABLE_VERSIONS = (1, KEY_VERSION)  # version 1: the same file without "checksum"
DEFAULT_MAX_COND = 10.0
_FINGERPRINT_DOMAIN = b"more-fl/key-fingerprint/v1\x00"
_CHECKSUM_DOMAIN = b"more-fl/key-file-checksum/v2\x00"
_MIN_SCALE, _MAX_SCALE = 1e-100, 1e100  # keeps products of entries far from over/underflow


class KeyFileError(ValueError):
    """A key file is missing, malformed, or holds an unusable key."""


class MoreKey:
    """A MORE secret key. Its repr shows only the fingerprint, never the matrix."""

    __slots__ = ("_matrix", "_inverse", "_salt", "_fingerprint")

    def __init__(
        self, matrix: np.ndarray, salt: bytes, *, max_cond: float = DEFAULT_MAX_COND
    ) -> None:
        m = np.array(matrix, dtype=np.float64)
        if m.shape != (2, 2):
            raise ValueError(f"a MORE key is a 2x2 matrix, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("a MORE key must have finite entries")
        scale = float(np.abs(m).max())  # singularity and conditioning ignore the scale
        if scale == 0.0 or abs(float(np.linalg.det(m / scale))) <= 1e-12:
            raise ValueError("a MORE key must be invertible; this matrix is singular")
        if not _MIN_SCALE <= scale <= _MAX_SCALE:
            raise ValueError(
                f"a MORE key's largest entry must have a magnitude between {_MIN_SCALE:g} and "
                f"{_MAX_SCALE:g}, got {scale:.3g}"
            )
        cond = float(np.linalg.cond(m / scale))
        if not cond <= max_cond:
            raise ValueError(
                f"key condition number {cond:.3g} exceeds the limit {max_cond:g}; decryption "
                "error grows like cond^2, so generate a new key with `more-fl keygen`"
            )
        m.setflags(write=False)
        inv = np.linalg.inv(m)
        inv.setflags(write=False)
        if not isinstance(salt, bytes) or len(salt) != 32:
            raise ValueError("a MORE key needs a 32-byte salt")
        self._matrix = m
        self._inverse = inv
        self._salt = salt
        self._fingerprint = _fingerprint(m, salt)

    @property
    def matrix(self) -> np.ndarray:
        """The secret matrix ``S`` (read-only)."""
        return self._matrix

    @property
    def inverse(self) -> np.ndarray:
        """``S^-1`` (read-only)."""
        return self._inverse

    @property
    def salt(self) -> bytes:
        """Secret salt of the fingerprint (part of the key)."""
        return self._salt

    @property
    def fingerprint(self) -> str:
        """Identifies the key (equal for equivalent keys) and reveals nothing about it."""
        return self._fingerprint

    @property
    def condition_number(self) -> float:
        return float(np.linalg.cond(self._matrix))

    def __repr__(self) -> str:
        return f"MoreKey(fingerprint={self._fingerprint!r})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("MORE keys are not pickled: a key never leaves its site")


def _canonical(matrix: np.ndarray) -> np.ndarray:
    """Column-normalised form: ``S D`` encrypts exactly like ``S`` for any diagonal ``D``."""
    cols = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)
    for j in range(2):
        if cols[np.argmax(np.abs(cols[:, j])), j] < 0:
            cols[:, j] = -cols[:, j]
    return np.round(cols, 10) + 0.0  # + 0.0 turns -0.0 into 0.0


def _fingerprint(matrix: np.ndarray, salt: bytes) -> str:
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN + salt + _canonical(matrix).tobytes()).hexdigest()
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def _checksum(matrix: np.ndarray, salt: bytes) -> str:
    """SHA-256 over the exact (big-endian IEEE) bits of the four entries and the salt."""
    bits = np.ascontiguousarray(matrix, dtype=">f8").tobytes()
    return hashlib.sha256(_CHECKSUM_DOMAIN + salt + bits).hexdigest()


def generate_key(seed: int | None = None, *, max_cond: float = DEFAULT_MAX_COND) -> MoreKey:
    """Draw a key ``S = R(a) diag(1, 1/c) R(b)`` with condition number ``c`` in [1.5, max_cond/2].

    ``seed=None`` uses OS randomness (``secrets``); a seed gives reproducible test keys only.
    """
    if max_cond < 3.0:
        raise ValueError(f"max_cond must be at least 3, got {max_cond}")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    a, b = rng.uniform(0.0, 2.0 * np.pi, size=2)
    cond = float(np.exp(rng.uniform(np.log(1.5), np.log(max_cond / 2.0))))
    scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    sign = rng.choice([-1.0, 1.0])

    def rot(t: float) -> np.ndarray:
        return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])

    matrix = scale * rot(a) @ np.diag([1.0, sign / cond]) @ rot(b)
    salt = rng.bytes(32) if seed is not None else secrets.token_bytes(32)
    return MoreKey(matrix, salt, max_cond=max_cond)


def save_key(
    key: MoreKey,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    parents: bool = False,
) -> Path:
    """Write the key file atomically with mode 0600.

    Refuses to replace an existing file (a lost key loses its ciphertexts) unless
    ``overwrite``, and to create missing directories (a mistyped path would scatter secret
    keys) unless ``parents``. Every failure is an :class:`OSError` naming ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing key", str(path))
    if not parents and not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"directory {path.parent} does not exist", str(path))
    payload = {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "matrix": [[float(v).hex() for v in row] for row in key.matrix],
        "salt": key.salt.hex(),
        "fingerprint": key.fingerprint,
        "checksum": _checksum(key.matrix, key.salt),
    }
    text = json.dumps(payload, indent=2) + "\n"
    try:
        atomic_write_bytes(path, text.encode("utf-8"), mode=0o600)
    except OSError as exc:  # it would name its temporary file, not the key file
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    return path


def load_key(path: str | os.PathLike[str], *, max_cond: float = DEFAULT_MAX_COND) -> MoreKey:
    """Read and check a key file; every failure is a :class:`KeyFileError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(
            f"key file {path} not found; create one with `more-fl keygen --out {path}`"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise KeyFileError(f"key file {path} is not a key: JSON nested too deeply") from None
    if not isinstance(payload, dict) or payload.get("format") != KEY_FORMAT:
        raise KeyFileError(f"key file {path}: 'format' must be {KEY_FORMAT!r}")
    version = payload.get("version")
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise KeyFileError(
            f"key file {path}: unsupported version {version!r} "
            f"(this more-fl reads versions {' and '.join(map(str, _READABLE_VERSIONS))})"
        )
    rows = payload.get("matrix")
    try:
        if not (isinstance(rows, list) and len(rows) == 2):
            raise ValueError("not two rows")
        matrix = np.array([[_parse_entry(v) for v in row] for row in rows if isinstance(row, list)])
        if matrix.shape != (2, 2):
            raise ValueError(f"shape {matrix.shape}")
    except (TypeError, ValueError, OverflowError) as exc:
        raise KeyFileError(
            f"key file {path}: 'matrix' must be 2 rows of 2 hex floats ({exc})"
        ) from None
    try:
        salt = bytes.fromhex(payload.get("salt", ""))
    except (TypeError, ValueError):
        salt = b""
    if len(salt) != 32:
        raise KeyFileError(f"key file {path}: 'salt' must be 64 hex digits")
    if version != 1 and payload.get("checksum") != _checksum(matrix, salt):
        raise KeyFileError(
            f"key file {path}: 'checksum' does not match the matrix and salt; the file is "
            "corrupt or was edited (restore it from a copy, or generate a new key)"
        )
    try:
        key = MoreKey(matrix, salt, max_cond=max_cond)
    except ValueError as exc:
        raise KeyFileError(f"key file {path}: {exc}") from None
    if payload.get("fingerprint") != key.fingerprint:
        raise KeyFileError(
            f"key file {path}: stored fingerprint {payload.get('fingerprint')!r} does not match "
            f"the matrix ({key.fingerprint}); the file is corrupt or was edited"
        )
    # Only now: a corrupt file gets its one error, not a warning first.
    if os.name == "posix" and path.stat().st_mode & 0o077:
        warnings.warn(
            f"key file {path} is readable by other users; run `chmod 600 {path}`",
            stacklevel=2,
        )
    return key


def _parse_entry(value: object) -> float:
    if isinstance(value, str):
        return float.fromhex(value)
    raise TypeError(f"entry {value!r} is not a hex string")
