"""Losses for encrypted training, each with its plaintext twin (torch's own loss).

The encrypted side never evaluates a loss: it injects ``dL/d outputs`` (``Z.backward(grad)``),
computed in the algebra for torch's batch-mean reduction, so no encrypted logarithm is needed.
Piecewise gradients (L1, Huber, SmoothL1) use the channel-wise element-wise functions, so each
channel gets exactly torch's gradient. Categorical losses take one-hot encrypted targets and the
plaintext twin takes the class indices (what torch's cross-entropy takes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from federation.more.tensor import EncryptedTensor

Weights = Sequence[float] | torch.Tensor | None


def _as_weights(w: Weights, like: torch.Tensor | EncryptedTensor) -> torch.Tensor | None:
    return None if w is None else torch.as_tensor(w, dtype=like.dtype, device=like.device)


def _sign(d: EncryptedTensor) -> EncryptedTensor:
    """``sign`` per channel (0 at 0, as torch's L1 gradient): a non-smooth element-wise map."""
    return d.map(torch.sign, torch.zeros_like)


class EncryptedLoss(ABC):
    """A loss: its algebra gradient for encrypted training and torch's value for plaintext."""

    name: ClassVar[str]
    #: targets are class indices in plaintext and valid one-hot labels when encrypted.
    categorical: ClassVar[bool] = False

    def gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        """``dL/d outputs`` in the algebra for the batch-mean loss, as torch defines it."""
        if outputs.shape != targets.shape:
            raise ValueError(
                f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ"
            )
        return self._gradient(outputs, targets)

    @abstractmethod
    def _gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        """The gradient for outputs and targets of the same shape."""

    @abstractmethod
    def plain(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """torch's own loss on plaintext (the twin the central property is tested against)."""


@dataclass(frozen=True, eq=False)
class CrossEntropy(EncryptedLoss):
    """``F.cross_entropy`` with class ``weight`` (weighted mean, as torch) and label smoothing.

    ``dL/dz_i = ((1 - e) w[y_i] (p_i - y_i) + e/C (sum(w) p_i - w)) / sum_i w[y_i]``; the
    normaliser is a ciphertext when weights are given (the labels are encrypted), so it is
    divided by the algebra inverse. Without weights it is ``(p - (1 - e) y - e/C) / B``.
    """

    weight: Weights = None
    label_smoothing: float = 0.0
    name: ClassVar[str] = "cross_entropy"
    categorical: ClassVar[bool] = True

    def _gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        classes, eps = outputs.shape[-1], self.label_smoothing
        p = outputs.softmax(dim=-1)
        w = _as_weights(self.weight, outputs)
        if w is None:
            target = targets * (1.0 - eps) + eps / classes if eps else targets
            return (p - target) / float(outputs.numel() // classes)
        wy = targets @ w[:, None]
        grad = (p - targets) * wy * (1.0 - eps)
        if eps:
            grad = grad + (p * float(w.sum()) - w) * (eps / classes)
        return grad * wy.sum().inverse()

    def plain(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = _as_weights(self.weight, outputs)
        return F.cross_entropy(outputs, targets, weight=w, label_smoothing=self.label_smoothing)


@dataclass(frozen=True, eq=False)
class MSE(EncryptedLoss):
    """``F.mse_loss``: ``2 (z - y) / numel``."""

    name: ClassVar[str] = "mse"

    def _gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        return (outputs - targets) * (2.0 / outputs.numel())

    def plain(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)


@dataclass(frozen=True, eq=False)
class L1(EncryptedLoss):
    """``F.l1_loss``: ``sign(z - y) / numel``."""

    name: ClassVar[str] = "l1"

    def _gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        return _sign(outputs - targets) / float(outputs.numel())

    def plain(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(outputs, targets)


@dataclass(frozen=True, eq=False)
class Huber(EncryptedLoss):
    """``F.huber_loss``: ``clamp(z - y, -delta, delta) / numel``."""

    delta: float = 1.0
    name: ClassVar[str] = "huber"

    def _gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        d = (outputs - targets).clamp(-self.delta, self.delta)
        return d / float(outputs.numel())

    def plain(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(outputs, targets, delta=self.delta)


@dataclass(frozen=True, eq=False)
class SmoothL1(EncryptedLoss):
    """``F.smooth_l1_loss``: ``clamp((z - y) / beta, -1, 1) / numel`` (L1's for beta = 0)."""

    beta: float = 1.0
    name: ClassVar[str] = "smooth_l1"

    def _gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        d = outputs - targets
        d = _sign(d) if self.beta == 0 else (d / self.beta).clamp(-1.0, 1.0)
        return d / float(outputs.numel())

    def plain(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(outputs, targets, beta=self.beta)


@dataclass(frozen=True, eq=False)
class BCEWithLogits(EncryptedLoss):
    """``F.binary_cross_entropy_with_logits`` with optional ``weight`` and ``pos_weight``.

    ``dL/dz = w ((pw y + 1 - y) sigmoid(z) - pw y) / numel`` (``sigmoid(z) - y`` for
    ``pw = 1``); targets are probabilities in [0, 1], encrypted with shadows in that range.
    """

    weight: Weights = None
    pos_weight: Weights = None
    name: ClassVar[str] = "bce_with_logits"

    def _gradient(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
        s = outputs.sigmoid()
        pw = _as_weights(self.pos_weight, outputs)
        if pw is None:
            grad = s - targets
        else:
            t = targets * pw
            grad = (t + 1.0 - targets) * s - t
        w = _as_weights(self.weight, outputs)
        if w is not None:
            grad = grad * w
        return grad / float(outputs.numel())

    def plain(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            outputs,
            targets,
            weight=_as_weights(self.weight, outputs),
            pos_weight=_as_weights(self.pos_weight, outputs),
        )


_BY_NAME: dict[str, type[EncryptedLoss]] = {
    cls.name: cls for cls in (CrossEntropy, MSE, L1, Huber, SmoothL1, BCEWithLogits)
}
LOSSES: tuple[str, ...] = tuple(_BY_NAME)

LossSpec = str | EncryptedLoss


def get_loss(loss: LossSpec) -> EncryptedLoss:
    """A loss by name (default hyper-parameters) or the loss itself."""
    if isinstance(loss, EncryptedLoss):
        return loss
    if loss not in _BY_NAME:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    return _BY_NAME[loss]()


def loss_from_torch(module: nn.Module) -> EncryptedLoss:
    """The encrypted twin of a torch loss module (mean reduction, no ignored index)."""
    if getattr(module, "reduction", "mean") != "mean":
        raise ValueError("only reduction='mean' is supported")
    if isinstance(module, nn.CrossEntropyLoss):
        if module.ignore_index >= 0:
            raise ValueError("ignore_index is not supported (it is a decision on the label)")
        return CrossEntropy(module.weight, module.label_smoothing)
    if isinstance(module, nn.MSELoss):
        return MSE()
    if isinstance(module, nn.L1Loss):
        return L1()
    if isinstance(module, nn.HuberLoss):
        return Huber(module.delta)
    if isinstance(module, nn.SmoothL1Loss):
        return SmoothL1(module.beta)
    if isinstance(module, nn.BCEWithLogitsLoss):
        return BCEWithLogits(module.weight, module.pos_weight)
    raise ValueError(f"{type(module).__name__} has no encrypted twin; supported: {LOSSES}")


def loss_gradient(
    loss: LossSpec, outputs: EncryptedTensor, targets: EncryptedTensor
) -> EncryptedTensor:
    """``dL/d outputs`` in the algebra for the batch-mean loss, as torch defines it."""
    return get_loss(loss).gradient(outputs, targets)


def plain_loss(loss: LossSpec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torch's own loss (cross-entropy on class indices)."""
    return get_loss(loss).plain(outputs, targets)
