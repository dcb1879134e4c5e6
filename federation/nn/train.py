"""Losses, SGD and the trainer for encrypted models, with their plaintext twins.

Everything here receives ciphertexts and never a key. Loss gradients are injected
(``Z.backward(dL/dZ)``) so the trainer needs no encrypted logarithm. The plaintext trainer
uses torch's own losses and ``torch.optim.SGD`` with the same batch order, which is what the
central property (decrypt(encrypted training) == plaintext training) is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from federation.more.tensor import EncryptedTensor, join_fingerprints
from federation.nn.convert import (
    encrypted_gradients,
    encrypted_parameters,
    model_fingerprint,
    set_model_fingerprint,
)

LossName = Literal["cross_entropy", "mse"]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")


class TrainingDivergedError(RuntimeError):
    """A loss gradient became non-finite; the model holds the last finite parameters.

    A site (which holds the key) can then tell which channel diverged with
    :func:`federation.more.health.check_model`.
    """

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(
            f"encrypted training diverged at epoch {epoch}, step {step}: the loss gradient is "
            "not finite (check the shadow channel with the key; see the shadow-value policies)"
        )
        self.epoch, self.step = epoch, step


def loss_gradient(name: str, outputs: EncryptedTensor, targets: EncryptedTensor) -> EncryptedTensor:
    """``dL/d outputs`` in the algebra for the batch-mean loss, as torch defines it.

    cross_entropy: ``(softmax(Z) - Y) / B`` with one-hot targets; mse: ``2 (Z - Y) / numel``.
    """
    if outputs.shape != targets.shape:
        raise ValueError(
            f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ"
        )
    if name == "cross_entropy":
        rows = outputs.numel() // outputs.shape[-1]
        return (outputs.softmax(dim=-1) - targets) / float(rows)
    if name == "mse":
        return (outputs - targets) * (2.0 / outputs.numel())
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


class EncryptedSGD:
    """SGD with momentum and weight decay in the algebra, step for step as ``torch.optim.SGD``.

    Only linear operations on ciphertexts: both channels follow the same rule. (Adam-style
    entry-wise square roots would leave the algebra, so they are not offered.)
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr must be positive; momentum and weight_decay non-negative")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and zero dampening")
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.dampening, self.nesterov = dampening, nesterov
        self._buffers: dict[str, EncryptedTensor] = {}

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def momentum_buffers(self) -> list[EncryptedTensor]:
        """The optimiser state (ciphertexts of the momentum), e.g. to account memory."""
        return list(self._buffers.values())

    @torch.no_grad()
    def step(self) -> None:
        grads = encrypted_gradients(self.model)
        for name, p in encrypted_parameters(self.model).items():
            g = grads.get(name)
            if g is None:
                continue
            if self.weight_decay:
                g = g + p * self.weight_decay
            if self.momentum:
                buf = self._buffers.get(name)
                if buf is None:
                    buf = self._buffers[name] = g.clone()
                else:
                    buf.mul_(self.momentum).add_(g, alpha=1.0 - self.dampening)
                g = g + buf * self.momentum if self.nesterov else buf
            p.add_(g, alpha=-self.lr)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The mini-batches of one epoch: a seeded permutation, identical for both trainers."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    steps: int
    seconds: float


EncryptedCallback = Callable[[int, nn.Module], None]


def train_encrypted(
    model: nn.Module,
    x: EncryptedTensor,
    y: EncryptedTensor,
    *,
    loss: str,
    optimizer: EncryptedSGD,
    epochs: int,
    batch_size: int,
    seed: int,
    callback: EncryptedCallback | None = None,
    step_hook: Callable[[int, int], None] | None = None,
) -> list[EpochReport]:
    """Train an encrypted twin on encrypted features and (one-hot or regression) targets.

    ``callback(epoch, model)`` runs after each epoch, ``step_hook(epoch, step)`` after each
    optimiser step (a site uses it to re-encrypt its model, see ``federation.refresh``).
    Raises :class:`TrainingDivergedError` before applying a non-finite update.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} targets")
    fp = join_fingerprints(
        join_fingerprints(x.fingerprint, y.fingerprint), model_fingerprint(model)
    )
    set_model_fingerprint(model, fp)
    reports = []
    model.train()
    for epoch in range(epochs):
        start, steps = time.perf_counter(), 0
        for step, idx in enumerate(batch_order(len(x), batch_size, seed, epoch)):
            out = model(x[idx])
            with torch.no_grad():
                grad = loss_gradient(loss, out.detach(), y[idx])
            if not grad.all_finite():
                raise TrainingDivergedError(epoch, step)
            optimizer.zero_grad()
            out.backward(grad)
            optimizer.step()
            steps += 1
            if step_hook is not None:
                step_hook(epoch, step)
        reports.append(EpochReport(epoch, steps, time.perf_counter() - start))
        if callback is not None:
            callback(epoch, model)
    return reports


@torch.no_grad()
def predict_encrypted(
    model: nn.Module, x: EncryptedTensor, batch_size: int = 512
) -> EncryptedTensor:
    """Encrypted inference: encrypted inputs in, encrypted outputs out."""
    model.eval()
    return EncryptedTensor.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def plain_loss(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torch's own loss: cross-entropy on class indices, or mean squared error."""
    if name == "cross_entropy":
        return F.cross_entropy(outputs, targets)
    if name == "mse":
        return F.mse_loss(outputs, targets)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def train_plain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> list[EpochReport]:
    """The plaintext twin of :func:`train_encrypted` (torch losses, ``torch.optim.SGD``)."""
    reports = []
    model.train()
    for epoch in range(epochs):
        start, steps = time.perf_counter(), 0
        for idx in batch_order(len(x), batch_size, seed, epoch):
            optimizer.zero_grad()
            plain_loss(loss, model(x[idx]), y[idx]).backward()
            optimizer.step()
            steps += 1
        reports.append(EpochReport(epoch, steps, time.perf_counter() - start))
        if callback is not None:
            callback(epoch, model)
    return reports
