"""Encrypted loss gradients against torch autograd of torch's own losses.

For each loss the gradient injected into encrypted training (computed in the algebra from
encrypted outputs and targets) must decrypt to ``d torch_loss / d outputs``, and a short
training run with it must equal plaintext training.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from federation.more import RegressionRange, ValidLabel, decrypt, decrypt_shadow, encrypt
from federation.nn import (
    L1,
    LOSSES,
    MSE,
    BCEWithLogits,
    CrossEntropy,
    Huber,
    SmoothL1,
    get_loss,
    loss_from_torch,
)
from federation.nn.check import compare_training
from federation.nn.losses import plain_loss
from federation.nn.session import SessionConfig

CLASS_W = (0.5, 2.0, 1.0, 1.5)

LOSS_CASES = [
    CrossEntropy(),
    CrossEntropy(label_smoothing=0.1),
    CrossEntropy(weight=CLASS_W),
    CrossEntropy(weight=CLASS_W, label_smoothing=0.2),
    MSE(),
    L1(),
    Huber(),
    Huber(delta=0.3),
    SmoothL1(),
    SmoothL1(beta=0.4),
    SmoothL1(beta=0.0),
    BCEWithLogits(),
    BCEWithLogits(pos_weight=(2.0, 0.5, 1.0, 3.0)),
    BCEWithLogits(weight=CLASS_W, pos_weight=(2.0, 0.5, 1.0, 3.0)),
]


def _targets(loss, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(plaintext targets for torch, their encryptable tensor) for 10 rows of 4 outputs."""
    if loss.categorical:
        labels = torch.randint(4, (10,), generator=gen)
        return labels, F.one_hot(labels, 4).to(dtype)
    if isinstance(loss, BCEWithLogits):
        y = torch.rand(10, 4, generator=gen, dtype=torch.float64).round().to(dtype)
        return y, y
    y = (torch.rand(10, 4, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype)
    return y, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", LOSS_CASES, ids=repr)
def test_gradient_equals_torch_autograd(key, loss, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(10, 4, generator=gen, dtype=torch.float64) * 2).to(dtype)
    y_plain, y = _targets(loss, gen, dtype)
    z.requires_grad_()
    loss.plain(z, y_plain).backward()
    policy = ValidLabel(4) if loss.categorical else RegressionRange(-2, 2)
    ez, ey = encrypt(z.detach(), key, seed=1), encrypt(y, key, policy, seed=2)
    grad = loss.gradient(ez, ey)
    err = float((decrypt(grad, key).double() - z.grad.double()).abs().max())
    scale = float(z.grad.abs().max())
    if dtype == torch.float64:
        assert err <= 1e-12
    else:
        assert err <= 1e-5 * scale
    assert torch.isfinite(decrypt_shadow(grad, key)).all()


@pytest.mark.parametrize(
    "loss",
    [CrossEntropy(weight=CLASS_W, label_smoothing=0.1), L1(), Huber(0.5), BCEWithLogits()],
    ids=repr,
)
def test_training_with_each_loss_equals_plaintext(key, loss) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(24, 5, generator=gen, dtype=torch.float64)
    if loss.categorical:
        y = torch.randint(4, (24,), generator=gen)
    elif isinstance(loss, BCEWithLogits):
        y = torch.rand(24, 4, generator=gen, dtype=torch.float64).round()
    else:
        y = torch.rand(24, 4, generator=gen, dtype=torch.float64) * 2 - 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    cmp = compare_training(
        model,
        x,
        y,
        key=key,
        loss=loss,
        config=SessionConfig("sgd", {"lr": 0.2, "momentum": 0.9}, batch_size=8, epochs=2),
        num_classes=4,
        feature_range=(0.0, 1.0),
        target_range=(0.0, 1.0) if isinstance(loss, BCEWithLogits) else (-1.0, 1.0),
    )
    assert cmp.state.abs <= 1e-9 and cmp.outputs.abs <= 1e-9, cmp
    assert cmp.passed


def test_torch_loss_modules_map_to_their_twins() -> None:
    w = torch.tensor(CLASS_W)
    ce = loss_from_torch(nn.CrossEntropyLoss(weight=w, label_smoothing=0.3))
    assert isinstance(ce, CrossEntropy) and ce.label_smoothing == 0.3
    assert isinstance(loss_from_torch(nn.HuberLoss(delta=0.7)), Huber)
    assert loss_from_torch(nn.SmoothL1Loss(beta=0.2)).beta == 0.2
    assert isinstance(loss_from_torch(nn.BCEWithLogitsLoss(pos_weight=w)), BCEWithLogits)
    assert isinstance(loss_from_torch(nn.MSELoss()), MSE)
    assert isinstance(loss_from_torch(nn.L1Loss()), L1)
    with pytest.raises(ValueError, match="reduction"):
        loss_from_torch(nn.MSELoss(reduction="sum"))
    with pytest.raises(ValueError, match="ignore_index"):
        loss_from_torch(nn.CrossEntropyLoss(ignore_index=0))
    with pytest.raises(ValueError, match="no encrypted twin"):
        loss_from_torch(nn.NLLLoss())
    assert {get_loss(name).name for name in LOSSES} == set(LOSSES)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")


def test_plain_loss_is_torchs_own_and_gradients_need_matching_shapes(key) -> None:
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    targets = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    assert torch.equal(
        plain_loss("cross_entropy", outputs, labels), F.cross_entropy(outputs, labels)
    )
    assert torch.equal(plain_loss("mse", outputs, targets), F.mse_loss(outputs, targets))
    assert torch.equal(
        plain_loss(Huber(delta=0.3), outputs, targets), F.huber_loss(outputs, targets, delta=0.3)
    )
    encrypted = encrypt(outputs, key, seed=1)
    fewer = encrypt(targets[:, :3], key, seed=2)
    with pytest.raises(ValueError, match=r"outputs \(6, 4\) and targets \(6, 3\) differ"):
        MSE().gradient(encrypted, fewer)
