"""torch <-> encrypted conversion, state_dict keys, unsupported layers, the SGD contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from federation.more import EncryptedTensor, FeatureRange, decrypt, encrypt
from federation.nn import (
    EncryptedSession,
    EncryptedSGD,
    SessionConfig,
    Square,
    UnsupportedLayerError,
    encode_state_dict,
    load_encrypted_state,
    model_fingerprint,
    predict_encrypted,
    to_encrypted,
    to_plain,
    validate,
)
from federation.nn.check import compare_step


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
        (nn.Softmax(dim=1), "the cross-entropy loss applies it"),
        (nn.LogSoftmax(dim=1), "the cross-entropy loss applies it"),
        (nn.GroupNorm(2, 4), "nn.LayerNorm or nn.BatchNorm2d"),
        (nn.Embedding(3, 4), "one-hot"),
        (nn.MaxPool1d(2), "nn.MaxPool2d on an unsqueezed input"),
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
    with pytest.raises(UnsupportedLayerError, match="ceil_mode=False"):
        to_encrypted(nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)))
    with pytest.raises(UnsupportedLayerError, match="return_indices"):
        to_encrypted(nn.Sequential(nn.MaxPool2d(2, return_indices=True)))
    with pytest.raises(UnsupportedLayerError, match="nn.Sequential"):
        to_encrypted(nn.ModuleList([nn.Linear(2, 2)]))
    problems = validate(nn.Sequential(nn.GRU(2, 2), nn.Linear(2, 2), nn.Softmax(-1)))
    assert len(problems) == 2
    assert problems[0].startswith("GRU at '0'") and problems[1].startswith("Softmax at '2'")


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
    x = torch.rand(5, 3, dtype=torch.float64)
    y = torch.rand(5, 2, dtype=torch.float64)
    ex, ey = encrypt(x, key), encrypt(y, key)
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        opt.step()
    hyper = {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.01, "nesterov": True}
    config = SessionConfig("sgd", hyper, batch_size=5, epochs=4)
    EncryptedSession(twin, ex, ey, loss="mse", config=config).train()
    for name, t in to_plain(twin, key).state_dict().items():
        assert torch.allclose(t, plain.state_dict()[name], atol=1e-13, rtol=0)


def test_trainer_checks_lengths_keys_and_losses(key, other_key) -> None:
    twin = to_encrypted(nn.Sequential(nn.Linear(2, 2)).double())
    x = encrypt(torch.rand(4, 2, dtype=torch.float64), key)
    config = SessionConfig("sgd", {"lr": 0.1}, batch_size=2)
    with pytest.raises(ValueError, match="4 inputs but 3 targets"):
        EncryptedSession(twin, x, x[:3], loss="mse", config=config)
    with pytest.raises(ValueError, match="unknown loss"):
        EncryptedSession(twin, x, x, loss="hinge", config=config)
    y_other = encrypt(torch.rand(4, 2, dtype=torch.float64), other_key)
    with pytest.raises(ValueError, match="different keys"):
        EncryptedSession(twin, x, y_other, loss="mse", config=config)
    with pytest.raises(ValueError, match="needs the site's key"):
        EncryptedSession(twin, x, x, loss="mse", config=SessionConfig(refresh_every=10))
    with pytest.raises(ValueError, match="unknown optimiser"):
        SessionConfig("lbfgs")
    with pytest.raises(ValueError):
        EncryptedSGD(twin, lr=0.0)


def test_parameters_are_encrypted_tensors_sharing_storage() -> None:
    from federation.nn import encrypted_parameters

    twin = to_encrypted(nn.Sequential(nn.Linear(2, 2)).double())
    params = encrypted_parameters(twin)
    assert all(isinstance(p, EncryptedTensor) for p in params.values())
    params["0.weight"].mul_(0.0)
    assert float(twin[0].weight.detach().abs().max()) == 0.0


def _act(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 6), layer)


def _img(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 4, 1), layer)


def _seq(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 4, 1), layer)


# (model around the layer, input shape): every twin, forward and backward, against torch.
LAYERS = {
    "ReLU": (_act(nn.ReLU()), (5, 6)),
    "LeakyReLU": (_act(nn.LeakyReLU(0.1)), (5, 6)),
    "ELU": (_act(nn.ELU(0.5)), (5, 6)),
    "GELU": (_act(nn.GELU()), (5, 6)),
    "GELU-tanh": (_act(nn.GELU("tanh")), (5, 6)),
    "SiLU": (_act(nn.SiLU()), (5, 6)),
    "Hardtanh": (_act(nn.Hardtanh(-0.7, 0.4)), (5, 6)),
    "ReLU6": (_act(nn.ReLU6()), (5, 6)),
    "Softplus": (_act(nn.Softplus()), (5, 6)),
    "Softplus-beta-threshold": (_act(nn.Softplus(beta=2.0, threshold=1.5)), (5, 6)),
    "Tanh": (_act(nn.Tanh()), (5, 6)),
    "Sigmoid": (_act(nn.Sigmoid()), (5, 6)),
    "SELU": (_act(nn.SELU()), (5, 6)),
    "CELU": (_act(nn.CELU(0.6)), (5, 6)),
    "Mish": (_act(nn.Mish()), (5, 6)),
    "Hardswish": (_act(nn.Hardswish()), (5, 6)),
    "Hardsigmoid": (_act(nn.Hardsigmoid()), (5, 6)),
    "LogSigmoid": (_act(nn.LogSigmoid()), (5, 6)),
    "Softsign": (_act(nn.Softsign()), (5, 6)),
    "Tanhshrink": (_act(nn.Tanhshrink()), (5, 6)),
    "Square": (_act(Square()), (5, 6)),
    "Identity": (_act(nn.Identity()), (5, 6)),
    "MaxPool2d": (_img(nn.MaxPool2d(2)), (3, 4, 7, 7)),
    "MaxPool2d-pad-ceil": (_img(nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)), (3, 4, 7, 7)),
    "MaxPool2d-dilation": (_img(nn.MaxPool2d(2, stride=1, dilation=2)), (3, 4, 7, 7)),
    "AvgPool2d": (_img(nn.AvgPool2d(3, 2, padding=1)), (3, 4, 7, 7)),
    "AdaptiveAvgPool2d": (_img(nn.AdaptiveAvgPool2d((3, 2))), (3, 4, 7, 7)),
    "AdaptiveAvgPool2d-1": (_img(nn.AdaptiveAvgPool2d(1)), (3, 4, 7, 7)),
    "AdaptiveMaxPool2d": (_img(nn.AdaptiveMaxPool2d((2, 3))), (3, 4, 7, 7)),
    "Conv2d-groups-dilation": (
        _img(nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2)),
        (3, 4, 7, 7),
    ),
    "Conv2d-depthwise-stride": (_img(nn.Conv2d(4, 4, 3, stride=2, groups=4)), (3, 4, 7, 7)),
    "Conv2d-reflect": (_img(nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")), (3, 4, 7, 7)),
    "Conv2d-replicate": (
        _img(nn.Conv2d(4, 2, 3, padding=(2, 1), padding_mode="replicate")),
        (3, 4, 7, 7),
    ),
    "Conv2d-circular": (_img(nn.Conv2d(4, 2, 3, padding=1, padding_mode="circular")), (3, 4, 7, 7)),
    "Conv2d-same-even": (_img(nn.Conv2d(4, 2, 4, padding="same", bias=False)), (3, 4, 7, 7)),
    "Conv2d-same-reflect": (
        _img(nn.Conv2d(4, 2, (2, 3), padding="same", padding_mode="reflect")),
        (3, 4, 7, 7),
    ),
    "Conv2d-valid": (_img(nn.Conv2d(4, 2, 3, padding="valid")), (3, 4, 7, 7)),
    "Conv1d": (_seq(nn.Conv1d(4, 2, 3, stride=2, padding=1)), (3, 4, 9)),
    "Conv1d-groups-same": (
        _seq(nn.Conv1d(4, 4, 3, groups=4, padding="same", padding_mode="reflect")),
        (3, 4, 9),
    ),
    "Conv1d-dilation-circular": (
        _seq(nn.Conv1d(4, 2, 2, dilation=2, padding=1, padding_mode="circular")),
        (3, 4, 9),
    ),
    "BatchNorm1d": (_act(nn.BatchNorm1d(6)), (5, 6)),
    "BatchNorm1d-3d": (_seq(nn.BatchNorm1d(4, momentum=None)), (3, 4, 9)),
    "BatchNorm2d": (_img(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)), (3, 4, 7, 7)),
    "BatchNorm2d-no-affine": (_img(nn.BatchNorm2d(4, affine=False)), (3, 4, 7, 7)),
    "BatchNorm2d-batch-stats": (_img(nn.BatchNorm2d(4, track_running_stats=False)), (3, 4, 7, 7)),
    "LayerNorm": (_act(nn.LayerNorm(6)), (5, 6)),
    "LayerNorm-2d-no-affine": (_img(nn.LayerNorm([7, 7], elementwise_affine=False)), (3, 4, 7, 7)),
    "LayerNorm-no-bias": (_act(nn.LayerNorm(6, bias=False)), (5, 6)),
    "Dropout": (_act(nn.Dropout(0.3)), (5, 6)),
    "Dropout2d": (_img(nn.Dropout2d(0.5)), (3, 4, 7, 7)),
    "Dropout1d": (_seq(nn.Dropout1d(0.5)), (3, 4, 9)),
    "Dropout1d-unbatched": (nn.Dropout1d(0.5), (6, 9)),  # torch drops whole rows of (C, L)
    "Flatten": (_img(nn.Flatten()), (3, 4, 7, 7)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_twin_forward_and_backward_equal_torch(key, name, dtype) -> None:
    model, shape = LAYERS[name]
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 2
    cmp = compare_step(model, x, key, dtype=dtype)
    assert cmp.within(dtype), cmp
    if dtype == torch.float64:
        assert max(cmp.outputs.abs, cmp.input_grad.abs, cmp.param_grads.abs) <= 1e-12, cmp
    else:
        assert max(cmp.outputs.rel, cmp.input_grad.rel, cmp.param_grads.rel) <= 1e-5, cmp


@pytest.mark.parametrize(
    ("build", "layer", "shape"),
    [
        (_act, nn.BatchNorm1d(6), (5, 6)),
        (_act, nn.BatchNorm1d(6, momentum=None), (5, 6)),
        (_img, nn.BatchNorm2d(4, eps=1e-3), (3, 4, 5, 5)),
    ],
)
def test_batchnorm_eval_uses_the_encrypted_running_statistics(key, build, layer, shape) -> None:
    torch.manual_seed(0)
    model = build(layer).double()
    model.train()
    for _ in range(3):
        model(torch.randn(shape, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 3
    cmp = compare_step(model, torch.randn(shape, dtype=torch.float64), key, train=False)
    assert max(cmp.outputs.abs, cmp.input_grad.abs, cmp.param_grads.abs) <= 1e-12, cmp
    assert cmp.buffers.abs == 0.0 or cmp.buffers.abs <= 1e-14, cmp


def test_dropout_masks_follow_torchs_global_generator(key) -> None:
    # Same seed: the same units dropped as torch's; another seed: other units.
    torch.manual_seed(0)
    twin = to_encrypted(nn.Sequential(nn.Dropout(0.5)).double(), key)
    x = torch.rand(40, 10, dtype=torch.float64) + 1.0
    ex = encrypt(x, key, FeatureRange(1, 2), seed=0)
    torch.manual_seed(7)
    expected = torch.nn.functional.dropout(x, 0.5, training=True)
    after_plain = torch.rand(3)
    torch.manual_seed(7)
    got = decrypt(twin(ex), key)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert torch.equal(torch.rand(3), after_plain)  # the generator advanced identically
    assert 0 < int((got == 0).sum()) < x.numel()
    twin.eval()
    assert torch.allclose(decrypt(twin(ex), key), x, atol=1e-12, rtol=0)


def test_dropout_of_everything_and_batchnorm_refusals_are_torchs(key) -> None:
    x = torch.rand(4, 6, dtype=torch.float64) + 1.0
    ex = encrypt(x, key, FeatureRange(1, 2), seed=0)
    drop_all = nn.Sequential(nn.Dropout(1.0)).double()
    twin = to_encrypted(drop_all, key)
    expected = drop_all(x)
    assert not expected.any()
    assert torch.equal(decrypt(twin(ex), key), expected)

    norm = nn.Sequential(nn.BatchNorm1d(6)).double()
    bn = to_encrypted(norm, key)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        norm(x[:1])
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        bn(ex[:1])
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        norm(x.reshape(4, 6, 1, 1))
    with pytest.raises(ValueError, match=r"expected \(2, 3\)-d input, got \(4, 6, 1, 1\)"):
        bn(ex.reshape(4, 6, 1, 1))
