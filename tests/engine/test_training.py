"""The central property: decrypt(encrypted training) == torch plaintext training.

Same initial weights, same batch order, same hyper-parameters; the plaintext side is torch's
own ``F.cross_entropy`` / ``F.mse_loss`` and ``torch.optim.SGD``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from federation.nn import SessionConfig, Square
from federation.nn.check import FLOAT32_REL_TOL, FLOAT64_ABS_TOL, compare_training


def mlp(outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(36, 16),
        nn.Sigmoid(),
        nn.Linear(16, 12),
        nn.Tanh(),
        nn.Linear(12, 8),
        nn.Softplus(),
        nn.Linear(8, 8),
        Square(),
        nn.Linear(8, outputs),
    )


def cnn(outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 2, stride=2, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(16, outputs),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("build", [mlp, cnn])
def test_encrypted_training_equals_plaintext_training(key, build, loss, dtype) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(60, 1, 6, 6, generator=gen, dtype=torch.float64)
    x_eval = torch.rand(20, 1, 6, 6, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        outputs, y = 4, torch.randint(4, (60,), generator=gen)
    else:
        outputs, y = 3, torch.rand(60, 3, generator=gen, dtype=torch.float64) * 2 - 1
    cmp = compare_training(
        build(outputs),
        x,
        y,
        key=key,
        loss=loss,
        config=SessionConfig(
            "sgd",
            {"lr": 0.3, "momentum": 0.9, "weight_decay": 1e-3},
            batch_size=16,
            epochs=3,
            refresh_every=10,  # as sites do
            dtype=dtype,
            seed=5,
        ),
        num_classes=outputs,
        feature_range=(0.0, 1.0),
        target_range=(-1.0, 1.0),
        x_eval=x_eval,
    )
    if dtype == torch.float64:
        assert cmp.state.abs <= FLOAT64_ABS_TOL
        assert cmp.outputs.abs <= FLOAT64_ABS_TOL
    else:
        assert cmp.state.rel <= FLOAT32_REL_TOL
        assert cmp.outputs.rel <= FLOAT32_REL_TOL
    assert cmp.passed


def test_training_actually_moves_the_weights(key) -> None:
    # Guards the property above against a vacuous pass (e.g. a zero learning rate).
    torch.manual_seed(0)
    model = mlp(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(32, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(4, (32,))
    from federation.more import FeatureRange, ValidLabel, encrypt
    from federation.nn import EncryptedSession, to_encrypted, to_plain

    twin = to_encrypted(model.double(), None)
    ex = encrypt(x, key, FeatureRange(0, 1), seed=0)
    ey = encrypt(torch.nn.functional.one_hot(y, 4).double(), key, ValidLabel(4), seed=1)
    config = SessionConfig("sgd", {"lr": 0.5}, batch_size=8)
    EncryptedSession(twin, ex, ey, loss="cross_entropy", config=config).train()
    after = to_plain(twin, key).state_dict()
    assert all(float((after[k] - before[k].double()).abs().max()) > 1e-4 for k in before)
