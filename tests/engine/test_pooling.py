"""Pooling, convolution, padding and shapes on ciphertexts: torch's results in both channels.

Each check encrypts random data with random shadows, runs the encrypted op and its backward
with a random encrypted output gradient, and compares every channel with torch's op (and
autograd) run on that channel's plaintext. Structural ops (max pooling's choice of cell,
padding, windows) must route gradients exactly as torch; max pooling's ties are exact on
key-free blocks (both channels equal), where the channel difference of tied cells is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.more import (
    EncryptedTensor,
    FeatureRange,
    MoreKey,
    decrypt,
    decrypt_shadow,
    encode_plain,
    encrypt,
    generate_key,
)

KEYS = [generate_key(s) for s in (11, 12)]
CHANNELS = (decrypt, decrypt_shadow)
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])

Op = Callable[..., EncryptedTensor]
PlainOp = Callable[..., torch.Tensor]


def _random(shape: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (4 * torch.rand(*shape, generator=g, dtype=torch.float64) - 2).to(dtype)


def _compare(
    op: Op,
    plain_op: PlainOp,
    inputs: Sequence[torch.Tensor],
    key: MoreKey,
    *,
    fan_in: int = 1,
    seed: int = 0,
) -> None:
    """op(encrypted inputs) against plain_op on each channel, values and input gradients."""
    dtype = inputs[0].dtype
    enc = [
        encrypt(x, key, FeatureRange(-2.0, 2.0), seed=seed + i).requires_grad_()
        for i, x in enumerate(inputs)
    ]
    out = op(*enc)
    grad = encrypt(_random(out.shape, seed + 99, dtype), key, FeatureRange(-1, 1), seed=seed + 7)
    out.backward(grad)
    tol = 4 * fan_in * torch.finfo(dtype).eps * key.condition_number**2
    for ch in CHANNELS:
        plain = [ch(e, key).double().requires_grad_() for e in enc]
        want = plain_op(*plain)
        assert tuple(want.shape) == tuple(out.shape)
        want.backward(ch(grad, key).double())
        torch.testing.assert_close(ch(out, key).double(), want.detach(), rtol=0, atol=tol)
        for e, p in zip(enc, plain, strict=True):
            assert e.grad is not None and p.grad is not None
            torch.testing.assert_close(ch(e.grad, key).double(), p.grad, rtol=0, atol=tol)


# --- max pooling --------------------------------------------------------------------------
MAX_POOL_2D = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1), ceil_mode=True),
    dict(kernel_size=3, stride=1, padding=1, dilation=2),
    dict(kernel_size=(3, 2), stride=(2, 3), ceil_mode=True),
    dict(kernel_size=4, stride=3, padding=2, ceil_mode=True),
]


@DTYPES
@pytest.mark.parametrize("options", MAX_POOL_2D, ids=str)
def test_max_pool2d_matches_torch(options: dict, dtype: torch.dtype) -> None:
    x = _random((2, 3, 7, 9), 0, dtype)
    _compare(lambda e: e.max_pool2d(**options), lambda p: F.max_pool2d(p, **options), [x], KEYS[0])


def test_max_pool_on_unbatched_input_and_1d() -> None:
    key = KEYS[1]
    x = _random((3, 6, 5), 1, torch.float64)
    _compare(lambda e: e.max_pool2d(2, 1, 1), lambda p: F.max_pool2d(p, 2, 1, 1), [x], key)
    y = _random((2, 3, 11), 2, torch.float64)
    for options in (
        dict(kernel_size=3),
        dict(kernel_size=4, stride=2, padding=2, dilation=1),
        dict(kernel_size=2, stride=3, dilation=2, ceil_mode=True),
    ):
        _compare(
            lambda e, o=options: e.max_pool1d(**o),
            lambda p, o=options: F.max_pool1d(p, **o),
            [y],
            key,
        )


def _key_free_ties(shape: Sequence[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, tuple(shape), generator=g).double()


def _exact_on_key_free(op: Op, plain_op: PlainOp, x: torch.Tensor) -> None:
    """Both channels equal (``x I``), ties everywhere: values and gradients bit-for-bit."""
    e = encode_plain(x).requires_grad_()
    out = op(e)
    g = torch.arange(out.numel(), dtype=x.dtype).reshape(out.shape) + 1.0
    out.backward(encode_plain(g))
    p = x.clone().requires_grad_()
    want = plain_op(p)
    want.backward(g)
    key = KEYS[0]
    assert e.grad is not None and p.grad is not None
    for ch in CHANNELS:
        torch.testing.assert_close(ch(out, key), want.detach(), rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(ch(e.grad, key), p.grad, rtol=1e-14, atol=1e-14)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    ceil_mode=st.booleans(),
    data=st.data(),
)
def test_max_pool2d_ties_route_gradients_to_the_first_maximum(
    kernel, stride, dilation, ceil_mode, data
) -> None:
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in kernel)
    options = dict(
        kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode
    )
    x = _key_free_ties((1, 2, 6, 7), data.draw(st.integers(0, 1000)))
    _exact_on_key_free(lambda e: e.max_pool2d(**options), lambda p: F.max_pool2d(p, **options), x)


def test_max_pool_refuses_what_torch_refuses() -> None:
    e = encode_plain(torch.zeros(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        e.max_pool2d(2, padding=2)
    with pytest.raises(ValueError, match="spatial"):
        encode_plain(torch.zeros(4, 4)).max_pool2d(2)


# --- adaptive pooling ------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("size", [(3, 4), 2, (None, 3), (7, 9), (5, 6)], ids=str)
def test_adaptive_pools_match_torch(size, dtype: torch.dtype) -> None:
    x = _random((2, 3, 7, 9), 3, dtype)
    key = KEYS[1]
    _compare(
        lambda e: e.adaptive_max_pool2d(size), lambda p: F.adaptive_max_pool2d(p, size), [x], key
    )
    _compare(
        lambda e: e.adaptive_avg_pool2d(size), lambda p: F.adaptive_avg_pool2d(p, size), [x], key
    )
    _exact_on_key_free(
        lambda e: e.adaptive_max_pool2d(size),
        lambda p: F.adaptive_max_pool2d(p, size),
        _key_free_ties((2, 3, 7, 9), 5),
    )


def test_avg_pool2d_on_unbatched_input() -> None:
    x = _random((3, 6, 6), 4, torch.float64)
    _compare(lambda e: e.avg_pool2d(3, 2, 1), lambda p: F.avg_pool2d(p, 3, 2, 1), [x], KEYS[0])


# --- convolutions ----------------------------------------------------------------------------
CONV_2D = [
    dict(),
    dict(stride=2, padding=1),
    dict(padding="same", dilation=2),
    dict(padding="valid", groups=2),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=4),
]


@DTYPES
@pytest.mark.parametrize("options", CONV_2D, ids=str)
def test_conv2d_matches_torch_with_groups_and_dilation(options: dict, dtype: torch.dtype) -> None:
    groups = options.get("groups", 1)
    x = _random((2, 4, 8, 7), 5, dtype)
    w = _random((6 if groups != 4 else 8, 4 // groups, 3, 2), 6, dtype)
    b = _random((w.shape[0],), 7, dtype)
    _compare(
        lambda e, ew, eb: e.conv2d(ew, eb, **options),
        lambda p, pw, pb: F.conv2d(p, pw, pb, **options),
        [x, w, b],
        KEYS[0],
        fan_in=24,
    )


@DTYPES
@pytest.mark.parametrize(
    "options",
    [dict(), dict(stride=2, padding=2, dilation=2), dict(padding="same", groups=3)],
    ids=str,
)
def test_conv1d_matches_torch(options: dict, dtype: torch.dtype) -> None:
    groups = options.get("groups", 1)
    x = _random((2, 6, 13), 8, dtype)
    w = _random((3, 6 // groups, 3), 9, dtype)
    _compare(
        lambda e, ew: e.conv1d(ew, **options),
        lambda p, pw: F.conv1d(p, pw, **options),
        [x, w],
        KEYS[1],
        fan_in=18,
    )
    b = _random((3,), 10, dtype)
    _compare(
        lambda e, ew, eb: e[0].conv1d(ew, eb, **options),
        lambda p, pw, pb: F.conv1d(p[0], pw, pb, **options),
        [x, w, b],
        KEYS[1],
        fan_in=18,
    )


def test_conv_refuses_channel_mismatch() -> None:
    e = encode_plain(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        e.conv2d(encode_plain(torch.zeros(2, 3, 3, 3)))
    with pytest.raises(ValueError, match="channels"):
        e.conv2d(encode_plain(torch.zeros(2, 3, 3, 3)), groups=2)


# --- padding -----------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize(
    ("pad", "mode", "value"),
    [
        ((1, 2), "constant", 0.0),
        ((2, 1, 0, 3), "constant", -1.5),
        ((1, -1, 2, 0, 1, 1), "constant", 0.25),
        ((2, 1), "reflect", 0.0),
        ((1, 2, 2, 1), "reflect", 0.0),
        ((2, 1, 1, 3), "replicate", 0.0),
        ((1, 1, 0, 2, 2, 1), "replicate", 0.0),
        ((1, 2, 2, 0), "circular", 0.0),
    ],
    ids=str,
)
def test_pad_matches_torch(pad, mode: str, value: float, dtype: torch.dtype) -> None:
    x = _random((2, 3, 4, 5, 6)[: len(pad) // 2 + 2], 11, dtype)  # torch's shapes per mode
    kwargs = dict(value=value) if mode == "constant" else {}
    _compare(
        lambda e: e.pad(pad, mode, value), lambda p: F.pad(p, pad, mode, **kwargs), [x], KEYS[0]
    )


def test_constant_padding_is_the_key_free_value_in_both_channels() -> None:
    key = KEYS[1]
    e = encrypt(_random((2, 3), 12, torch.float64), key, FeatureRange(-5, 5), seed=1)
    padded = e.pad((1, 1), value=2.5)
    for ch in CHANNELS:
        torch.testing.assert_close(ch(padded, key)[:, 0], torch.full((2,), 2.5).double())
        torch.testing.assert_close(ch(padded, key)[:, 1:-1], ch(e, key))
    with pytest.raises(ValueError, match="pairs"):
        e.pad((1, 1, 1))


# --- shapes, broadcasting and a batch-norm composition -----------------------------------------
def test_view_squeeze_expand_and_broadcasting() -> None:
    key = KEYS[0]
    x = _random((2, 1, 3, 1), 13, torch.float64)
    e = encrypt(x, key, seed=2)
    torch.testing.assert_close(decrypt(e.view(2, 3), key), x.view(2, 3))
    torch.testing.assert_close(decrypt(e.view((3, 2)), key), x.view(3, 2))
    assert e.squeeze().shape == (2, 3) and e.squeeze(1).shape == (2, 3, 1)
    assert e.squeeze((1, -1)).shape == (2, 3)
    torch.testing.assert_close(decrypt(e.expand(2, 4, 3, 5), key), x.expand(2, 4, 3, 5))
    torch.testing.assert_close(decrypt(e.expand(-1, 2, -1, -1), key), x.expand(-1, 2, -1, -1))


@DTYPES
def test_batch_norm_composition_matches_torch(dtype: torch.dtype) -> None:
    """Per-channel ``[C, 1, 1]`` ciphertexts broadcast against ``[B, C, H, W]``; mean over a
    tuple of dims, rsqrt: training-mode batch norm in both channels, with gradients."""
    x = _random((4, 3, 5, 5), 14, dtype)
    w, b = _random((3,), 15, dtype), _random((3,), 16, dtype)

    def encrypted(e: EncryptedTensor, ew: EncryptedTensor, eb: EncryptedTensor) -> EncryptedTensor:
        centred = e - e.mean((0, 2, 3), keepdim=True)
        var = (centred * centred).mean((0, 2, 3), keepdim=True)
        scale = ew.view(3, 1, 1) * (var + 1e-5).rsqrt().squeeze(0)
        return centred * scale + eb.reshape(3, 1, 1)

    _compare(
        encrypted,
        lambda p, pw, pb: F.batch_norm(p, None, None, pw, pb, training=True, eps=1e-5),
        [x, w, b],
        KEYS[1],
        fan_in=8,
    )


def test_relu_conv_max_pool_network_backward_matches_torch() -> None:
    """A small network of the new operations end to end, gradients to every input."""
    x = _random((2, 2, 8, 8), 17, torch.float64)
    w = _random((3, 2, 3, 3), 18, torch.float64)

    def encrypted(e: EncryptedTensor, ew: EncryptedTensor) -> EncryptedTensor:
        h = e.pad((1, 1, 1, 1), "reflect").conv2d(ew).leaky_relu(0.2)
        return h.max_pool2d(3, 2, 1).gelu().adaptive_avg_pool2d(1)

    def plain(p: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(F.conv2d(F.pad(p, (1, 1, 1, 1), "reflect"), pw), 0.2)
        return F.adaptive_avg_pool2d(F.gelu(F.max_pool2d(h, 3, 2, 1)), 1)

    _compare(encrypted, plain, [x, w], KEYS[0], fan_in=9)


# --- channel-wise maximum along a dim ------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_amax_matches_torch(dim: int, dtype: torch.dtype) -> None:
    x = _random((5, 7, 3), 19, dtype)
    _compare(lambda e: e.amax(dim), lambda p: p.amax(dim), [x], KEYS[1])
    _compare(lambda e: e.amax(dim, keepdim=True), lambda p: p.amax(dim, keepdim=True), [x], KEYS[0])


def test_amax_sends_a_tie_s_gradient_to_the_first_maximum_as_torch_max() -> None:
    x = _key_free_ties((4, 9), 20)
    _exact_on_key_free(lambda e: e.amax(1), lambda p: p.max(1).values, x)
