"""The shadow rule on real digits: uniform shadows on one-hot targets diverge and are
reported; valid-label shadows stay finite and give exactly the plaintext result."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from federation.more import (
    FeatureRange,
    ShadowDivergenceError,
    ValidLabel,
    check_tensors,
    encrypt,
)
from federation.more.health import diagnose
from federation.nn import (
    EncryptedSession,
    PlainSession,
    SessionConfig,
    TrainingDivergedError,
    encrypted_parameters,
    to_encrypted,
    to_plain,
)
from federation.tasks import mnist

SGD = SessionConfig("sgd", {"lr": 0.5, "momentum": 0.9}, batch_size=64, epochs=2)


def _run_unchecked(key, data):
    """Two epochs with uniform target shadows and no health check, as a careless site would."""
    x, y = data.x_train.double().flatten(1), data.y_train
    torch.manual_seed(0)
    twin = to_encrypted(nn.Sequential(nn.Linear(784, 32), nn.Sigmoid(), nn.Linear(32, 10)).double())
    ex = encrypt(x, key, FeatureRange(0.0, 1.0), seed=0)
    ey = encrypt(F.one_hot(y, 10).double(), key, FeatureRange(0.0, 1.0), seed=1)
    try:
        EncryptedSession(twin, ex, ey, loss="cross_entropy", config=SGD).train()
    except TrainingDivergedError:
        pass
    return None, twin, x, y, ex


def _run(key, data, policy, dtype):
    """Encrypted training with a site-side health check after every epoch (the site's key)."""
    x, y = data.x_train.to(dtype).flatten(1), data.y_train
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(784, 32), nn.Sigmoid(), nn.Linear(32, 10)).to(dtype)
    twin = to_encrypted(plain, None)
    ex = encrypt(x, key, FeatureRange(0.0, 1.0), seed=0)
    ey = encrypt(F.one_hot(y, 10).to(dtype), key, policy, seed=1)

    def check(epoch, model):
        check_tensors(encrypted_parameters(model), key).raise_if_unhealthy()

    EncryptedSession(twin, ex, ey, loss="cross_entropy", config=SGD, callback=check).train()
    return plain, twin, x, y, ex


@pytest.fixture(scope="module")
def digits(mnist_dir):
    return mnist.load_task_data(data_dir=mnist_dir, split="carve", n_train=1000, n_test=10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uniform_target_shadows_diverge_and_are_reported(key, digits, dtype) -> None:
    with pytest.raises((ShadowDivergenceError, TrainingDivergedError)) as info:
        _run(key, digits, FeatureRange(0.0, 1.0), dtype)
    if isinstance(info.value, ShadowDivergenceError):
        assert info.value.report.diverged_channel == "shadow"
        assert "shadow channel diverged" in str(info.value)


def test_divergence_is_diagnosed_by_channel(key, digits) -> None:
    with pytest.raises((ShadowDivergenceError, TrainingDivergedError)):
        _, twin, _, _, ex = _run(key, digits, FeatureRange(0.0, 1.0), torch.float64)
    # The site keeps the model it refused to send and can say where it went wrong.
    _, twin, _, _, ex = _run_unchecked(key, digits)
    assert "shadow channel diverged" in diagnose(twin, ex[:64], key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_valid_label_shadows_stay_finite_and_exact(key, digits, dtype) -> None:
    plain, twin, x, y, _ = _run(key, digits, ValidLabel(10), dtype)
    report = check_tensors(encrypted_parameters(twin), key)
    assert report.healthy and report.shadow_max < 10
    PlainSession(plain, x, y, loss="cross_entropy", config=replace(SGD, dtype=dtype)).train()
    dec = to_plain(twin, key).state_dict()
    dev = max(float((dec[k] - v).abs().max()) for k, v in plain.state_dict().items())
    scale = max(float(v.abs().max()) for v in plain.state_dict().values())
    if dtype == torch.float64:
        assert dev <= 1e-9
    else:
        assert dev / scale <= 1e-4


@pytest.mark.slow
def test_site_refresh_stops_round_off_from_growing_outside_the_algebra(key, digits) -> None:
    """SGD amplifies the off-algebra round-off geometrically; re-encrypting every 10 steps
    (as sites do) keeps it at round-off and training exactly equal to plaintext.

    (lr 0.05: at lr 0.1 with momentum 0.9 this plaintext run is itself chaotic; a 1e-15
    perturbation of its initial weights grows to 1e-5 in the same 378 steps.)"""
    from federation.more import leakage

    x, y = digits.x_train.double().flatten(1), digits.y_train
    ex = encrypt(x, key, FeatureRange(0.0, 1.0), seed=0)
    ey = encrypt(F.one_hot(y, 10).double(), key, ValidLabel(10), seed=1)
    mixing = {}
    sgd = SessionConfig("sgd", {"lr": 0.05, "momentum": 0.9}, batch_size=16, epochs=6)
    for every in (0, 10):
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        twin = to_encrypted(plain, None)
        config = replace(sgd, refresh_every=every)
        EncryptedSession(twin, ex, ey, loss="cross_entropy", config=config, key=key).train()
        params = encrypted_parameters(twin).values()
        mixing[every] = max(float(leakage(p.detach(), key).max()) for p in params)
    assert mixing[10] < 1e-13
    assert mixing[0] > 1e3 * mixing[10]
    PlainSession(plain, x, y, loss="cross_entropy", config=sgd).train()
    dec = to_plain(twin, key).state_dict()
    assert max(float((dec[k] - v).abs().max()) for k, v in plain.state_dict().items()) <= 1e-9
