"""The attacks recover plaintexts from ciphertexts alone, and run_attack writes its report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.config import experiment_from_dict
from federation.more import (
    FeatureRange,
    ValidLabel,
    decrypt_shadow,
    encode_plain,
    encrypt,
    generate_key,
)
from federation.more.keys import MoreKey
from federation.tasks import mnist
from federation.tools.attacks.maths import (
    HEURISTICS,
    channels,
    eigenvalue_pairs,
    equivalent_key,
    resolve_by_statistics,
    resolve_by_supervision,
    resolve_known_pair,
)
from federation.tools.attacks.run import run_attack

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _data(seed: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=gen, dtype=torch.float64)


def _close(got: np.ndarray, want: torch.Tensor, rtol: float = 1e-9) -> bool:
    want_np = want.numpy()
    return bool(np.all(np.abs(got - want_np) <= rtol * np.abs(want_np).max()))


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_eigenvalues_are_value_and_shadow(seed: int, scale: float) -> None:
    key = generate_key(seed)
    x = _data(seed, (50,), scale)
    c = encrypt(x, key, FeatureRange(-scale, scale), seed=seed)
    hi, lo = eigenvalue_pairs(c.entries)
    r = decrypt_shadow(c, key)
    assert np.all(hi >= lo)
    assert _close(np.where(np.abs(hi - x.numpy()) < np.abs(lo - x.numpy()), hi, lo), x)
    assert _close(np.where(np.abs(hi - r.numpy()) < np.abs(lo - r.numpy()), hi, lo), r)


def test_double_roots_stay_real(key) -> None:
    w = torch.linspace(-2, 2, 9, dtype=torch.float64)
    hi, lo = eigenvalue_pairs(encode_plain(w).entries)
    assert np.array_equal(hi, w.numpy()) and np.array_equal(lo, w.numpy())
    c = encrypt(w, key, FeatureRange(0.0, 0.0), seed=0)  # shadow 0: x == r where w == 0
    hi, lo = eigenvalue_pairs(c.entries)
    assert np.all(np.isfinite(hi)) and np.all(np.isfinite(lo))
    with pytest.raises(ValueError, match="distinct eigenvalues"):
        equivalent_key(encode_plain(w).entries)


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS)
def test_one_ciphertext_gives_a_key_for_all_others(seed: int) -> None:
    key = generate_key(seed)
    one = encrypt(torch.tensor([0.7], dtype=torch.float64), key, FeatureRange(-1, 1), seed=seed)
    basis = equivalent_key(one.entries)
    x = _data(seed + 1, (6, 7), 5.0)
    others = encrypt(x, key, FeatureRange(-5.0, 5.0), seed=seed + 1)
    pair = channels(others.entries, basis)
    channel = resolve_known_pair(others.entries[2, 3], float(x[2, 3]), basis)
    assert _close(pair[channel], x)
    assert _close(pair[1 - channel], decrypt_shadow(others, key))


@settings(max_examples=50, deadline=None)
@given(seed=SEEDS, index=st.integers(min_value=0, max_value=99))
def test_known_pair_always_picks_the_data_channel(seed: int, index: int) -> None:
    key = generate_key(seed)
    x = _data(seed, (100,), 1.0)
    c = encrypt(x, key, FeatureRange(-1.0, 1.0), seed=seed + 7)
    basis = equivalent_key(c.entries[index:])
    channel = resolve_known_pair(c.entries[index], float(x[index]), basis)
    assert _close(channels(c.entries, basis)[channel], x)


def test_known_pair_refuses_a_value_equal_to_its_shadow(key) -> None:
    c = encrypt(torch.tensor([0.5, 0.25], dtype=torch.float64), key, FeatureRange(0.5, 0.5))
    basis = equivalent_key(c.entries)
    with pytest.raises(ValueError, match="equals its shadow"):
        resolve_known_pair(c.entries[0], 0.5, basis)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS)
def test_salted_fingerprint_does_not_confirm_a_recovered_key(seed: int) -> None:
    key = generate_key(seed)
    c = encrypt(_data(seed, (20,), 1.0), key, FeatureRange(-1.0, 1.0), seed=seed)
    basis = equivalent_key(c.entries)
    guesses = [MoreKey(cols, bytes(32), max_cond=np.inf) for cols in (basis, basis[:, ::-1])]
    assert all(g.fingerprint != key.fingerprint for g in guesses)
    # Only with the secret salt would the recovered key (in its true order) match.
    with_salt = [MoreKey(cols, key.salt, max_cond=np.inf) for cols in (basis, basis[:, ::-1])]
    assert sum(g.fingerprint == key.fingerprint for g in with_salt) == 1


@pytest.fixture(scope="module")
def digits(mnist_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = mnist.load_task_data(data_dir=mnist_dir, split="carve", n_train=160, n_test=10)
    return data.x_train.double(), data.y_train


@pytest.mark.parametrize("seed", range(4))
def test_image_statistics_find_the_digits(
    digits: tuple[torch.Tensor, torch.Tensor], seed: int
) -> None:
    images, labels = digits
    key = generate_key(100 + seed)
    c = encrypt(images, key, FeatureRange(0.0, 1.0), seed=seed)
    basis = equivalent_key(c.entries)
    pair = channels(c.entries, basis)
    data_channel = int(np.abs(pair[1] - images.numpy()).max() < 1e-9)
    for rows in np.array_split(np.arange(len(images)), 8):  # 20 digits per decision
        chunk = (pair[0][rows], pair[1][rows])
        for heuristic in ("zeros", "smoothness", "distribution"):
            assert resolve_by_statistics(chunk, heuristic) == data_channel, heuristic
    one_hot = torch.nn.functional.one_hot(labels, 10).double()
    targets = channels(encrypt(one_hot, key, ValidLabel(10), seed=seed).entries, basis)
    assert resolve_by_supervision(pair, targets) == data_channel


def test_statistics_refuse_what_they_cannot_judge() -> None:
    with pytest.raises(ValueError, match="unknown heuristic"):
        resolve_by_statistics((np.zeros(3), np.ones(3)), "entropy")
    with pytest.raises(ValueError, match="needs images"):
        HEURISTICS["smoothness"](np.zeros((4, 5)))
    same = np.ones((8, 3))
    assert resolve_by_statistics((same, same.copy()), "correlation") is None


def _config(tmp_path: Path, task: dict, **training: object):
    return experiment_from_dict(
        {
            "name": f"tiny-{task['name']}",
            "task": task,
            "sites": {"count": 2},
            "training": {"local_epochs": 1, "batch_size": 32, **training},
            "output_dir": str(tmp_path / "run"),
        }
    )


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_attack_on_tiny_wbc(tmp_path: Path) -> None:
    task = {"name": "wbc", "options": {"n_samples": 300, "cache_dir": str(tmp_path / "wbc")}}
    config = _config(tmp_path, task)
    report = run_attack(config, max_examples=120, trials=6, sites=1)
    out = tmp_path / "run" / "attack"
    assert report.report == out / "report.md"
    text = report.report.read_text(encoding="utf-8")
    assert "## Recovery" in text and "more-fl attack --config" in text
    assert _png(out / "recovery.png") and report.figures == (out / "recovery.png",)
    assert sorted(p.name for p in out.iterdir()) == ["recovery.png", "report.md"]
    names = [t.name for t in report.targets]
    assert names == ["features", "targets", "model update"]
    for t in report.targets:
        assert t.eigenvalues.rate == t.known_pair.rate == t.feature_key.rate == 1.0, t.name
        assert t.blind.rate == 1.0 and t.blind.max_err < 1e-9, t.name
    rates = {(h.target, h.method): h.rate for h in report.resolutions}
    assert rates[("features", "known pair")] == rates[("model update", "known pair")] == 1.0
    assert rates[("features + targets", "supervision")] == 1.0
    assert rates[("model update", "evaluation")] == 1.0
    assert report.updates == 1 and not report.refused
    assert any("model update" in line for line in report.summary_lines())


def test_run_attack_draws_recovered_digits(tmp_path: Path, mnist_dir: Path) -> None:
    task = {
        "name": "mnist",
        "data_dir": str(mnist_dir),
        "options": {"split": "carve", "n_train": 80, "n_test": 20},
    }
    config = _config(tmp_path, task, dtype="float32")
    report = run_attack(config, tmp_path / "out", max_examples=40, trials=4, sites=0)
    assert _png(tmp_path / "out" / "images.png") and _png(tmp_path / "out" / "recovery.png")
    assert [t.name for t in report.targets] == ["features", "targets"]
    features = report.targets[0]
    assert features.blind.rate == 1.0 and features.blind.max_err < 1e-6  # float32 ciphertexts
    assert features.key_holder is not None and features.key_holder.rate == 1.0
