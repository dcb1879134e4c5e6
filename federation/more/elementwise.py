"""Any element-wise function of ciphertexts, key-free, by the eigenvalue-symmetric formula.

A 2x2 block ``C = t I + M`` (``t = tr(C) / 2``, ``M`` traceless) has the eigenvalues ``t +- s``
with ``s^2 = delta = ((c00 - c11) / 2)^2 + c01 c10``: its data and its shadow value, in an order
nobody needs to know (design note, section 2). For any real ``f``

    f(C) = A I + B M,   A = (f(t + s) + f(t - s)) / 2,   B = (f(t + s) - f(t - s)) / (2 s)

applies ``f`` to each channel separately (it interpolates ``f`` at the two eigenvalues). ``f``
is evaluated only at the two channel values, so a bounded ``f`` never forms a large
intermediate, and a channel's error is the round-off of ``f`` at that channel plus that of the
ciphertext itself (about ``eps cond(S)^2 max(|x|, |r|)``).

Accuracy:
- ``B``'s difference quotient cancels when ``s << |t|``, but only ``B M`` uses ``B`` and the
  channels of ``M`` are ``+-s``: its absolute error ``eps |f| / s`` costs ``eps |f|`` in a
  channel. It divides by the rounded ``(t + s) - (t - s)``, the true distance of the points.
- For ``s <= tau = 4 eps (|t| + |M|)`` (``|M|`` the largest entry of ``M``) the channels agree
  within the ciphertext's own round-off, ``M`` is round-off and ``s`` is noise: there
  ``B = 0``, dropping ``f'(t) (x - t)``, a term within that round-off. This also covers
  ``s = 0`` and needs no derivative (nor, in the backward pass, a second derivative).
- ``delta`` is formed from ``M / |M|``, so its squares neither overflow nor underflow, and is
  clamped at 0 (round-off makes it slightly negative when the channels agree).

The derivative in the algebra is the same formula with ``f'``, and autograd's rule is
``grad_C = f'(C)^T grad_Y`` (see :mod:`federation.more.tensor`). Kinks follow torch's
one-sided conventions through the ``f'`` given (``relu'(0) = 0``), exactly so where both
channels are equal (key-free blocks); a channel within round-off of a kink may see either side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ElementFn = Callable[[torch.Tensor], torch.Tensor]
"""A real function on plain tensors, element by element (same shape and dtype out)."""

FnPair = tuple[ElementFn, ElementFn]
"""A function and its derivative."""

_TAU = 4.0  # degenerate-block threshold, in units of eps (|t| + |M|)


def _coefficients(entries: torch.Tensor, f: ElementFn) -> tuple[torch.Tensor, ...]:
    """``A``, ``B`` of ``f(C) = A I + B M`` for every block, and ``M``'s entries ``h, b, c``
    (``M = [[h, b], [c, -h]]``). Each step is one element-wise kernel on the blocks' entries;
    nothing of size ``[..., 2, 2]`` is formed until the caller assembles its result."""
    a, b = entries[..., 0, 0], entries[..., 0, 1]
    c, d = entries[..., 1, 0], entries[..., 1, 1]
    t = 0.5 * (a + d)
    h = 0.5 * (a - d)
    size = torch.maximum(torch.maximum(h.abs(), b.abs()), c.abs())
    unit = torch.where(size > 0, size, 1.0)
    hn, bn, cn = h / unit, b / unit, c / unit
    s = size * (hn * hn + bn * cn).clamp_min(0.0).sqrt()
    degenerate = s <= _TAU * torch.finfo(entries.dtype).eps * (t.abs() + size)
    hi, lo = t + s, t - s
    values = f(torch.stack((hi, lo))).to(entries.dtype)
    f_hi, f_lo = values[0], values[1]
    width = torch.where(degenerate, 1.0, hi - lo)  # the rounded distance of the points
    big_a = 0.5 * (f_hi + f_lo)
    big_b = torch.where(degenerate, 0.0, (f_hi - f_lo) / width)
    return big_a, big_b, h, b, c


def _blocks(p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The blocks ``[[p, q], [r, u]]``."""
    return torch.stack((p, q, r, u), dim=-1).unflatten(-1, (2, 2))


class _Channelwise(torch.autograd.Function):
    """``f(C)`` with the algebra's chain rule ``grad_C = f'(C)^T grad_Y``.

    Only the input blocks are saved (4 numbers per value, the least the backward pass can
    start from); ``f'(C)`` is recomputed there, so inference pays for ``f`` alone and a
    training step holds no spectrum between its passes. ``f'(C)^T grad_Y`` is written out
    entry by entry instead of as a batched 2x2 matmul."""

    @staticmethod
    def forward(ctx: Any, entries: torch.Tensor, f: ElementFn, df: ElementFn) -> torch.Tensor:
        ctx.save_for_backward(entries)
        ctx.df = df
        big_a, big_b, h, b, c = _coefficients(entries, f)
        bh = big_b * h
        return _blocks(big_a + bh, big_b * b, big_b * c, big_a - bh)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (entries,) = ctx.saved_tensors
        big_a, big_b, h, b, c = _coefficients(entries, ctx.df)
        bh = big_b * h
        p, q, r, u = big_a + bh, big_b * c, big_b * b, big_a - bh  # f'(C)^T
        g00, g01 = grad[..., 0, 0], grad[..., 0, 1]
        g10, g11 = grad[..., 1, 0], grad[..., 1, 1]
        return (
            _blocks(p * g00 + q * g10, p * g01 + q * g11, r * g00 + u * g10, r * g01 + u * g11),
            None,
            None,
        )


def channelwise(entries: torch.Tensor, f: ElementFn, df: ElementFn) -> torch.Tensor:
    """``f`` on each channel of every block ``[..., 2, 2]``, differentiable with ``df``."""
    return _Channelwise.apply(entries, f, df)


# --- the functions, each with torch's derivative convention at its kinks -------------------
def _mask(condition: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return condition.to(like.dtype)


def exp() -> FnPair:
    return torch.exp, torch.exp


def _dtanh(z: torch.Tensor) -> torch.Tensor:
    y = torch.tanh(z)
    return 1.0 - y * y


def tanh() -> FnPair:
    return torch.tanh, _dtanh


def _dsigmoid(z: torch.Tensor) -> torch.Tensor:
    y = torch.sigmoid(z)
    return y * (1.0 - y)


def sigmoid() -> FnPair:
    return torch.sigmoid, _dsigmoid


def softplus(beta: float = 1.0, threshold: float = 20.0) -> FnPair:
    """torch's softplus: ``x`` where ``x * beta > threshold``, channel by channel."""

    def df(z: torch.Tensor) -> torch.Tensor:
        zb = z * beta
        return torch.where(zb > threshold, torch.ones_like(z), torch.sigmoid(zb))

    return (lambda z: F.softplus(z, beta, threshold)), df


def relu() -> FnPair:
    return torch.relu, lambda z: _mask(z > 0, z)


def relu_tie_half() -> FnPair:
    """relu with derivative 1/2 at 0: ``maximum``'s even split of the gradient at ties."""
    return torch.relu, lambda z: _mask(z > 0, z) + 0.5 * _mask(z == 0, z)


def leaky_relu(negative_slope: float = 0.01) -> FnPair:
    def df(z: torch.Tensor) -> torch.Tensor:
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))

    return (lambda z: F.leaky_relu(z, negative_slope)), df


def elu(alpha: float = 1.0) -> FnPair:
    def df(z: torch.Tensor) -> torch.Tensor:
        return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(z.clamp_max(0.0)))

    return (lambda z: F.elu(z, alpha)), df


_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_BETA = math.sqrt(2.0 / math.pi)
_GELU_KAPPA = 0.044715


def _dgelu(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * _SQRT1_2))
    return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _dgelu_tanh(z: torch.Tensor) -> torch.Tensor:
    z2 = z * z
    inner = torch.tanh(_GELU_BETA * (z + _GELU_KAPPA * z2 * z))
    right = 0.5 * z * (1.0 - inner * inner) * _GELU_BETA * (1.0 + 3.0 * _GELU_KAPPA * z2)
    return 0.5 * (1.0 + inner) + right


def gelu(approximate: str = "none") -> FnPair:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    df = _dgelu if approximate == "none" else _dgelu_tanh
    return (lambda z: F.gelu(z, approximate=approximate)), df


def _dsilu(z: torch.Tensor) -> torch.Tensor:
    y = torch.sigmoid(z)
    return y * (1.0 + z * (1.0 - y))


def silu() -> FnPair:
    return F.silu, _dsilu


def hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> FnPair:
    """Derivative 0 on the boundaries, as torch's."""
    return (lambda z: F.hardtanh(z, min_val, max_val)), (
        lambda z: _mask((z > min_val) & (z < max_val), z)
    )


def clamp(min: float | None = None, max: float | None = None) -> FnPair:
    """Derivative 1 on the boundaries (torch's clamp, unlike its hardtanh)."""
    if min is None and max is None:
        raise ValueError("clamp: at least one of min and max must be given")

    def df(z: torch.Tensor) -> torch.Tensor:
        inside = torch.ones_like(z, dtype=torch.bool)
        if min is not None:
            inside = inside & (z >= min)
        if max is not None:
            inside = inside & (z <= max)
        return _mask(inside, z)

    return (lambda z: torch.clamp(z, min, max)), df


def absolute() -> FnPair:
    return torch.abs, torch.sign


def sqrt() -> FnPair:
    """Clamped at 0: a channel that round-off puts just below 0 gives 0, not NaN (a NaN
    channel would destroy the other one)."""
    return (lambda z: torch.sqrt(z.clamp_min(0.0))), (lambda z: 0.5 / torch.sqrt(z.clamp_min(0.0)))


def rsqrt() -> FnPair:
    return torch.rsqrt, lambda z: -0.5 * torch.rsqrt(z) ** 3


def log() -> FnPair:
    return torch.log, torch.reciprocal
