"""The trainer for encrypted models, with its plaintext twin.

Everything here receives ciphertexts and never a key. Loss gradients are injected
(``Z.backward(dL/dZ)``, see :mod:`federation.nn.losses`) so the trainer needs no encrypted
logarithm. The plaintext trainer uses torch's own losses and optimisers with the same batch
order, which is what the central property (decrypt(encrypted training) == plaintext training)
is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from federation.more.tensor import EncryptedTensor, join_fingerprints
from federation.nn.convert import model_fingerprint, set_model_fingerprint
from federation.nn.losses import LossSpec, get_loss, loss_gradient, plain_loss
from federation.nn.optim import EncryptedOptimizer, EncryptedSGD

# Re-exported: callers import the trainer's optimiser and losses from here.
__all__ = [
    "EncryptedSGD",
    "EpochReport",
    "TrainingDivergedError",
    "batch_order",
    "loss_gradient",
    "plain_loss",
    "predict_encrypted",
    "train_encrypted",
    "train_plain",
]


class TrainingDivergedError(RuntimeError):
    """A loss gradient became non-finite; the model holds the last finite parameters.

    A site (which holds the key) can then tell which layer and channel diverged with
    :func:`federation.more.health.diagnose`.
    """

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(
            f"encrypted training diverged at epoch {epoch}, step {step}: the loss gradient is "
            "not finite (check the shadow channel with the key; see the shadow-value policies)"
        )
        self.epoch, self.step = epoch, step


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
    loss: LossSpec,
    optimizer: EncryptedOptimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    callback: EncryptedCallback | None = None,
    step_hook: Callable[[int, int], None] | None = None,
    scheduler: LRScheduler | None = None,
) -> list[EpochReport]:
    """Train an encrypted twin on encrypted features and (one-hot or regression) targets.

    ``callback(epoch, model)`` runs after each epoch, ``step_hook(epoch, step)`` after each
    optimiser step (a site uses it to re-encrypt its model, see ``federation.refresh``), and
    ``scheduler.step()`` (a torch LR scheduler over ``optimizer``) after each epoch.
    Raises :class:`TrainingDivergedError` before applying a non-finite update.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} targets")
    criterion = get_loss(loss)
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
                grad = criterion.gradient(out.detach(), y[idx])
            if not grad.all_finite():
                raise TrainingDivergedError(epoch, step)
            optimizer.zero_grad()
            out.backward(grad)
            optimizer.step()
            steps += 1
            if step_hook is not None:
                step_hook(epoch, step)
        if scheduler is not None:
            scheduler.step()
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


def train_plain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: LossSpec,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    callback: Callable[[int, nn.Module], None] | None = None,
    scheduler: LRScheduler | None = None,
) -> list[EpochReport]:
    """The plaintext twin of :func:`train_encrypted` (torch's losses and optimisers)."""
    criterion = get_loss(loss)
    reports = []
    model.train()
    for epoch in range(epochs):
        start, steps = time.perf_counter(), 0
        for idx in batch_order(len(x), batch_size, seed, epoch):
            optimizer.zero_grad()
            criterion.plain(model(x[idx]), y[idx]).backward()
            optimizer.step()
            steps += 1
        if scheduler is not None:
            scheduler.step()
        reports.append(EpochReport(epoch, steps, time.perf_counter() - start))
        if callback is not None:
            callback(epoch, model)
    return reports
