"""The aggregator's library: exact FedAvg on ciphertexts, reply validation, checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from federation.aggregation import (
    InvalidUpdate,
    RunStore,
    expected_shapes,
    fedavg,
    initial_arrays,
    validate_arrays,
    validate_identity,
    validate_update,
)
from federation.config import experiment_from_dict
from federation.more import decrypt, encrypt
from tests.hostile import FUZZ, expect, no_temporaries, quiet, tried


def test_fedavg_of_ciphertexts_is_a_ciphertext_of_fedavg(key) -> None:
    gen = torch.Generator().manual_seed(0)
    plains = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    counts = [10, 25, 7]
    cts = [{"w": encrypt(p, key, seed=i).entries.numpy()} for i, p in enumerate(plains)]
    avg = fedavg(list(zip(cts, counts, strict=True)))
    expected = sum(n * p for n, p in zip(counts, plains, strict=True)) / sum(counts)
    got = decrypt(type(encrypt(plains[0], key))(torch.from_numpy(avg["w"]), key.fingerprint), key)
    assert float((got - expected).abs().max()) < 1e-14
    plain_avg = fedavg([({"w": p.numpy()}, n) for p, n in zip(plains, counts, strict=True)])
    assert float(np.abs(plain_avg["w"] - expected.numpy()).max()) < 1e-15


def _config(encrypted: bool = True):
    return experiment_from_dict(
        {
            "name": "t",
            "task": {"name": "wbc", "options": {"n_samples": 200}},
            "federation": {"encrypted": encrypted},
        }
    )


def test_initial_model_is_key_free_and_seeded() -> None:
    a, b = initial_arrays(_config()), initial_arrays(_config())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    w = a["0.weight"]
    assert w.shape[-2:] == (2, 2)
    assert np.array_equal(w[..., 0, 1], np.zeros_like(w[..., 0, 1]))
    assert np.array_equal(w[..., 0, 0], w[..., 1, 1])
    plain = initial_arrays(_config(encrypted=False))
    assert np.array_equal(plain["0.weight"], w[..., 0, 0])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda a: a.pop("0.bias"), "missing"),
        (lambda a: a.update(extra=np.zeros(1)), "unexpected"),
        (lambda a: a.update({"0.bias": a["0.bias"][:3]}), "shape"),
        (lambda a: a["0.weight"].__setitem__((0, 0, 0, 0), np.nan), "non-finite"),
        (lambda a: a.update({"0.bias": a["0.bias"].astype(np.int64)}), "dtype"),
    ],
)
def test_bad_updates_are_refused_with_a_reason(mutate, reason) -> None:
    cfg = _config()
    expected = expected_shapes(cfg)
    arrays = initial_arrays(cfg)
    validate_update(arrays, 5, "fp", expected=expected, federation_fingerprint="fp", encrypted=True)
    mutate(arrays)
    with pytest.raises(InvalidUpdate, match=reason):
        validate_update(
            arrays, 5, "fp", expected=expected, federation_fingerprint="fp", encrypted=True
        )


def test_fingerprints_and_counts_are_checked() -> None:
    cfg = _config()
    exp, arrays = expected_shapes(cfg), initial_arrays(cfg)
    kw = {"expected": exp, "encrypted": True}
    with pytest.raises(InvalidUpdate, match="different keys"):
        validate_update(arrays, 5, "other", federation_fingerprint="fp", **kw)
    with pytest.raises(InvalidUpdate, match="no key fingerprint"):
        validate_update(arrays, 5, None, federation_fingerprint="fp", **kw)
    with pytest.raises(InvalidUpdate, match="positive integer"):
        validate_update(arrays, 0, "fp", federation_fingerprint="fp", **kw)
    with pytest.raises(InvalidUpdate, match="plaintext federation"):
        validate_update(arrays, 5, "fp", expected=exp, federation_fingerprint=None, encrypted=False)


def test_run_store_round_trips_and_writes_atomically(tmp_path) -> None:
    store = RunStore(tmp_path / "run")
    assert store.load_latest() is None
    arrays = {"0.weight": np.arange(8.0).reshape(2, 2, 2), "0.bias": np.ones((2, 2, 2))}
    history = [{"round": 1, "evaluate": {"r2_min": 0.5}}]
    store.save_round(1, arrays, "fp", history)
    store.save_round(2, arrays, "fp", history + [{"round": 2}])
    ck = store.load_latest()
    assert ck is not None and ck.server_round == 2 and ck.fingerprint == "fp"
    assert len(ck.history) == 2 and np.array_equal(ck.arrays["0.weight"], arrays["0.weight"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.npz",
        "history.json",
    ]
    (tmp_path / "run" / "checkpoint.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        store.load_latest()


def test_fedavg_rounds_integer_counters_and_keeps_every_array_an_array() -> None:
    """batch norm's ``num_batches_tracked`` (a 0-d int64) averages to the nearest integer."""
    updates = [
        ({"count": np.array(10, dtype=np.int64), "w": np.array([1.0, 2.0])}, 1),
        ({"count": np.array(13, dtype=np.int64), "w": np.array([3.0, 4.0])}, 2),
    ]
    avg = fedavg(updates)
    assert isinstance(avg["count"], np.ndarray) and avg["count"].dtype == np.int64
    assert int(avg["count"]) == 12  # (10 + 2 * 13) / 3 = 12.0
    np.testing.assert_allclose(avg["w"], [7 / 3, 10 / 3])
    arrays = {"count": np.array(1.5), "w": np.zeros(2)}
    with pytest.raises(InvalidUpdate, match="'count' has dtype float64, expected an integer"):
        validate_update(
            arrays,
            5,
            None,
            expected={"count": (), "w": (2,)},
            federation_fingerprint=None,
            encrypted=False,
            counters={"count"},
        )


def test_identity_and_arrays_are_checked_apart() -> None:
    """A secure sum has arrays but no identity of its own; each reply has an identity."""
    arrays, expected = {"w": np.zeros(2)}, {"w": (2,)}
    validate_arrays(arrays, expected=expected)
    with pytest.raises(InvalidUpdate, match="differs from the federation's fp"):
        validate_identity(3, "other", federation_fingerprint="fp", encrypted=True)
    with pytest.raises(InvalidUpdate, match="carries no key fingerprint"):
        validate_identity(3, None, federation_fingerprint=None, encrypted=True)
    with pytest.raises(InvalidUpdate, match="plaintext federation received an encrypted"):
        validate_identity(3, "fp", federation_fingerprint=None, encrypted=False)
    with pytest.raises(InvalidUpdate, match="'w' has shape"):
        validate_arrays({"w": np.zeros(3)}, expected=expected)


# --- Hostile input: a failed checkpoint write and fuzzed site replies (see tests/hostile.py) ------


@quiet
def test_failed_checkpoint_write_keeps_the_previous_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried("atomic writes")
    store = RunStore(tmp_path)
    arrays = {"w": np.ones((2, 2, 2))}
    store.save_round(1, arrays, "fp", [{"round": 1}])

    def fail(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        store.save_round(2, {"w": np.zeros((2, 2, 2))}, "fp", [{"round": 1}, {"round": 2}])
    no_temporaries(tmp_path, keep={RunStore.CHECKPOINT, RunStore.HISTORY})
    monkeypatch.undo()
    latest = store.load_latest()
    assert latest is not None and latest.server_round == 1


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


@quiet
@settings(FUZZ, max_examples=150)
@given(case=_reply())
def test_validate_update_refuses_every_fault(case: tuple[dict[str, Any], bool]) -> None:
    """A reply with any injected fault is refused with InvalidUpdate; a clean one passes."""
    tried("reply")
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
        expect(InvalidUpdate, check)
    else:
        check()


@quiet
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
    tried("reply")
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
    result = expect(
        InvalidUpdate,
        lambda: validate_update(
            arrays, 1, _FP, expected=shapes, federation_fingerprint=_FP, encrypted=True
        ),
        type(None),
    )
    assert (result is None) == matches
