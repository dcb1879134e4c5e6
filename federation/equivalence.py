"""The central property, as code: decrypt(encrypted training) == plaintext torch training.

Both runs start from the same weights, see the same batches in the same order and use the
same hyper-parameters; the plaintext run uses torch's losses and ``torch.optim.SGD``.
``more-fl verify``, ``more-fl train`` and the tests all measure through this one function.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from federation.more.cipher import FeatureRange, RegressionRange, ValidLabel, decrypt, encrypt
from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor
from federation.nn.convert import to_encrypted, to_plain
from federation.nn.train import EncryptedSGD, predict_encrypted, train_encrypted, train_plain
from federation.refresh import refresher

# Acceptance bounds of the central property (design note, section 4).
FLOAT64_ABS_TOL = 1e-9
FLOAT32_REL_TOL = 1e-4


@dataclass(frozen=True)
class Comparison:
    """Largest deviations between the decrypted encrypted run and the plaintext run."""

    dtype: torch.dtype
    param_abs: float
    param_rel: float
    output_abs: float
    output_rel: float
    seconds_plain: float
    seconds_encrypted: float

    @property
    def max_abs(self) -> float:
        return max(self.param_abs, self.output_abs)

    @property
    def max_rel(self) -> float:
        return max(self.param_rel, self.output_rel)

    @property
    def passed(self) -> bool:
        if self.dtype == torch.float64:
            return self.max_abs <= FLOAT64_ABS_TOL
        return self.max_rel <= FLOAT32_REL_TOL


def _deviation(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Largest absolute difference, and that divided by the largest plaintext magnitude."""
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
    scale = max(float(b.double().abs().max()) for _, b in pairs)
    return diff, diff / max(scale, 1e-30)


def encrypt_targets(
    y: torch.Tensor,
    key: MoreKey,
    *,
    loss: str,
    dtype: torch.dtype,
    num_classes: int | None = None,
    target_range: tuple[float, float] | None = None,
    seed: int | None = None,
) -> EncryptedTensor:
    """Targets under the design's shadow rule: valid one-hot labels, or the target range."""
    if loss == "cross_entropy":
        if num_classes is None:
            raise ValueError("cross-entropy targets need num_classes")
        onehot = F.one_hot(y.long(), num_classes).to(dtype)
        return encrypt(onehot, key, ValidLabel(num_classes), seed=seed)
    lo, hi = target_range if target_range is not None else (float(y.min()), float(y.max()))
    return encrypt(y.to(dtype), key, RegressionRange(lo, hi), seed=seed)


def compare_training(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    key: MoreKey,
    loss: str,
    dtype: torch.dtype,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_classes: int | None = None,
    feature_range: tuple[float, float] | None = None,
    target_range: tuple[float, float] | None = None,
    x_eval: torch.Tensor | None = None,
    refresh_every: int = 10,
) -> Comparison:
    """Train ``model`` plaintext and encrypted (key-free initial encoding) and compare.

    Returns parameter deviations and the deviation of encrypted inference on ``x_eval``
    (default: ``x``) from plaintext inference. The site side re-encrypts the model every
    ``refresh_every`` steps (0: never), as sites do.
    """
    plain = copy.deepcopy(model).to(dtype)
    twin = to_encrypted(plain, None, dtype=dtype)
    x = x.to(dtype)
    x_eval = x if x_eval is None else x_eval.to(dtype)
    y_plain = y.long() if loss == "cross_entropy" else y.to(dtype)

    start = time.perf_counter()
    opt = torch.optim.SGD(plain.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    train_plain(
        plain, x, y_plain, loss=loss, optimizer=opt, epochs=epochs, batch_size=batch_size, seed=seed
    )
    seconds_plain = time.perf_counter() - start

    lo, hi = feature_range if feature_range is not None else (float(x.min()), float(x.max()))
    ex = encrypt(x, key, FeatureRange(lo, hi), seed=seed + 1)
    ey = encrypt_targets(
        y,
        key,
        loss=loss,
        dtype=dtype,
        num_classes=num_classes,
        target_range=target_range,
        seed=seed + 2,
    )
    start = time.perf_counter()
    eopt = EncryptedSGD(twin, lr=lr, momentum=momentum, weight_decay=weight_decay)
    train_encrypted(
        twin,
        ex,
        ey,
        loss=loss,
        optimizer=eopt,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        step_hook=refresher(twin, eopt, key, refresh_every),
    )
    seconds_encrypted = time.perf_counter() - start

    decrypted = to_plain(twin, key).state_dict()
    param_abs, param_rel = _deviation([(decrypted[k], v) for k, v in plain.state_dict().items()])
    plain.eval()
    with torch.no_grad():
        out_plain = plain(x_eval)
    ex_eval = encrypt(x_eval, key, FeatureRange(lo, hi), seed=seed + 3)
    out_enc = decrypt(predict_encrypted(twin, ex_eval), key)
    out_abs, out_rel = _deviation([(out_enc, out_plain)])
    return Comparison(
        dtype=dtype,
        param_abs=param_abs,
        param_rel=param_rel,
        output_abs=out_abs,
        output_rel=out_rel,
        seconds_plain=seconds_plain,
        seconds_encrypted=seconds_encrypted,
    )
