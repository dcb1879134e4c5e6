"""A training session: data, model, optimiser and the site's refresh, with the step written once.

A :class:`PlainSession` trains a torch model with torch's losses and optimisers; an
:class:`EncryptedSession` trains its encrypted twin on ciphertexts and injects the loss
gradient (``Z.backward(dL/dZ)``, see :mod:`federation.nn.losses`), so it needs no encrypted
logarithm. Both take one :class:`SessionConfig`, draw the same seeded batches
(:func:`batch_order`) and share ``step``, ``epoch`` and ``train``: that is what the central
property (decrypt(encrypted training) == plaintext training) is measured on, and what the
benches time. The step never sees a key; an encrypted session given the site's key uses it
only to re-encrypt the model and optimiser state (:mod:`federation.nn.refresh`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from federation.more.cipher import FeatureRange, RegressionRange, ShadowPolicy, ValidLabel, encrypt
from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor, join_fingerprints
from federation.nn.convert import model_fingerprint, set_model_fingerprint
from federation.nn.losses import LossSpec, get_loss
from federation.nn.optim import OPTIMIZERS, EncryptedOptimizer, load_optimizer_arrays
from federation.nn.refresh import StepHook, refresh_in_place, refresher


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
    """The mini-batches of one epoch: a seeded permutation, identical for both sessions."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class SessionConfig:
    """How a session trains, in one value both sessions of a comparison share.

    ``optimizer`` names a pair of :data:`~federation.nn.optim.OPTIMIZERS` and ``hyper`` holds
    torch's keywords for it (``lr``, ``momentum``, ``betas``, ...). ``refresh_every``: the
    site re-encrypts its model every so many steps (0: never; needs the key). ``seed`` sets
    the batch order.
    """

    optimizer: str = "sgd"
    hyper: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    epochs: int = 1
    refresh_every: int = 0
    dtype: torch.dtype = torch.float64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimiser {self.optimizer!r}; one of {sorted(OPTIMIZERS)}")
        object.__setattr__(self, "hyper", MappingProxyType(dict(self.hyper)))

    def build_optimizer(self, model: nn.Module, *, encrypted: bool) -> torch.optim.Optimizer:
        """torch's optimiser over a plain model, its encrypted twin over an encrypted one."""
        plain_cls, encrypted_cls = OPTIMIZERS[self.optimizer]
        if encrypted:
            return encrypted_cls(model, **self.hyper)
        return plain_cls(model.parameters(), **self.hyper)


def target_shadow(
    y: torch.Tensor,
    loss: LossSpec,
    *,
    num_classes: int | None = None,
    target_range: tuple[float, float] | None = None,
) -> ShadowPolicy:
    """The design's shadow rule for targets: a random valid label per row for a categorical
    loss (a uniform shadow on one-hot rows drives softmax to NaN), else uniform over the
    target range (default: the targets' own)."""
    if get_loss(loss).categorical:
        return ValidLabel(num_classes if num_classes is not None else int(y.max()) + 1)
    lo, hi = target_range if target_range is not None else (float(y.min()), float(y.max()))
    return RegressionRange(lo, hi)


def encode_targets(y: torch.Tensor, policy: ShadowPolicy, dtype: torch.dtype) -> torch.Tensor:
    """Targets as they are encrypted: one-hot rows under a valid-label shadow, else values."""
    if isinstance(policy, ValidLabel):
        return F.one_hot(y.long(), policy.num_classes).to(dtype)
    return y.to(dtype)


def encrypt_examples(
    x: torch.Tensor,
    y: torch.Tensor,
    key: MoreKey,
    *,
    features: FeatureRange,
    target: ShadowPolicy,
    dtype: torch.dtype,
    seed: int,
) -> tuple[EncryptedTensor, EncryptedTensor]:
    """Features and targets (encoded by :func:`encode_targets`) under ``key``, their shadows
    drawn from ``seed`` and ``seed + 1``: what a comparison or a bench trains on."""
    ex = encrypt(x.to(dtype), key, features, seed=seed)
    return ex, encrypt(encode_targets(y, target, dtype), key, target, seed=seed + 1)


def plain_targets(y: torch.Tensor, loss: LossSpec, dtype: torch.dtype) -> torch.Tensor:
    """Targets as torch's loss takes them: class indices, or values in the run's dtype."""
    return y.long() if get_loss(loss).categorical else y.to(dtype)


Batch = tuple[Any, Any]
"""A ready ``(inputs, targets)`` pair (tensors, or ciphertexts for an encrypted session)."""

EpochCallback = Callable[[int, nn.Module], None]


class _Session:
    """Both sessions: the data, the model, its optimiser, the seeded batches and the step."""

    encrypted: ClassVar[bool]

    def __init__(
        self,
        model: nn.Module,
        x: Any,
        y: Any,
        *,
        loss: LossSpec,
        config: SessionConfig,
        optimizer_state: Mapping[str, torch.Tensor] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
        callback: EpochCallback | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} targets")
        self.criterion = get_loss(loss)
        self.model, self.config, self.callback = model, config, callback
        self.x, self.y = self._data(x, y)
        self.optimizer = config.build_optimizer(model, encrypted=self.encrypted)
        if optimizer_state is not None:
            load_optimizer_arrays(self.optimizer, model, dict(optimizer_state))
        self.scheduler = None if scheduler is None else scheduler(self.optimizer)
        self.after_step: StepHook | None = None
        self.position = (0, 0)  # (epoch, step) running now: where a divergence is reported

    def _data(self, x: Any, y: Any) -> Batch:
        return x, y

    def _backward_root(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        """What to back-propagate from, and with which gradient."""
        raise NotImplementedError

    def _held(self, inputs: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """Row indices of each step of ``epoch``."""
        return batch_order(len(self.x), self.config.batch_size, self.config.seed, epoch)

    def step(self, batch: torch.Tensor | Batch) -> None:
        """One optimiser step on ``batch``: row indices of the session's data, or a ready
        ``(inputs, targets)`` pair (a bench's pre-made batch)."""
        x, y = batch if isinstance(batch, tuple) else (self.x[batch], self.y[batch])
        root, gradient = self._backward_root(self.model(x), y)
        self.optimizer.zero_grad()
        root.backward(gradient)
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(*self.position)

    def epoch(self, epoch: int) -> EpochReport:
        """One pass over the data in ``epoch``'s seeded order; then the LR scheduler's step
        and the epoch callback (after the report's time is taken)."""
        self.model.train()
        start, steps = time.perf_counter(), 0
        for step, idx in enumerate(self.batches(epoch)):
            self.position = (epoch, step)
            self.step(idx)
            steps += 1
        if self.scheduler is not None:
            self.scheduler.step()
        report = EpochReport(epoch, steps, time.perf_counter() - start)
        if self.callback is not None:
            self.callback(epoch, self.model)
        return report

    def train(self, epochs: int | None = None) -> list[EpochReport]:
        """Epochs ``0 .. epochs - 1`` (default: the config's)."""
        return [self.epoch(e) for e in range(self.config.epochs if epochs is None else epochs)]

    def held(self, inputs: Any) -> list[torch.Tensor]:
        """What a step keeps besides autograd's saved tensors: its inputs, the parameters,
        their gradients and the optimiser's state (the benches count their bytes)."""
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        return [*params, *grads, *self._held(inputs)]


class PlainSession(_Session):
    """Plaintext training with torch's losses and optimisers: the reference."""

    encrypted = False

    def _data(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        return x.to(self.config.dtype), plain_targets(y, self.criterion, self.config.dtype)

    def _backward_root(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[Any, Any]:
        return self.criterion.plain(outputs, targets), None

    def _held(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        state = self.optimizer.state.values()
        return [inputs, *(t for s in state for t in s.values() if isinstance(t, torch.Tensor))]


class EncryptedSession(_Session):
    """Training of an encrypted twin on encrypted features and (one-hot or value) targets.

    ``key`` (a site's): re-encrypts a loaded optimiser state, as the received model was, and
    the model and state every ``config.refresh_every`` steps. Raises
    :class:`TrainingDivergedError` before applying a non-finite update.
    """

    encrypted = True

    def __init__(
        self,
        model: nn.Module,
        x: EncryptedTensor,
        y: EncryptedTensor,
        *,
        loss: LossSpec,
        config: SessionConfig,
        key: MoreKey | None = None,
        optimizer_state: Mapping[str, torch.Tensor] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
        callback: EpochCallback | None = None,
    ) -> None:
        if key is None and config.refresh_every > 0:
            raise ValueError("refresh_every needs the site's key (0 trains without refreshing)")
        super().__init__(
            model,
            x,
            y,
            loss=loss,
            config=config,
            optimizer_state=optimizer_state,
            scheduler=scheduler,
            callback=callback,
        )
        assert isinstance(self.optimizer, EncryptedOptimizer)
        if key is not None:
            if optimizer_state is not None:
                refresh_in_place(self.optimizer.encrypted_state(), key)
            self.after_step = refresher(model, self.optimizer, key, config.refresh_every)

    def _data(self, x: EncryptedTensor, y: EncryptedTensor) -> Batch:
        fp = join_fingerprints(
            join_fingerprints(x.fingerprint, y.fingerprint), model_fingerprint(self.model)
        )
        set_model_fingerprint(self.model, fp)
        return x, y

    def _backward_root(self, outputs: EncryptedTensor, targets: EncryptedTensor) -> tuple[Any, Any]:
        with torch.no_grad():
            gradient = self.criterion.gradient(outputs.detach(), targets)
        if not gradient.all_finite():
            raise TrainingDivergedError(*self.position)
        return outputs, gradient

    def _held(self, inputs: EncryptedTensor) -> list[torch.Tensor]:
        assert isinstance(self.optimizer, EncryptedOptimizer)
        return [inputs.entries, *(b.entries for b in self.optimizer.encrypted_state())]


@torch.no_grad()
def predict_encrypted(
    model: nn.Module, x: EncryptedTensor, batch_size: int = 512
) -> EncryptedTensor:
    """Encrypted inference: encrypted inputs in, encrypted outputs out."""
    model.eval()
    return EncryptedTensor.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
