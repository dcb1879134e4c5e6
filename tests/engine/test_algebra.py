"""The homomorphism: decrypt(a op b) == decrypt(a) op decrypt(b), and the type's manners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from federation.more import (
    EncryptedTensor,
    FeatureRange,
    KeyMismatchError,
    MoreKey,
    ValidLabel,
    decrypt,
    decrypt_shadow,
    encode_plain,
    encrypt,
    generate_key,
)

KEYS = [generate_key(s) for s in range(5)]
values = arrays(np.float64, st.integers(1, 12), elements=st.floats(-8, 8))
ALGEBRA = settings(max_examples=60, deadline=None)
"""This module's property tests (a local setting: loading a profile would change every module's)."""


def _pair(x: np.ndarray, y: np.ndarray, k: MoreKey) -> tuple[EncryptedTensor, EncryptedTensor]:
    return encrypt(x, k, FeatureRange(-8, 8), seed=1), encrypt(y, k, FeatureRange(-8, 8), seed=2)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale


@ALGEBRA
@given(x=values, k=st.sampled_from(KEYS), data=st.data())
def test_add_sub_mul_are_homomorphic(x, k, data) -> None:
    y = data.draw(arrays(np.float64, x.shape, elements=st.floats(-8, 8)))
    a, b = _pair(x, y, k)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    _close(decrypt(a + b, k), tx + ty)
    _close(decrypt(a - b, k), tx - ty)
    _close(decrypt(a * b, k), tx * ty)
    _close(decrypt(a * 2.5 - 1.0, k), tx * 2.5 - 1.0)
    _close(decrypt(a * ty + tx, k), tx * ty + tx)


@ALGEBRA
@given(
    x=arrays(np.float64, st.integers(1, 12), elements=st.floats(0.1, 8) | st.floats(-8, -0.1)),
    k=st.sampled_from(KEYS),
)
def test_inverse_is_homomorphic(x, k) -> None:
    a = encrypt(x, k, FeatureRange(0.5, 4.0), seed=3)  # shadows away from zero too
    _close(decrypt(a.inverse(), k), 1.0 / torch.from_numpy(x), 1e-9)


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("exp", torch.exp),
        ("sigmoid", torch.sigmoid),
        ("tanh", torch.tanh),
        ("softplus", F.softplus),
        ("square", torch.square),
    ],
)
@ALGEBRA
@given(x=values, k=st.sampled_from(KEYS))
def test_analytic_functions_are_homomorphic(name, fn, x, k) -> None:
    a = encrypt(x, k, FeatureRange(-8, 8), seed=4)
    _close(decrypt(getattr(a, name)(), k), fn(torch.from_numpy(x)), 1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bounded_functions_keep_the_data_channel_when_the_shadow_is_large(dtype) -> None:
    # exp(-C) would be e^|r| large here and swamp the data channel; tanh doubling does not.
    k = KEYS[0]
    x = torch.linspace(-6, 6, 41, dtype=torch.float64)
    for r in (-300.0, 300.0):
        c = encrypt(x.to(dtype), k, FeatureRange(r, r), seed=0)
        # The inherent MORE round-off is ~ eps * |r| * cond(S)^2 (design note, section 5),
        # linear in |r|; an exp-based sigmoid would instead be off by ~ eps * e^|r|.
        tol = 10 * torch.finfo(dtype).eps * abs(r) * k.condition_number**2
        assert float((decrypt(c.sigmoid(), k).double() - torch.sigmoid(x)).abs().max()) < tol
        assert float((decrypt(c.tanh(), k).double() - torch.tanh(x)).abs().max()) < tol
        assert float((decrypt_shadow(c.tanh(), k).double() - np.sign(r)).abs().max()) < tol


def test_polynomials_powers_reductions_and_contractions(key) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    a = encrypt(x, key, seed=1)
    ew = encrypt(w, key, seed=2)
    _close(decrypt(a.polynomial([1.0, -2.0, 0.5]), key), 1 - 2 * x + 0.5 * x**2)
    _close(decrypt(a**3, key), x**3)
    _close(decrypt(a.sum(), key), x.sum())
    _close(decrypt(a.sum(dim=1), key), x.sum(1))
    _close(decrypt(a.mean(dim=(0, 2), keepdim=True), key), x.mean((0, 2), keepdim=True))
    _close(decrypt(a @ ew, key), x @ w)
    _close(decrypt(a @ w, key), x @ w)
    _close(decrypt(a.flatten(1), key), x.flatten(1))
    _close(decrypt(a.permute(2, 0, 1), key), x.permute(2, 0, 1))
    _close(decrypt(a.transpose(0, -1), key), x.transpose(0, -1))
    _close(decrypt(a[1:, 2], key), x[1:, 2])
    _close(decrypt(EncryptedTensor.cat([a, a], 1), key), torch.cat([x, x], 1))


def test_layers_contractions_match_torch(key) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    ex, ew, eb = encrypt(x, key, seed=1), encrypt(w, key, seed=2), encrypt(b, key, seed=3)
    _close(decrypt(ex.conv2d(ew, eb, stride=2, padding=1), key), F.conv2d(x, w, b, 2, 1))
    _close(decrypt(ex.avg_pool2d(3, 2, 1), key), F.avg_pool2d(x, 3, 2, 1))
    lw, lb = torch.randn(5, 81, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    flat = ex.flatten(2)
    _close(
        decrypt(flat.linear(encrypt(lw, key, seed=4), encrypt(lb, key, seed=5)), key),
        F.linear(x.flatten(2), lw, lb),
    )


def test_key_free_encoding_decrypts_under_every_key() -> None:
    w = torch.tensor([[0.5, -2.0], [3.0, 0.0]], dtype=torch.float64)
    e = encode_plain(w)
    assert e.fingerprint is None
    for k in KEYS:
        _close(decrypt(e, k), w, 1e-14)
        _close(decrypt_shadow(e, k), w, 1e-14)


def test_encrypt_keeps_dtype_and_accepts_numpy(key) -> None:
    for dtype in (np.float32, np.float64):
        x = np.linspace(-1, 1, 7, dtype=dtype).reshape(7, 1)
        c = encrypt(x, key)
        assert c.shape == (7, 1) and c.entries.shape == (7, 1, 2, 2)
        assert decrypt(c, key).numpy().dtype == dtype
    with pytest.raises(TypeError, match="float32 or float64"):
        encrypt(np.arange(3), key)
    with pytest.raises(ValueError, match="non-finite"):
        encrypt(np.array([np.nan]), key)


def test_ciphertexts_hide_values_and_refuse_order(key) -> None:
    c = encrypt(torch.tensor([1.2345678, 2.0], dtype=torch.float64), key)
    text = repr(c) + str(c) + f"{c}"
    assert "1.23" not in text and "shape=(2,)" in text and key.fingerprint in text
    for op in (bool, float, int, np.asarray, lambda t: t < c, lambda t: t == c, lambda t: t >= 0):
        with pytest.raises(TypeError):
            op(c)
    with pytest.raises(TypeError):
        hash(c)


def test_ciphertexts_under_different_keys_do_not_mix(key, other_key) -> None:
    a = encrypt(torch.ones(3, dtype=torch.float64), key)
    b = encrypt(torch.ones(3, dtype=torch.float64), other_key)
    for op in (
        lambda: a + b,
        lambda: a * b,
        lambda: a @ b.reshape(3, 1),
        lambda: a.linear(b.reshape(1, 3)),
    ):
        with pytest.raises(KeyMismatchError, match="different keys"):
            op()
    with pytest.raises(ValueError, match="not under this key"):
        decrypt(a, other_key)
    assert (a + encode_plain(torch.ones(3, dtype=torch.float64))).fingerprint == key.fingerprint


def test_shape_mismatches_raise(key) -> None:
    a = encrypt(torch.ones(2, 3, dtype=torch.float64), key)
    with pytest.raises(RuntimeError):
        _ = a + encrypt(torch.ones(4, dtype=torch.float64), key)
    with pytest.raises(ValueError, match="features"):
        a.linear(encrypt(torch.ones(5, 4, dtype=torch.float64), key))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 2\]"):
        EncryptedTensor(torch.ones(3, 2))
    with pytest.raises(ValueError, match="channels"):
        encrypt(torch.ones(1, 2, 4, 4, dtype=torch.float64), key).conv2d(
            encrypt(torch.ones(1, 3, 2, 2, dtype=torch.float64), key)
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_is_homomorphic_and_bounded(dtype) -> None:
    k = KEYS[1]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 10, generator=gen, dtype=torch.float64) * 4
    # Shadow logits with a spread of 120: exp would overflow float32 and drown the data.
    c = encrypt(z.to(dtype), k, FeatureRange(-60.0, 60.0), seed=3)
    p = c.softmax(dim=-1)
    # The channel-wise maximum subtracted first: 5x to 15x below the former scaling and
    # squaring (1.1e-14 and 7.6e-6 here).
    tol = 5e-15 if dtype == torch.float64 else 3e-6
    assert float((decrypt(p, k).double() - torch.softmax(z, -1)).abs().max()) < tol
    r = decrypt_shadow(c, k).double()
    assert float((decrypt_shadow(p, k).double() - torch.softmax(r, -1)).abs().max()) < tol


def test_reflected_division_mean_and_casts_are_homomorphic(key) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.5
    y = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.5
    w = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    a = encrypt(x, key, FeatureRange(0.5, 1.5), seed=1)  # shadows away from zero: invertible
    b = encrypt(y, key, FeatureRange(0.5, 1.5), seed=2)
    r = decrypt_shadow(a, key)
    _close(decrypt(2.0 - a, key), 2.0 - x)
    _close(decrypt_shadow(2.0 - a, key), 2.0 - r)
    _close(decrypt(a / b, key), x / y, 1e-9)
    _close(decrypt_shadow(a / b, key), r / decrypt_shadow(b, key), 1e-9)
    _close(decrypt(a / 4.0, key), x / 4.0)
    _close(decrypt(1.0 / a, key), 1.0 / x, 1e-9)
    _close(decrypt_shadow(1.0 / a, key), 1.0 / r, 1e-9)
    _close(decrypt(w @ a, key), w @ x)
    _close(decrypt(a.mean(), key), x.mean())
    _close(decrypt(a.sum().flatten(), key), x.sum().flatten())
    assert a.sum().flatten().shape == x.sum().flatten().shape == (1,)
    single = a.float()
    assert single.dtype == torch.float32 and single.double().dtype == torch.float64
    tol = 10 * torch.finfo(torch.float32).eps * key.condition_number**2
    _close(decrypt(single, key).double(), x, tol)
    copy = a.clone()
    assert copy.entries.data_ptr() != a.entries.data_ptr()
    assert torch.equal(copy.entries, a.entries) and copy.fingerprint == a.fingerprint


def test_backward_of_a_0d_loss_differentiates_both_channels(key) -> None:
    """``loss.backward()`` without a gradient back-propagates the trace of a 0-d ciphertext,
    which is data channel + shadow channel: torch's gradient of the two plaintext losses."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    a = encrypt(x, key, seed=1)
    loss = (a * w).sum()
    assert loss.ndim == 0
    loss.backward()
    r = decrypt_shadow(a, key)
    twin = w.detach().clone().requires_grad_()
    ((x * twin).sum() + (r * twin).sum()).backward()
    _close(w.grad, twin.grad)

    c = encrypt(x, key, seed=2)
    assert not c.requires_grad
    assert c.requires_grad_().requires_grad
    (c * 3.0).sum().backward()
    assert c.grad is not None
    _close(decrypt(c.grad, key), torch.full_like(x, 3.0))  # d(3 x + 3 r)/dx
    _close(decrypt_shadow(c.grad, key), torch.full_like(x, 3.0))
    with pytest.raises(ValueError, match="needs a 0-d encrypted loss"):
        (a * 2.0).backward()
    with pytest.raises(ValueError, match=r"gradient shape \(5,\) != \(5, 3\)"):
        a.backward(encrypt(torch.ones(5, dtype=torch.float64), key))


def test_integer_values_encode_in_the_default_dtype() -> None:
    e = encode_plain(torch.tensor([1, -2, 3]))
    assert e.dtype == torch.get_default_dtype()
    for k in KEYS[:2]:
        _close(decrypt(e, k).double(), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))


def test_the_type_refuses_what_stays_outside_the_algebra(key) -> None:
    a = encrypt(torch.ones(2, 3, dtype=torch.float64), key)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got ndarray"):
        EncryptedTensor(np.ones((3, 2, 2)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating point"):
        EncryptedTensor(torch.ones(3, 2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d"):
        len(a.sum())
    assert len(a) == len(torch.ones(2, 3)) == 2
    for power in (-1, 0.5):
        with pytest.raises(ValueError, match="non-negative integer powers"):
            _ = a**power  # type: ignore[operator]
    with pytest.raises(ValueError, match="at least one coefficient"):
        a.polynomial([])
    with pytest.raises(IndexError, match="dim 2 out of range for 2-d"):
        a.sum(dim=2)
    with pytest.raises(IndexError):  # torch refuses the same dim
        torch.ones(2, 3).sum(dim=2)
    with pytest.raises(IndexError, match="Ellipsis"):
        _ = a[..., 0]
    image = encrypt(torch.ones(1, 2, 4, 4, dtype=torch.float64), key)
    with pytest.raises(ValueError, match=r"expects a \[O, C, \*kernel\] weight"):
        image.conv2d(encrypt(torch.ones(2, 2, 2, dtype=torch.float64), key))


def test_shadow_policies_refuse_ranges_and_labels_they_cannot_sample(key) -> None:
    for low, high in ((1.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="invalid shadow range"):
            FeatureRange(low, high)
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        ValidLabel(1)
    one_hot = F.one_hot(torch.tensor([0, 2, 1]), 3).double()
    shadow = decrypt_shadow(encrypt(one_hot, key, ValidLabel(3), seed=0), key)
    labels = shadow.round()  # a valid one-hot label per row, up to round-off
    assert torch.allclose(shadow, labels, atol=1e-12, rtol=0)
    assert torch.equal(labels.sum(-1), torch.ones(3, dtype=torch.float64))
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(
        ValueError, match=r"expects one-hot targets \[\.\.\., 4\], got shape \(3, 3\)"
    ):
        encrypt(one_hot, key, ValidLabel(4), seed=0)
