"""Encryption and decryption with a MORE key, and the shadow-value policies.

``encrypt`` maps ``x`` to ``S diag(x, r) S^-1 = x P + r Q`` with the two rank-one projectors
``P = S e1 e1^T S^-1`` and ``Q = S e2 e2^T S^-1``. The shadow ``r`` is not "any random number":
the shadow channel trains a real network on ``r``-data, so it must be a well-posed input
(design note, section 5). Policies:

- :class:`FeatureRange`: ``r`` uniform over the feature's declared range;
- :class:`ValidLabel`: for one-hot targets, ``r`` is a random valid one-hot label;
- :class:`RegressionRange`: ``r`` uniform over the (normalised) target range.

Only a site holds a key, so only sites call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor


@dataclass(frozen=True)
class FeatureRange:
    """Shadow values uniform over the feature's declared range ``[low, high]``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low <= self.high):
            raise ValueError(f"invalid shadow range [{self.low}, {self.high}]")

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        return self.low + (self.high - self.low) * u


@dataclass(frozen=True)
class RegressionRange(FeatureRange):
    """Shadow values uniform over the normalised regression-target range."""


@dataclass(frozen=True)
class ValidLabel:
    """Shadow of a one-hot target ``[..., K]``: a random valid one-hot label per row.

    Uniform shadows on one-hot targets do not sum to 1 and drive softmax cross-entropy in
    the shadow channel to NaN within an epoch (design note, section 5).
    """

    num_classes: int

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"ValidLabel needs at least 2 classes, got {self.num_classes}")

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.ndim < 1 or x.shape[-1] != self.num_classes:
            raise ValueError(
                f"ValidLabel({self.num_classes}) expects one-hot targets [..., "
                f"{self.num_classes}], got shape {tuple(x.shape)}"
            )
        labels = torch.randint(self.num_classes, x.shape[:-1], generator=generator)
        return torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float64)


ShadowPolicy = FeatureRange | ValidLabel


def _projectors(key: MoreKey) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(key.matrix)
    si = torch.tensor(key.inverse)
    return torch.outer(s[:, 0], si[0]), torch.outer(s[:, 1], si[1])


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"encrypt takes float32 or float64 data, got {t.dtype}")
    return t


def encrypt(
    x: torch.Tensor | np.ndarray,
    key: MoreKey,
    policy: ShadowPolicy | None = None,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> EncryptedTensor:
    """Encrypt a float32/float64 tensor or array of any shape; keeps its dtype.

    Without a policy the shadow is uniform over the tensor's observed range. Pass a
    ``generator`` or ``seed`` for reproducible shadows (tests); otherwise OS randomness.
    """
    t = _as_tensor(x)
    if not torch.isfinite(t).all():
        raise ValueError("cannot encrypt non-finite values")
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    x64 = t.detach().to("cpu", torch.float64)
    if policy is None:
        lo, hi = (float(x64.min()), float(x64.max())) if x64.numel() else (0.0, 1.0)
        policy = FeatureRange(lo, hi)
    r = policy.sample(x64, generator)
    p, q = _projectors(key)
    c = x64[..., None, None] * p + r[..., None, None] * q
    return EncryptedTensor(c.to(device=t.device, dtype=t.dtype), key.fingerprint)


def _check_key(c: EncryptedTensor, key: MoreKey) -> None:
    if c.fingerprint is not None and c.fingerprint != key.fingerprint:
        raise ValueError(
            f"ciphertext is under key {c.fingerprint}, not under this key ({key.fingerprint})"
        )


def _channel(c: EncryptedTensor, key: MoreKey, index: int) -> torch.Tensor:
    """``(S^-1 C S)[i, i]`` computed in float64, returned in the ciphertext's dtype."""
    _check_key(c, key)
    s = torch.tensor(key.matrix, device=c.device)
    si = torch.tensor(key.inverse, device=c.device)
    entries = c.entries.detach().to(torch.float64)
    out = torch.einsum("...kl,k,l->...", entries, si[index], s[:, index])
    return out.to(c.dtype)


def decrypt(c: EncryptedTensor, key: MoreKey) -> torch.Tensor:
    """The data channel ``(S^-1 C S)[0, 0]``, with the ciphertext's logical shape and dtype."""
    return _channel(c, key, 0)


def decrypt_shadow(c: EncryptedTensor, key: MoreKey) -> torch.Tensor:
    """The shadow channel ``(S^-1 C S)[1, 1]``: what the shadow network computed."""
    return _channel(c, key, 1)


def leakage(c: EncryptedTensor, key: MoreKey) -> torch.Tensor:
    """Off-diagonal part of ``S^-1 C S`` (zero for an exact ciphertext): accumulated round-off."""
    _check_key(c, key)
    s = torch.tensor(key.matrix, device=c.device)
    si = torch.tensor(key.inverse, device=c.device)
    d = si @ c.entries.detach().to(torch.float64) @ s
    return torch.stack((d[..., 0, 1], d[..., 1, 0]), -1).abs().amax(-1).to(c.dtype)


def refresh(c: EncryptedTensor, key: MoreKey) -> EncryptedTensor:
    """Re-encrypt a ciphertext with the same data and shadow values (site only).

    Round-off leaves a tiny component outside the key's algebra (the off-diagonal of
    ``S^-1 C S``); gradient descent on ciphertexts amplifies it geometrically (measured:
    x10 to x100 per 25 SGD steps on MNIST). Re-encrypting both channels projects it away
    without changing either channel, so a site that refreshes its model every few steps
    trains exactly as long as it likes.
    """
    _check_key(c, key)
    s = torch.tensor(key.matrix, device=c.device)
    si = torch.tensor(key.inverse, device=c.device)
    d = si @ c.entries.detach().to(torch.float64) @ s
    p, q = _projectors(key)
    fresh = d[..., 0, 0, None, None] * p.to(c.device) + d[..., 1, 1, None, None] * q.to(c.device)
    return EncryptedTensor(fresh.to(c.dtype), key.fingerprint)
