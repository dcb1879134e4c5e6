"""Analytic functions of 2x2 ciphertext blocks by Cayley-Hamilton arithmetic.

Write a block as ``C = t I + N`` with ``t = tr(C) / 2`` and the traceless ``N``, whose square
is ``N^2 = delta I`` with ``delta = ((c00 - c11) / 2)^2 + c01 c10`` (Cayley-Hamilton). Every
polynomial, inverse or power series in ``C`` then lies in ``span{I, N}``: it is a pair
``(alpha, beta)`` meaning ``alpha I + beta N``, multiplied as
``(a1, b1)(a2, b2) = (a1 a2 + b1 b2 delta, a1 b2 + a2 b1)``. So a function of a whole tensor
of blocks costs a few element-wise kernels, with no eigen-decomposition and no key.

Bounded functions (tanh, sigmoid) never form a large intermediate: ``exp(-C)`` would be
``e^|r|`` large when one channel is large, and its round-off would swamp the other channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Pair:
    """``alpha I + beta N`` for a fixed traceless ``N`` with ``N^2 = delta I``."""

    alpha: torch.Tensor
    beta: torch.Tensor
    delta: torch.Tensor

    def __add__(self, other: _Pair) -> _Pair:
        return _Pair(self.alpha + other.alpha, self.beta + other.beta, self.delta)

    def __sub__(self, other: _Pair) -> _Pair:
        return _Pair(self.alpha - other.alpha, self.beta - other.beta, self.delta)

    def __mul__(self, other: _Pair) -> _Pair:
        return _Pair(
            self.alpha * other.alpha + self.beta * other.beta * self.delta,
            self.alpha * other.beta + other.alpha * self.beta,
            self.delta,
        )

    def scale(self, s: float) -> _Pair:
        return _Pair(self.alpha * s, self.beta * s, self.delta)

    def shift(self, s: float) -> _Pair:
        """``self + s I``."""
        return _Pair(self.alpha + s, self.beta, self.delta)

    def inverse(self) -> _Pair:
        det = self.alpha * self.alpha - self.beta * self.beta * self.delta
        return _Pair(self.alpha / det, -self.beta / det, self.delta)

    def _ch_sh(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ch(x) - 1``, ``ch(x)`` and ``sh(x)`` at ``x = beta^2 delta``, with
        ``ch = sum x^k / (2k)!`` and ``sh = sum x^k / (2k+1)!`` (cosh and sinh of
        ``sqrt(x)``, or cos and sin for round-off-negative ``x``); ``ch - 1`` is computed
        as ``2 sinh(sqrt(x) / 2)^2`` so it keeps its precision near zero."""
        x = self.beta * self.beta * self.delta
        root = x.abs().sqrt()
        positive = x >= 0
        half = 0.5 * root
        ch1 = torch.where(positive, 2.0 * torch.sinh(half) ** 2, -2.0 * torch.sin(half) ** 2)
        small = root < 1e-3
        safe = torch.where(small, torch.ones_like(root), root)
        sh_big = torch.where(positive, torch.sinh(safe), torch.sin(safe)) / safe
        sh = torch.where(small, 1.0 + x / 6.0 + x * x / 120.0, sh_big)
        return ch1, ch1 + 1.0, sh

    def exp(self) -> _Pair:
        """``e^alpha (ch I + sh beta N)``: exp's power series summed in closed form."""
        _, ch, sh = self._ch_sh()
        ea = torch.exp(self.alpha)
        return _Pair(ea * ch, ea * sh * self.beta, self.delta)

    def expm1(self) -> _Pair:
        """``exp(self) - I`` without cancellation near zero."""
        ch1, ch, sh = self._ch_sh()
        ea = torch.exp(self.alpha)
        return _Pair(torch.expm1(self.alpha) * ch + ch1, ea * sh * self.beta, self.delta)


@dataclass(frozen=True)
class _Blocks:
    """A tensor of 2x2 blocks split as ``t I + N``; converts pairs back to entries."""

    t: torch.Tensor
    h: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    delta: torch.Tensor

    @classmethod
    def of(cls, entries: torch.Tensor) -> _Blocks:
        a, b = entries[..., 0, 0], entries[..., 0, 1]
        c, d = entries[..., 1, 0], entries[..., 1, 1]
        h = 0.5 * (a - d)
        return cls(0.5 * (a + d), h, b, c, h * h + b * c)

    def pair(self) -> _Pair:
        """``C`` itself."""
        return _Pair(self.t, torch.ones_like(self.t), self.delta)

    def constant(self, value: float) -> _Pair:
        return _Pair(torch.full_like(self.t, value), torch.zeros_like(self.t), self.delta)

    def entries(self, p: _Pair) -> torch.Tensor:
        bh = p.beta * self.h
        top = torch.stack((p.alpha + bh, p.beta * self.b), -1)
        bottom = torch.stack((p.beta * self.c, p.alpha - bh), -1)
        return torch.stack((top, bottom), -2)


def _tanh(blocks: _Blocks, x: _Pair, bound: float) -> _Pair:
    """tanh by scaling and doubling: every iterate has eigenvalues in (-1, 1).

    ``x`` is halved ``k`` times until ``||x / 2^k|| <= 1``; there
    ``tanh(y) = (exp(2y) - I)(exp(2y) + I)^-1`` with ``exp(2y)`` within ``[e^-2, e^2]`` on each
    channel (and ``exp - I`` free of cancellation), and the double-angle formula
    ``tanh(2y) = 2 tanh(y) (I + tanh(y)^2)^-1`` is applied ``k`` times; the map contracts
    errors near saturation. ``bound`` bounds the spectral norm of ``x`` (from its entries),
    so ``k`` is one number for the whole tensor.
    """
    if not math.isfinite(bound):
        nan = torch.full_like(blocks.t, math.nan)
        return _Pair(nan, nan, blocks.delta)
    k = max(0, math.ceil(math.log2(bound))) if bound > 1.0 else 0
    em1 = x.scale(2.0 / 2**k).expm1()
    t = em1 * em1.shift(2.0).inverse()
    for _ in range(k):
        t = (t * (t * t).shift(1.0).inverse()).scale(2.0)
    return t


def _bound(entries: torch.Tensor, factor: float = 1.0) -> float:
    """A bound on the spectral norm of every block (2 x the largest entry), times ``factor``."""
    return 2.0 * factor * float(entries.detach().abs().amax()) if entries.numel() else 0.0


def _exp(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _Blocks.of(entries)
    value = blocks.entries(blocks.pair().exp())
    return value, value


def _tanh_fn(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _Blocks.of(entries)
    y = _tanh(blocks, blocks.pair(), _bound(entries))
    return blocks.entries(y), blocks.entries((y * y).scale(-1.0).shift(1.0))


def _sigmoid_pair(blocks: _Blocks, entries: torch.Tensor) -> _Pair:
    """sigmoid(C) = (I + tanh(C / 2)) / 2."""
    return _tanh(blocks, blocks.pair().scale(0.5), _bound(entries, 0.5)).shift(1.0).scale(0.5)


def _sigmoid_fn(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _Blocks.of(entries)
    s = _sigmoid_pair(blocks, entries)
    return blocks.entries(s), blocks.entries(s - s * s)


_SOFTPLUS_NEWTON_STEPS = 5


def _softplus_fn(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softplus(C) = log(I + exp(C)) by Newton's iteration for the logarithm.

    The step ``Y <- Y - I + exp(-Y) (I + exp(C))`` is evaluated as
    ``Y - I + exp(-Y) + exp(C - Y)``: near the answer both exponents are <= 0 in each
    channel, so nothing is large. The start ``C s + 4 log(2) s (I - s)``,
    ``s = sigmoid(C)``, is within 0.08 of the answer on each channel and each step squares
    the error (``e -> e^2 / 2``): five steps reach round-off.
    """
    blocks = _Blocks.of(entries)
    c = blocks.pair()
    s = _sigmoid_pair(blocks, entries)
    y = c * s + (s - s * s).scale(4.0 * math.log(2.0))
    for _ in range(_SOFTPLUS_NEWTON_STEPS):
        y = y.shift(-1.0) + y.scale(-1.0).exp() + (c - y).exp()
    return blocks.entries(y), blocks.entries(s)


ANALYTIC: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "exp": _exp,
    "sigmoid": _sigmoid_fn,
    "tanh": _tanh_fn,
    "softplus": _softplus_fn,
}
"""name -> (value, derivative) of the function on a tensor of 2x2 blocks ``[..., 2, 2]``."""
