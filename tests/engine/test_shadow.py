"""The shadow rule on real digits: uniform shadows on one-hot targets diverge and are
reported; valid-label shadows stay finite and give exactly the plaintext result. The health
report itself on hand-made ciphertexts: which channel left its limit, and where in a model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from federation.more import (
    EncryptedTensor,
    FeatureRange,
    ShadowDivergenceError,
    ValidLabel,
    check_tensors,
    decrypt,
    decrypt_shadow,
    encrypt,
    leakage,
)
from federation.more.health import DEFAULT_LIMIT, HealthReport, diagnose, trace_layers
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


def _report(c, key) -> HealthReport:
    return check_tensors({"c": c}, key)


def test_health_report_names_the_channel_that_left_the_limit(key) -> None:
    x = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64).reshape(3, 4)
    healthy = _report(encrypt(x, key, FeatureRange(-1.0, 1.0), seed=0), key)
    assert healthy.healthy and healthy.diverged_channel is None
    assert healthy.data_max == pytest.approx(2.0, rel=1e-12) and healthy.limit == DEFAULT_LIMIT
    assert healthy.shadow_max <= 1.0 + 1e-12
    assert healthy.describe() == (
        f"healthy: max |data| 2, max |shadow| {healthy.shadow_max:.3g} (limit 1e+04)"
    )
    healthy.raise_if_unhealthy()

    data = _report(encrypt(x * 1e5, key, FeatureRange(-1.0, 1.0), seed=0), key)
    assert data.data_max == pytest.approx(2e5, rel=1e-12) and data.diverged_channel == "data"
    assert data.describe().startswith("data channel diverged: max |data| 2e+05")
    shadow = _report(encrypt(x, key, FeatureRange(1e5, 2e5), seed=0), key)
    assert shadow.diverged_channel == "shadow" and shadow.shadow_max >= 1e5
    both = _report(encrypt(x * 1e5, key, FeatureRange(1e5, 2e5), seed=0), key)
    assert both.diverged_channel == "both"

    broken = encrypt(x, key, seed=0)
    broken.entries[0, 0, 0, 0] = float("inf")
    report = _report(broken, key)
    assert not report.entries_finite and report.diverged_channel == "both"
    with pytest.raises(ShadowDivergenceError, match="finite ciphertexts: False") as info:
        report.raise_if_unhealthy()
    assert info.value.report is report


@pytest.mark.parametrize(("shadow", "channel"), [((0.0, 0.5), "data"), ((3.0, 4.0), "shadow")])
def test_mixed_channels_blame_the_larger_one(key, shadow, channel) -> None:
    """Both channels within bounds, but the ciphertext left the key's algebra: S^-1 C S has an
    off-diagonal residue (what round-off grows into without refreshes)."""
    x = torch.linspace(-2.0, 2.0, 6, dtype=torch.float64)
    c = encrypt(x, key, FeatureRange(*shadow), seed=0)
    s, si = torch.tensor(key.matrix), torch.tensor(key.inverse)
    off = s @ torch.tensor([[0.0, 1e-3], [0.0, 0.0]], dtype=torch.float64) @ si
    mixed = EncryptedTensor(c.entries + off, c.fingerprint)
    assert torch.allclose(decrypt(mixed, key), x, atol=1e-12)  # channels unchanged
    assert torch.allclose(decrypt_shadow(mixed, key), decrypt_shadow(c, key), atol=1e-12)
    report = _report(mixed, key)
    assert report.mixing == pytest.approx(float(leakage(mixed, key).max()), rel=1e-12)
    assert report.mixing == pytest.approx(1e-3, rel=1e-9)
    assert report.mixed and not report.healthy and report.diverged_channel == channel
    assert "channel mixing 0.001" in report.describe()


def test_trace_layers_reports_each_layer_like_torch_and_stops_at_the_first_bad_one(key) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.rand(8, 4, dtype=torch.float64)
    twin = to_encrypted(plain, None)
    ex = encrypt(x, key, FeatureRange(0.0, 1.0), seed=1)
    rows = trace_layers(twin, ex, key)
    assert [(r.index, r.layer) for r in rows] == [(i, type(m).__name__) for i, m in enumerate(twin)]
    out = x
    for row, layer in zip(rows, plain, strict=True):
        with torch.no_grad():
            out = layer(out)
        assert row.report.healthy
        assert row.report.data_max == pytest.approx(float(out.abs().max()), rel=1e-9)
    assert diagnose(twin, ex, key).startswith("parameters and activations healthy: max |data|")

    with torch.no_grad():  # parameters within the limit, first layer's output far above it
        plain[0].weight.fill_(400.0)
    twin = to_encrypted(plain, None)
    rows = trace_layers(twin, ex, key, limit=1e3)
    assert len(rows) == 1 and rows[0].report.diverged_channel in ("data", "both")
    with torch.no_grad():
        first = float(plain[0](x).abs().max())
    assert rows[0].report.data_max == pytest.approx(first, rel=1e-9)
    line = diagnose(twin, ex, key, limit=1e3)
    assert line.startswith(f"layer 0 ({rows[0].layer}) output: ")
    assert "channel diverged" in line
