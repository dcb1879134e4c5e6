"""Hostile input: fuzzed key files, configs, IDX files, DICOM folders and site replies.

Every malformed input must end in the documented error (``KeyFileError``, ``ConfigError``,
``MnistDataError``, a DICOM skip with its reason, ``InvalidUpdate``) and never in another
exception; a writer that fails must leave no partial file behind. Each property is bounded to
a modest number of examples so the file stays fast; the last test prints how many hostile
cases were tried in total. Inputs that once crashed a library module are pinned by their own
tests beside the properties.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filebase import DicomBytesIO

from federation.aggregation import InvalidUpdate, RunStore, validate_update
from federation.config import (
    ConfigError,
    DeploymentConfig,
    ExperimentConfig,
    deployment_from_dict,
    experiment_from_dict,
    load_deployment,
    load_experiment,
)
from federation.more.keys import KEY_FORMAT, KeyFileError, MoreKey, generate_key, load_key, save_key
from federation.tasks.angio import dicom as angio_dicom
from federation.tasks.mnist import MnistDataError, load_task_data, read_idx

pytestmark = [  # pydicom and numpy warn about the hostile values themselves
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

_TRIED: Counter[str] = Counter()
"""Hostile cases tried per area in this session (printed by the last test)."""


FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = settings(FUZZ, max_examples=25)


def _tried(area: str) -> None:
    _TRIED[area] += 1


@contextmanager
def _scratch() -> Iterator[Path]:
    """A fresh directory per hypothesis example (function fixtures are shared by examples)."""
    with tempfile.TemporaryDirectory(prefix="hostile-") as name:
        yield Path(name)


def _expect(
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


def _mutate(blob: bytes, data: st.DataObject) -> bytes:
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


def _no_temporaries(folder: Path, keep: set[str]) -> None:
    left = sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name not in keep)
    assert left == [], f"partial or temporary files left behind: {left}"


# --- Key files ------------------------------------------------------------------------------

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
    key = _expect(KeyFileError, lambda: load_key(path), MoreKey)
    if isinstance(key, MoreKey):
        stored = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
        assert stored == key.fingerprint


@FUZZ
@given(blob=st.binary(max_size=300))
def test_key_loader_refuses_random_bytes(blob: bytes) -> None:
    _tried("key file")
    with _scratch() as folder:
        _expect(KeyFileError, lambda: load_key(_write_key_text(folder, blob)))


@FUZZ
@given(payload=_JSON)
def test_key_loader_refuses_random_json(payload: Any) -> None:
    _tried("key file")
    with _scratch() as folder:
        path = _write_key_text(folder, json.dumps(payload))
        _expect(KeyFileError, lambda: load_key(path))


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
    _tried("key file")
    real = _key_payload(generate_key(seed))
    payload = {
        "format": fmt,
        "version": version,
        "matrix": real["matrix"] if matrix == "real" else matrix,
        "salt": real["salt"] if salt == "real" else salt,
        "fingerprint": real["fingerprint"] if fingerprint == "real" else fingerprint,
    }
    with _scratch() as folder:
        _loads_or_refuses(_write_key_text(folder, json.dumps(payload)))


@FUZZ
@given(seed=st.integers(0, 2**16), data=st.data())
def test_key_loader_refuses_mutated_key_files(seed: int, data: st.DataObject) -> None:
    """Byte mutations of a real key file: refused, or still the key its fingerprint names."""
    blob = json.dumps(_key_payload(generate_key(seed)), indent=2).encode()
    mutated = _mutate(blob, data)
    with _scratch() as folder:
        path = _write_key_text(folder, mutated)
        _tried("key file")
        _loads_or_refuses(path)


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
    _tried("key file")
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
    with _scratch() as folder:
        path = _write_key_text(folder, json.dumps(payload))
        if key is None:
            _expect(KeyFileError, lambda: load_key(path))
        else:
            assert load_key(path).fingerprint == key.fingerprint


def test_key_loader_refuses_directories_and_missing_files(tmp_path: Path) -> None:
    _tried("key file")
    _expect(KeyFileError, lambda: load_key(tmp_path))
    _tried("key file")
    _expect(KeyFileError, lambda: load_key(tmp_path / "absent.key"))


def test_key_loader_refuses_deeply_nested_json(tmp_path: Path) -> None:
    _tried("key file")
    with pytest.raises(KeyFileError, match="nested too deeply"):
        load_key(_write_key_text(tmp_path, "[" * 100_000))


@pytest.mark.parametrize("entry", [1e200, 1e-200])
def test_key_loader_refuses_huge_and_tiny_entries(tmp_path: Path, entry: float) -> None:
    _tried("key file")
    payload = _key_payload(generate_key(0))
    payload["matrix"] = [[entry.hex(), "0x0p+0"], ["0x0p+0", entry.hex()]]
    with pytest.raises(KeyFileError, match="largest entry must have a magnitude between"):
        load_key(_write_key_text(tmp_path, json.dumps(payload)))


def test_failed_key_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tried("atomic writes")

    def fail(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        save_key(generate_key(1), tmp_path / "site.key")
    _no_temporaries(tmp_path, keep=set())


def test_failed_checkpoint_write_keeps_the_previous_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tried("atomic writes")
    store = RunStore(tmp_path)
    arrays = {"w": np.ones((2, 2, 2))}
    store.save_round(1, arrays, "fp", [{"round": 1}])

    def fail(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        store.save_round(2, {"w": np.zeros((2, 2, 2))}, "fp", [{"round": 1}, {"round": 2}])
    _no_temporaries(tmp_path, keep={RunStore.CHECKPOINT, RunStore.HISTORY})
    monkeypatch.undo()
    latest = store.load_latest()
    assert latest is not None and latest.server_round == 1


# --- Configs ----------------------------------------------------------------------------------

_TEXT = st.text(max_size=16)
_JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _TEXT
    | st.sampled_from(
        ["nan", "-1", "0", "1e-400", "1e400", "inf", "mlp", "cnn", "iid", "float32", "auto"]
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_TEXT | st.integers(-2, 2) | st.none(), inner, max_size=3)
    ),
    max_leaves=8,
)

_EXPERIMENT: dict[str, Any] = {
    "name": "hostile",
    "task": {"name": "wbc", "options": {"n_samples": 64}, "data_dir": "data"},
    "model": {"arch": "mlp", "options": {"hidden": 8}},
    "sites": {"count": 3, "partition": "non-iid", "alpha": 0.5},
    "training": {
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 16,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "dtype": "float32",
        "seed": 3,
    },
    "federation": {"min_sites": 2, "encrypted": True},
    "encryption": {
        "target_shadow": "auto",
        "key_file": "keys/federation.key",
        "key_seed": 7,
        "health_limit": 1e4,
    },
    "output_dir": "runs/hostile",
}
_DEPLOYMENT: dict[str, Any] = {
    "experiment": "experiment.yaml",
    "work_dir": "runs/deploy",
    "superlink": {"host": "127.0.0.1", "port": 9092},
    "tls": {"enabled": True, "generate": True, "cert_dir": "certs"},
    "node_auth": {"enabled": True, "key_dir": "node-keys"},
    "sites": [
        {"name": "a", "id": 0, "port": 9101, "data_dir": "a", "key_file": "a.key"},
        {"name": "b", "id": 1, "port": 9102},
    ],
    "run": {"output_dir": "out", "round_timeout": 60.0, "timeout": 600.0},
}


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every dotted position in a nested dict/list (where a mutation can land)."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


def _at(tree: Any, where: tuple[Any, ...]) -> Any:
    for step in where:
        tree = tree[step]
    return tree


def _mutate_tree(tree: dict[str, Any], data: st.DataObject) -> Any:
    """Replace, delete or add entries of a valid config at random positions."""
    tree = json.loads(json.dumps(tree))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        where = data.draw(st.sampled_from(_paths(tree)), label="position")
        if not where:
            return data.draw(_JUNK, label="whole document")
        parent = _at(tree, where[:-1])
        kind = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if kind == "replace":
            parent[where[-1]] = data.draw(_JUNK, label="value")
        elif kind == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            new_key = data.draw(_TEXT | st.integers(-2, 2) | st.none(), label="new key")
            parent[new_key] = data.draw(_JUNK, label="value")
    return tree


@FUZZ
@given(data=st.data())
def test_experiment_config_refuses_mutations(data: st.DataObject) -> None:
    """A mutated experiment is refused with ConfigError, or validates to a sound config."""
    _tried("config")
    tree = _mutate_tree(_EXPERIMENT, data)
    with _scratch() as folder:
        result = _expect(
            ConfigError, lambda: experiment_from_dict(tree, base=folder), ExperimentConfig
        )
        if isinstance(result, ExperimentConfig):
            assert result.training.lr > 0 and result.sites.count >= result.federation.min_sites


@SMALL
@given(data=st.data())
def test_experiment_yaml_files_refuse_mutations(data: st.DataObject) -> None:
    """The same through a YAML file: the file is named in the error."""
    _tried("config")
    tree = _mutate_tree(_EXPERIMENT, data)
    with _scratch() as folder:
        path = folder / "experiment.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
        result = _expect(ConfigError, lambda: load_experiment(path), ExperimentConfig)
        if isinstance(result, ConfigError):
            assert str(path) in str(result)


@FUZZ
@given(data=st.data())
def test_deployment_config_refuses_mutations(data: st.DataObject) -> None:
    _tried("config")
    tree = _mutate_tree(_DEPLOYMENT, data)
    with _scratch() as folder:
        result = _expect(
            ConfigError, lambda: deployment_from_dict(tree, base=folder), DeploymentConfig
        )
        if isinstance(result, DeploymentConfig):
            ports = [s.port for s in result.sites]
            assert len(set(ports)) == len(ports) and result.port not in ports


@FUZZ
@given(blob=st.binary(max_size=200), deployment=st.booleans())
def test_config_loaders_refuse_random_bytes(blob: bytes, deployment: bool) -> None:
    _tried("config")
    with _scratch() as folder:
        path = folder / "config.yaml"
        path.write_bytes(blob)
        loader = load_deployment if deployment else load_experiment
        _expect(ConfigError, lambda: loader(path), (ExperimentConfig, DeploymentConfig))


def test_config_loaders_refuse_missing_files_and_directories(tmp_path: Path) -> None:
    for loader in (load_experiment, load_deployment):
        for path in (tmp_path, tmp_path / "absent.yaml"):
            _tried("config")
            _expect(ConfigError, lambda loader=loader, path=path: loader(path))


@pytest.mark.parametrize("opener", ["[", "{"])
def test_config_loader_refuses_deeply_nested_yaml(tmp_path: Path, opener: str) -> None:
    _tried("config")
    path = tmp_path / "experiment.yaml"
    path.write_text(opener * 2_000)
    with pytest.raises(ConfigError, match="nested too deeply") as caught:
        load_experiment(path)
    assert str(path) in str(caught.value)


def test_config_refuses_unknown_keys_of_mixed_types() -> None:
    _tried("config")
    with pytest.raises(ConfigError, match="key 1 in '<top>' is not a name"):
        experiment_from_dict({**_EXPERIMENT, 1: "x", "typo": "y"})
    _tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    tree["sites"][None] = 1
    with pytest.raises(ConfigError, match="key None in 'sites' is not a name"):
        experiment_from_dict(tree)


@pytest.mark.parametrize(
    "where", [("output_dir",), ("name",), ("task", "data_dir"), ("encryption", "key_file")]
)
@pytest.mark.parametrize("value", ["~run\x00s", "runs/a\x00b"])
def test_config_refuses_a_nul_in_a_string(where: tuple[Any, ...], value: str) -> None:
    _tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    _at(tree, where[:-1])[where[-1]] = value
    with pytest.raises(ConfigError, match=f"'{'.'.join(where)}' must be a string without NUL"):
        experiment_from_dict(tree)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "1e400"])
@pytest.mark.parametrize(
    "where", [("training", "lr"), ("sites", "alpha"), ("encryption", "health_limit")]
)
def test_config_refuses_non_finite_numbers(where: tuple[str, ...], value: Any) -> None:
    _tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    _at(tree, where[:-1])[where[-1]] = value
    with pytest.raises(ConfigError, match=f"'{'.'.join(where)}' must be a finite number"):
        experiment_from_dict(tree)


@pytest.mark.parametrize("key", ["round_timeout", "timeout"])
def test_deployment_refuses_non_finite_timeouts(tmp_path: Path, key: str) -> None:
    _tried("config")
    tree = json.loads(json.dumps(_DEPLOYMENT))
    tree["run"][key] = float("inf")
    with pytest.raises(ConfigError, match=f"'run.{key}' must be a finite number"):
        deployment_from_dict(tree, base=tmp_path)


def test_config_templates_are_valid(tmp_path: Path) -> None:
    """The mutation properties start from configs that validate (so refusals mean something)."""
    assert isinstance(experiment_from_dict(_EXPERIMENT, base=tmp_path), ExperimentConfig)
    assert isinstance(deployment_from_dict(_DEPLOYMENT, base=tmp_path), DeploymentConfig)


@pytest.mark.parametrize("where", [("name",), ("output_dir",), ("model", "arch")])
def test_experiment_refuses_null_for_strings(where: tuple[Any, ...]) -> None:
    _tried("config")
    tree = json.loads(json.dumps(_EXPERIMENT))
    _at(tree, where[:-1])[where[-1]] = None
    with pytest.raises(ConfigError, match=f"'{'.'.join(where)}' must be a .*, got None"):
        experiment_from_dict(tree)


@pytest.mark.parametrize(
    "where", [("experiment",), ("work_dir",), ("superlink", "host"), ("sites", 0, "name")]
)
def test_deployment_refuses_null_for_strings(where: tuple[Any, ...], tmp_path: Path) -> None:
    _tried("config")
    tree = json.loads(json.dumps(_DEPLOYMENT))
    _at(tree, where[:-1])[where[-1]] = None
    with pytest.raises(ConfigError, match="must be"):
        deployment_from_dict(tree, base=tmp_path)


# --- IDX files --------------------------------------------------------------------------------

_IDX_CODES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    header = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


def _check_idx(path: Path, blob: bytes) -> None:
    """read_idx either raises MnistDataError or returns exactly what the header declares."""
    result = _expect(MnistDataError, lambda: read_idx(path), np.ndarray)
    if isinstance(result, np.ndarray):
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3]))
        assert result.shape == dims
        assert result.dtype == np.dtype(_IDX_CODES[raw[2]]).newbyteorder("=")


@FUZZ
@given(blob=st.binary(max_size=64), gz=st.booleans())
def test_idx_reader_refuses_random_bytes(blob: bytes, gz: bool) -> None:
    _tried("idx")
    blob = gzip.compress(blob) if gz else blob
    with _scratch() as folder:
        path = folder / "random-idx"
        path.write_bytes(blob)
        _check_idx(path, blob)


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
    _tried("idx")
    size = math.prod(dims) if dims else 0
    wanted = max(0, min(size * itemsize, 256) + extra)
    blob = _idx(code, tuple(dims), data.draw(st.binary(min_size=wanted, max_size=wanted)))
    if gz != "raw":
        blob = gzip.compress(blob)
        if gz == "truncated gzip":
            blob = blob[: data.draw(st.integers(2, max(2, len(blob) - 1)))]
    with _scratch() as folder:
        path = folder / "header.idx"
        path.write_bytes(blob)
        if gz == "truncated gzip":
            _expect(MnistDataError, lambda: read_idx(path))
        else:
            _check_idx(path, blob)


@FUZZ
@given(labels=st.lists(st.integers(0, 255), min_size=1, max_size=32), data=st.data())
def test_idx_reader_refuses_mutated_label_files(labels: list[int], data: st.DataObject) -> None:
    _tried("idx")
    blob = _mutate(_idx(0x08, (len(labels),), bytes(labels)), data)
    with _scratch() as folder:
        path = folder / "labels-idx1-ubyte"
        path.write_bytes(blob)
        _check_idx(path, blob)


@pytest.mark.parametrize(
    ("code", "dims"), [(0x08, (0, 2**32 - 1, 2**32 - 1)), (0x0E, (2**31, 2**31, 0, 2))]
)
def test_idx_reader_refuses_empty_arrays_with_impossible_dims(
    tmp_path: Path, code: int, dims: tuple[int, ...]
) -> None:
    _tried("idx")
    path = tmp_path / "empty-idx"
    path.write_bytes(_idx(code, dims, b""))
    with pytest.raises(MnistDataError, match="impossibly large array") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_idx_reader_refuses_directories_and_missing_files(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "absent"):
        _tried("idx")
        _expect(MnistDataError, lambda path=path: read_idx(path))


@SMALL
@given(
    images=st.binary(max_size=64) | st.just(_idx(0x08, (3, 28, 28), bytes(3 * 28 * 28))),
    labels=st.binary(max_size=32) | st.just(_idx(0x08, (3,), b"\x01\x0a\xff")),
    gz_names=st.booleans(),
)
def test_mnist_loader_refuses_hostile_files(images: bytes, labels: bytes, gz_names: bool) -> None:
    """Whatever sits under the canonical names, the loader raises MnistDataError."""
    _tried("idx")
    suffix = ".gz" if gz_names else ""
    with _scratch() as folder:
        (folder / f"t10k-images-idx3-ubyte{suffix}").write_bytes(images)
        (folder / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(labels)
        _expect(MnistDataError, lambda: load_task_data(data_dir=folder, split="carve"))


# --- DICOM folders -----------------------------------------------------------------------------


class _XaFiles(dict[str, bytes]):
    """Real XA files by name; a short repr keeps hypothesis reports readable."""

    def __repr__(self) -> str:
        return f"<XA files {', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())}>"


@pytest.fixture(scope="module")
def xa_files(tmp_path_factory: pytest.TempPathFactory) -> _XaFiles:
    """Files written by the project's writer: a single-frame run and a 3-frame cine run."""
    folder = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(0)
    common = {"primary": 30.0, "secondary": 25.0, "series_description": "LCA LAO cranial"}
    single = angio_dicom.write_xa(folder / "single.dcm", rng.random((16, 16)), **common)
    cine = angio_dicom.write_xa(folder / "cine.dcm", rng.random((3, 12, 20)), **common)
    return _XaFiles(single=single.read_bytes(), cine=cine.read_bytes())


_PIXEL_BYTES = {"single": 16 * 16 * 2, "cine": 3 * 12 * 20 * 2}


def _read_dicom_folder(folder: Path, count: int) -> tuple[Any, list[tuple[Path, str]]]:
    """read_folder never raises on bad files: each is read or skipped with a reason."""
    data, skipped = angio_dicom.read_folder(folder, image_size=8)
    assert len(data) + len(skipped) == count
    assert all(isinstance(reason, str) and reason for _, reason in skipped)
    assert data.images.shape == (len(data), 8, 8)
    assert np.isfinite(data.images).all()
    return data, skipped


def _unconvertible_element(blob: bytes) -> bool:
    """Whether pydicom reads ``blob`` but cannot convert one of its elements."""
    try:
        ds = pydicom.dcmread(DicomBytesIO(blob))
    except Exception:  # refused at dcmread: the reader's own guard covers that
        return False
    try:
        for _ in ds.iterall():
            pass
    except Exception:
        return True
    return False


def _declares_fewer_frames(blob: bytes) -> bool:
    """Whether ``blob`` declares (or pydicom assumes) one frame but its pixel data holds at
    least two."""
    try:
        ds = pydicom.dcmread(DicomBytesIO(blob), force=True)
        frame = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        frame = frame * int(ds.BitsAllocated) // 8
        pixels = len(ds.PixelData)
    except Exception:  # unparseable here: the reader must skip it, which the caller checks
        return False
    try:
        declared = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        declared = 1  # pydicom's own fallback for an invalid value
    return declared == 1 and frame > 0 and pixels >= 2 * frame


def _read_xa_blob(blob: bytes) -> None:
    """Write one (hostile) file and check it is read or skipped, never raised on."""
    _tried("dicom")
    with _scratch() as folder:
        (folder / "run.dcm").write_bytes(blob)
        _read_dicom_folder(folder, 1)


@FUZZ
@given(blobs=st.lists(st.binary(max_size=400), min_size=1, max_size=3), preamble=st.booleans())
def test_dicom_reader_skips_random_bytes(blobs: list[bytes], preamble: bool) -> None:
    _tried("dicom")
    with _scratch() as folder:
        for i, blob in enumerate(blobs):
            head = b"\0" * 128 + b"DICM" if preamble else b""
            (folder / f"f{i}.dcm").write_bytes(head + blob)
        _read_dicom_folder(folder, len(blobs))


@FUZZ
@given(which=st.sampled_from(["single", "cine"]), cut=st.floats(0.0, 1.0))
def test_dicom_reader_skips_truncated_files(xa_files: _XaFiles, which: str, cut: float) -> None:
    _tried("dicom")
    blob = xa_files[which]
    with _scratch() as folder:
        (folder / "run.dcm").write_bytes(blob[: int(cut * (len(blob) - 1))])
        data, skipped = angio_dicom.read_folder(folder, image_size=8)
        assert len(data) == 0 and len(skipped) == 1 and skipped[0][1]


@settings(FUZZ, max_examples=120)
@given(which=st.sampled_from(["single", "cine"]), header_only=st.booleans(), data=st.data())
def test_dicom_reader_skips_mutated_files(
    xa_files: _XaFiles, which: str, header_only: bool, data: st.DataObject
) -> None:
    """Mutations anywhere (or only in the header, where they hit tags and lengths)."""
    blob = xa_files[which]
    pixels = len(blob) - _PIXEL_BYTES[which]
    mutated = _mutate(blob[:pixels], data) + blob[pixels:] if header_only else _mutate(blob, data)
    _read_xa_blob(mutated)


_HOSTILE_ELEMENTS: dict[str, list[Any]] = {
    "NumberOfFrames": ["0", "-1", "2", "99"],
    "Rows": [0, 1, 65535],
    "Columns": [0, 1, 65535],
    "BitsAllocated": [0, 1, 8, 32],
    "BitsStored": [0, 17],
    "SamplesPerPixel": [0, 3],
    "PixelRepresentation": [1, 7],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", ""],
    "PositionerPrimaryAngleIncrement": [["0", "5"], ["nan"], "0"],
    "RescaleSlope": ["0", "-1", "2.5", "nan", "1e300"],
    "RescaleIntercept": ["-1000", "1e4", "inf", "1e308"],
    "Modality": ["", "CT", ["XA", "CT"]],
    "SeriesDescription": ["left right", "RCA", ""],
    "PixelData": [b"", b"\0" * 2, b"\0" * 2048],  # the last: more frames than declared
}
_TEXT_PATCHES: dict[str, list[bytes]] = {
    "PositionerPrimaryAngle": [b"x", b"nan", b"inf", b"1e400", b"", b"-720", b"1\\2"],
    "PositionerSecondaryAngle": [b"-inf", b"", b"90", b"\xff\xfe"],
    "NumberOfFrames": [b"abc", b"", b"1e9", b"-3", b"0", b"4294967296"],
    "DistanceSourceToDetector": [b"x", b"0", b"-1", b"nan"],
    "ImagerPixelSpacing": [b"x\\y", b"\\", b"0\\0", b"inf"],
    "Modality": [b"", b"\x00\x00", b"XA\\XA"],
    "SeriesDescription": [b"\xc3\x28", b"LCA" * 30],
}


def _patch_text(blob: bytes, keyword: str, value: bytes) -> bytes | None:
    """Replace the raw value of a short explicit-VR element (None if the file lacks it)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    at = blob.find(head + dictionary_VR(tag).encode(), 132)
    if at < 0:
        return None
    length = int.from_bytes(blob[at + 6 : at + 8], "little")
    value += b" " * (len(value) % 2)
    return blob[: at + 6] + len(value).to_bytes(2, "little") + value + blob[at + 8 + length :]


@settings(FUZZ, max_examples=80)
@given(
    which=st.sampled_from(["single", "cine"]),
    changes=st.dictionaries(
        st.sampled_from(sorted(_HOSTILE_ELEMENTS)), st.integers(0, 4), max_size=4
    ),
    patches=st.dictionaries(st.sampled_from(sorted(_TEXT_PATCHES)), st.integers(0, 6), max_size=3),
)
def test_dicom_reader_skips_hostile_elements(
    xa_files: _XaFiles, which: str, changes: dict[str, int], patches: dict[str, int]
) -> None:
    """Well-formed files whose tags lie (zero rows, NaN angles, wrong bit depths, ...)."""
    assume(changes or patches)
    ds = pydicom.dcmread(DicomBytesIO(xa_files[which]))
    for keyword, index in changes.items():
        values = _HOSTILE_ELEMENTS[keyword]
        setattr(ds, keyword, values[index % len(values)])
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=False)
    blob: bytes | None = out.getvalue()
    for keyword, index in patches.items():
        values = _TEXT_PATCHES[keyword]
        assert blob is not None
        blob = _patch_text(blob, keyword, values[index % len(values)])
        assume(blob is not None)
    assert blob is not None
    _read_xa_blob(blob)


@pytest.mark.parametrize(
    ("which", "keyword", "value"),
    [
        ("single", "PixelData", None),  # twice the declared pixel data, 1 frame declared
        ("cine", "NumberOfFrames", "1"),  # 3 frames stored
        ("cine", "NumberOfFrames", ""),  # empty: pydicom assumes 1
    ],
)
def test_dicom_reader_counts_frames_in_pixel_data_longer_than_declared(
    xa_files: _XaFiles, tmp_path: Path, which: str, keyword: str, value: str | None
) -> None:
    """pydicom decodes every frame the pixel data holds; the reader picks one of them."""
    _tried("dicom")
    ds = pydicom.dcmread(DicomBytesIO(xa_files[which]))
    setattr(ds, keyword, ds.PixelData * 2 if value is None else value)
    ds.save_as(tmp_path / "run.dcm", enforce_file_format=False)
    assert _declares_fewer_frames((tmp_path / "run.dcm").read_bytes())
    data, _ = _read_dicom_folder(tmp_path, 1)
    assert len(data) == 1


def test_dicom_reader_skips_unconvertible_elements(xa_files: _XaFiles, tmp_path: Path) -> None:
    _tried("dicom")
    station = b"\x08\x00\x10\x10SH"  # (0008,1010) StationName, VR SH
    blob = xa_files["single"]
    assert blob.count(station) == 1
    hostile = blob.replace(station, station[:4] + b"RH")
    assert _unconvertible_element(hostile)
    (tmp_path / "run.dcm").write_bytes(hostile)
    _, skipped = _read_dicom_folder(tmp_path, 1)
    assert skipped[0][1].startswith("unusable DICOM (NotImplementedError")


@pytest.mark.parametrize(("slope", "intercept"), [("nan", "0"), ("1e300", "0"), ("1", "inf")])
def test_dicom_reader_skips_non_finite_rescaled_pixels(
    xa_files: _XaFiles, tmp_path: Path, slope: str, intercept: str
) -> None:
    _tried("dicom")
    ds = pydicom.dcmread(DicomBytesIO(xa_files["single"]))
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(tmp_path / "run.dcm", enforce_file_format=False)
    _, skipped = _read_dicom_folder(tmp_path, 1)
    assert skipped[0][1] == "RescaleSlope/RescaleIntercept make pixel values non-finite"


def test_failed_dicom_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tried("atomic writes")
    original = pydicom.dataset.Dataset.save_as

    def save_half_then_fail(self: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        whole = DicomBytesIO()
        original(self, whole, *args, **kwargs)
        target.write(whole.getvalue()[:100])  # the writer hands save_as its temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", save_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        angio_dicom.write_xa(tmp_path / "p" / "run.dcm", np.zeros((8, 8)), primary=0, secondary=0)
    _no_temporaries(tmp_path, keep=set())
    _tried("atomic writes")
    with pytest.raises(ValueError, match="pixels"):
        angio_dicom.write_xa(tmp_path / "bad.dcm", np.zeros(8), primary=0, secondary=0)
    _no_temporaries(tmp_path, keep=set())


# --- Site replies -----------------------------------------------------------------------------

_EXPECTED: dict[str, tuple[int, ...]] = {
    "0.weight": (4, 3, 2, 2),
    "0.bias": (4, 2, 2),
    "2.weight": (2, 4, 2, 2),
    "2.bias": (2, 2, 2),
}
_FP = "abcd-ef01-2345-6789"
_BAD_DTYPES = [np.int64, np.int8, np.uint16, np.bool_, np.complex128, object, "U3", "S2", "V8"]
_GOOD_DTYPES = [np.float16, np.float32, np.float64, np.longdouble]


def _valid_arrays(encrypted: bool, dtype: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        name: rng.standard_normal(shape if encrypted else shape[:-2]).astype(dtype)
        for name, shape in _EXPECTED.items()
    }


def _shapes(encrypted: bool) -> Mapping[str, tuple[int, ...]]:
    return _EXPECTED if encrypted else {k: v[:-2] for k, v in _EXPECTED.items()}


@st.composite
def _reply(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A site reply with zero or more faults, and whether any fault was injected."""
    encrypted = draw(st.booleans(), label="encrypted")
    arrays = _valid_arrays(encrypted, draw(st.sampled_from(_GOOD_DTYPES)))
    count: Any = draw(st.integers(1, 10**9), label="num_examples")
    fingerprint: Any = _FP if encrypted else draw(st.sampled_from([None, ""]))
    bad = False
    faults = ["shape", "dtype", "nonfinite", "rename", "drop", "extra", "count", "fingerprint"]
    for fault in draw(st.lists(st.sampled_from(faults), max_size=3, unique=True), label="faults"):
        bad = True
        present = sorted(set(arrays) & set(_EXPECTED))  # faults never undo one another
        assume(present)
        name = draw(st.sampled_from(present), label="array")
        if fault == "shape":
            shape = draw(st.lists(st.integers(0, 5), max_size=5).map(tuple))
            assume(shape != arrays[name].shape)
            arrays[name] = np.zeros(shape)
        elif fault == "dtype":
            arrays[name] = arrays[name].astype(draw(st.sampled_from(_BAD_DTYPES)))
        elif fault == "nonfinite":
            assume(np.issubdtype(arrays[name].dtype, np.floating) and arrays[name].size)
            flat = arrays[name].reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf])
            )
        elif fault == "rename":
            new = draw(st.text(min_size=1, max_size=12))
            assume(new not in arrays and new not in _EXPECTED)
            arrays[new] = arrays.pop(name)
        elif fault == "drop":
            del arrays[name]
        elif fault == "extra":
            new = draw(st.text(max_size=12))
            assume(new not in arrays and new not in _EXPECTED)
            arrays[new] = np.zeros(draw(st.lists(st.integers(0, 3), max_size=3).map(tuple)))
        elif fault == "count":
            count = draw(
                st.sampled_from([0, -1, -(2**63), True, False, 1.5, 3.0, "5", None, np.int64(5)])
            )
        else:
            fingerprint = (
                draw(st.sampled_from([None, "", _FP.upper(), _FP + " ", "0000-0000-0000-0000"]))
                if encrypted
                else draw(st.sampled_from([_FP, "x"]))
            )
    return {"arrays": arrays, "count": count, "fingerprint": fingerprint, "enc": encrypted}, bad


@settings(FUZZ, max_examples=150)
@given(case=_reply())
def test_validate_update_refuses_every_fault(case: tuple[dict[str, Any], bool]) -> None:
    """A reply with any injected fault is refused with InvalidUpdate; a clean one passes."""
    _tried("reply")
    reply, bad = case

    def check() -> None:
        validate_update(
            reply["arrays"],
            reply["count"],
            reply["fingerprint"],
            expected=_shapes(reply["enc"]),
            federation_fingerprint=_FP if reply["enc"] else None,
            encrypted=reply["enc"],
        )

    if bad:
        _expect(InvalidUpdate, check)
    else:
        check()


@FUZZ
@given(
    shapes=st.dictionaries(
        st.text(max_size=6), st.lists(st.integers(0, 4), max_size=4).map(tuple), max_size=4
    ),
    data=st.data(),
)
def test_validate_update_against_random_models(
    shapes: dict[str, tuple[int, ...]], data: st.DataObject
) -> None:
    """Random arrays against random expected models: accepted exactly when they match."""
    _tried("reply")
    names = st.sampled_from(sorted(shapes)) if shapes else st.text(max_size=6)
    arrays = data.draw(
        st.dictionaries(
            names | st.text(max_size=6),
            st.tuples(
                st.lists(st.integers(0, 4), max_size=4), st.sampled_from([np.float64, np.int32])
            ).map(lambda spec: np.ones(spec[0], dtype=spec[1])),
            max_size=4,
        ),
        label="arrays",
    )
    matches = set(arrays) == set(shapes) and all(
        arrays[k].shape == shapes[k] and arrays[k].dtype == np.float64 for k in shapes
    )
    result = _expect(
        InvalidUpdate,
        lambda: validate_update(
            arrays, 1, _FP, expected=shapes, federation_fingerprint=_FP, encrypted=True
        ),
        type(None),
    )
    assert (result is None) == matches
