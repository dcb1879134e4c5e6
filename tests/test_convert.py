"""torch <-> encrypted conversion, state_dict keys, unsupported layers, the SGD contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from federation.more import EncryptedTensor, FeatureRange, decrypt, encrypt
from federation.nn import (
    EncryptedSGD,
    Square,
    UnsupportedLayerError,
    encode_state_dict,
    load_encrypted_state,
    model_fingerprint,
    predict_encrypted,
    to_encrypted,
    to_plain,
    train_encrypted,
)


def model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Flatten(), nn.Linear(8, 5, bias=False)),
        Square(),
        nn.Linear(5, 3),
    ).double()


@pytest.mark.parametrize("with_key", [False, True])
def test_round_trip_keeps_keys_and_values(key, with_key) -> None:
    plain = model()
    twin = to_encrypted(plain, key if with_key else None, seed=0)
    assert list(twin.state_dict()) == list(plain.state_dict())
    for name, t in twin.state_dict().items():
        assert tuple(t.shape) == (*plain.state_dict()[name].shape, 2, 2)
    assert model_fingerprint(twin) == (key.fingerprint if with_key else None)
    back = to_plain(twin, key)
    assert type(back[3][1]) is nn.Linear and back[3][1].bias is None
    for name, t in plain.state_dict().items():
        assert torch.allclose(back.state_dict()[name], t, atol=1e-14, rtol=0)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    out = decrypt(predict_encrypted(twin, encrypt(x, key, FeatureRange(0, 1))), key)
    assert torch.allclose(out, plain(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("layer", "alternative"),
    [
        (nn.ReLU(), "nn.Sigmoid, nn.Tanh, nn.Softplus or federation.nn.Square"),
        (nn.GELU(), "nn.Softplus"),
        (nn.MaxPool2d(2), "nn.AvgPool2d"),
        (nn.BatchNorm1d(4), "standardise the inputs"),
        (nn.Dropout(0.1), "weight decay"),
        (nn.Softmax(dim=1), "the cross-entropy loss applies it"),
        (nn.LSTM(2, 2), "supported layers"),
    ],
)
def test_unsupported_layers_are_refused_with_the_alternative(layer, alternative) -> None:
    bad = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), layer))
    with pytest.raises(UnsupportedLayerError) as info:
        to_encrypted(bad)
    assert type(layer).__name__ in str(info.value)
    assert "'1.1'" in str(info.value)
    assert alternative in str(info.value)


def test_unsupported_options_and_containers_are_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="groups"):
        to_encrypted(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)))
    with pytest.raises(UnsupportedLayerError, match="beta"):
        to_encrypted(nn.Sequential(nn.Softplus(beta=2)))
    with pytest.raises(UnsupportedLayerError, match="nn.Sequential"):
        to_encrypted(nn.ModuleList([nn.Linear(2, 2)]))


def test_encoded_state_dict_loads_into_a_twin_and_checks_shapes(key) -> None:
    plain = model()
    twin = to_encrypted(model(), None)
    load_encrypted_state(twin, encode_state_dict(plain.state_dict()), None)
    for name, t in to_plain(twin, key).state_dict().items():
        assert torch.allclose(t, plain.state_dict()[name], atol=1e-15, rtol=0)
    bad = encode_state_dict(plain.state_dict())
    bad["5.bias"] = bad["5.bias"][:2]
    with pytest.raises(ValueError, match="5.bias"):
        load_encrypted_state(twin, bad, None)
    with pytest.raises(ValueError, match="missing"):
        load_encrypted_state(twin, {}, None)


def test_sgd_matches_torch_with_nesterov(key) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 2)).double()
    twin = to_encrypted(plain, None)
    opt = torch.optim.SGD(
        plain.parameters(), lr=0.1, momentum=0.8, weight_decay=0.01, nesterov=True
    )
    eopt = EncryptedSGD(twin, lr=0.1, momentum=0.8, weight_decay=0.01, nesterov=True)
    x = torch.rand(5, 3, dtype=torch.float64)
    y = torch.rand(5, 2, dtype=torch.float64)
    ex, ey = encrypt(x, key), encrypt(y, key)
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        opt.step()
    train_encrypted(twin, ex, ey, loss="mse", optimizer=eopt, epochs=4, batch_size=5, seed=0)
    for name, t in to_plain(twin, key).state_dict().items():
        assert torch.allclose(t, plain.state_dict()[name], atol=1e-13, rtol=0)


def test_trainer_checks_lengths_keys_and_losses(key, other_key) -> None:
    twin = to_encrypted(nn.Sequential(nn.Linear(2, 2)).double())
    x = encrypt(torch.rand(4, 2, dtype=torch.float64), key)
    kw = dict(optimizer=EncryptedSGD(twin, lr=0.1), epochs=1, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="4 inputs but 3 targets"):
        train_encrypted(twin, x, x[:3], loss="mse", **kw)
    with pytest.raises(ValueError, match="unknown loss"):
        train_encrypted(twin, x, x, loss="hinge", **kw)
    y_other = encrypt(torch.rand(4, 2, dtype=torch.float64), other_key)
    with pytest.raises(ValueError, match="different keys"):
        train_encrypted(twin, x, y_other, loss="mse", **kw)
    with pytest.raises(ValueError):
        EncryptedSGD(twin, lr=0.0)


def test_parameters_are_encrypted_tensors_sharing_storage() -> None:
    from federation.nn import encrypted_parameters

    twin = to_encrypted(nn.Sequential(nn.Linear(2, 2)).double())
    params = encrypted_parameters(twin)
    assert all(isinstance(p, EncryptedTensor) for p in params.values())
    params["0.weight"].mul_(0.0)
    assert float(twin[0].weight.detach().abs().max()) == 0.0
