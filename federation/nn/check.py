"""Measure a twin against torch: one forward/backward, or a whole training run (site side).

The central property (design note, section 4) for any layer, module, loss and optimiser:
run the same computation in plaintext with torch and on ciphertexts, decrypt, and report
the largest deviations. This needs the key, so only a site (or a test) calls it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from federation.more.cipher import FeatureRange, decrypt, encrypt
from federation.more.keys import MoreKey
from federation.nn.convert import (
    encrypted_buffers,
    encrypted_gradients,
    plain_state_keys,
    to_encrypted,
    to_plain,
)
from federation.nn.losses import LossSpec
from federation.nn.session import (
    EncryptedSession,
    PlainSession,
    SessionConfig,
    encrypt_examples,
    predict_encrypted,
    target_shadow,
)

# Acceptance bounds of the central property (design note, section 4).
FLOAT64_ABS_TOL = 1e-9
FLOAT32_REL_TOL = 1e-4


@dataclass(frozen=True)
class Deviation:
    """Largest absolute difference, and that over the largest plaintext magnitude."""

    abs: float
    rel: float

    @classmethod
    def of(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Deviation:
        # Integer counters (num_batches_tracked) are not magnitudes: they would set the scale.
        pairs = [(a, b) for a, b in pairs if b.numel() and b.is_floating_point()]
        if not pairs:
            return cls(0.0, 0.0)
        diff = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
        scale = max(float(b.double().abs().max()) for _, b in pairs)
        return cls(diff, diff / max(scale, 1e-30))

    @classmethod
    def between(
        cls, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
    ) -> Deviation:
        """Of two state dicts (or any named tensors) with the same names; ``want`` scales."""
        return cls.of(_paired(got, want))

    def within(self, dtype: torch.dtype) -> bool:
        """The design's bound: absolute in float64, relative in float32."""
        return (
            self.abs <= FLOAT64_ABS_TOL if dtype == torch.float64 else self.rel <= FLOAT32_REL_TOL
        )


def _paired(
    decrypted: Mapping[str, torch.Tensor], plain: Mapping[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if set(decrypted) != set(plain):
        raise ValueError(f"keys differ: {sorted(set(decrypted) ^ set(plain))}")
    return [(decrypted[k], plain[k]) for k in plain]


def _feature_range(x: torch.Tensor, given: tuple[float, float] | None) -> FeatureRange:
    lo, hi = given if given is not None else (float(x.detach().min()), float(x.detach().max()))
    return FeatureRange(lo, hi)


@dataclass(frozen=True)
class StepComparison:
    """One forward and backward pass: outputs, input gradient, parameter gradients, buffers."""

    outputs: Deviation
    input_grad: Deviation
    param_grads: Deviation
    buffers: Deviation

    def within(self, dtype: torch.dtype) -> bool:
        parts = (self.outputs, self.input_grad, self.param_grads, self.buffers)
        return all(d.within(dtype) for d in parts)


def compare_step(
    module: nn.Module,
    x: torch.Tensor,
    key: MoreKey,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    train: bool = True,
) -> StepComparison:
    """Run ``module`` and its twin (parameters encrypted under ``key``) on ``x``.

    Back-propagates the same random output gradient through both, with the global RNG seeded
    alike (dropout masks). Compares outputs, the input gradient, every parameter gradient and
    the buffers afterwards (batch-norm running statistics).
    """
    plain = copy.deepcopy(module).to(dtype).train(train)
    twin = to_encrypted(plain, key, dtype=dtype, seed=seed).train(train)
    x = x.detach().to(dtype).clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed)
    ex = encrypt(x.detach(), key, _feature_range(x, None), generator=gen).requires_grad_()
    torch.manual_seed(seed)
    out = plain(x)
    torch.manual_seed(seed)
    eout = twin(ex)
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    out.backward(g)
    eout.backward(encrypt(g, key, generator=gen))
    grads = {k: decrypt(v, key) for k, v in encrypted_gradients(twin).items()}
    plain_grads = {k: p.grad for k, p in plain.named_parameters() if p.grad is not None}
    buffers = {k: decrypt(v, key) for k, v in encrypted_buffers(twin).items()}
    buffers.update({k: twin.get_buffer(k) for k in plain_state_keys(twin)})
    return StepComparison(
        outputs=Deviation.of([(decrypt(eout, key), out.detach())]),
        input_grad=Deviation.of([(decrypt(ex.grad, key), x.grad)]),
        param_grads=Deviation.of(_paired(grads, plain_grads)),
        buffers=Deviation.of(_paired(buffers, dict(plain.named_buffers()))),
    )


@dataclass(frozen=True)
class TrainingComparison:
    """After training: parameters and buffers, and encrypted vs plaintext inference."""

    dtype: torch.dtype
    state: Deviation
    outputs: Deviation

    @property
    def passed(self) -> bool:
        return self.state.within(self.dtype) and self.outputs.within(self.dtype)


def compare_training(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    key: MoreKey,
    loss: LossSpec,
    config: SessionConfig,
    num_classes: int | None = None,
    feature_range: tuple[float, float] | None = None,
    target_range: tuple[float, float] | None = None,
    x_eval: torch.Tensor | None = None,
    scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
) -> TrainingComparison:
    """Train ``model`` with torch and its key-free twin on ciphertexts, then compare.

    Both sessions run ``config`` (the encrypted one refreshes with ``key`` every
    ``config.refresh_every`` steps, as a site does); ``scheduler(opt)`` (e.g.
    ``lambda o: StepLR(o, 1)``) is built for both and stepped after each epoch. The global
    RNG is seeded alike before both runs (dropout masks agree). Inference is compared on
    ``x_eval`` (default: ``x``).
    """
    dtype, seed = config.dtype, config.seed
    plain = copy.deepcopy(model).to(dtype)
    twin = to_encrypted(plain, None, dtype=dtype)
    x = x.to(dtype)
    x_eval = x if x_eval is None else x_eval.to(dtype)
    torch.manual_seed(seed)
    PlainSession(plain, x, y, loss=loss, config=config, scheduler=scheduler).train()
    features = _feature_range(x, feature_range)
    shadow = target_shadow(y, loss, num_classes=num_classes, target_range=target_range)
    ex, ey = encrypt_examples(
        x, y, key, features=features, target=shadow, dtype=dtype, seed=seed + 1
    )
    torch.manual_seed(seed)
    EncryptedSession(twin, ex, ey, loss=loss, config=config, key=key, scheduler=scheduler).train()
    state = Deviation.between(to_plain(twin, key).state_dict(), plain.state_dict())
    plain.eval()
    with torch.no_grad():
        out_plain = plain(x_eval)
    out_enc = decrypt(predict_encrypted(twin, encrypt(x_eval, key, features, seed=seed + 3)), key)
    return TrainingComparison(dtype, state, Deviation.of([(out_enc, out_plain)]))
