"""Section 3 of the suite: a logistic regression trained on encrypted data with MORE and with
CKKS, following the TenSEAL tutorial, against a plaintext reference."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from federation.more import FeatureRange, decrypt, encrypt, generate_key
from federation.tools.bench.sizes import TENSEAL_PIP, SuiteSizes

SIGMOID3 = (0.5, 0.197, 0.0, -0.004)
"""The TenSEAL tutorial's degree-3 sigmoid approximation (increasing powers), good on [-5, 5]."""


@dataclass(frozen=True)
class LogRegRow:
    scheme: str
    encrypt_s: float | None = None  # encrypting the training set, once
    epoch_s: float | None = None
    accuracy: float | None = None
    max_weight_error: float | None = None  # against the plaintext run
    note: str = ""


@dataclass(frozen=True)
class BinaryDigits:
    """3 against 8, average-pooled and centred on the training mean; ``source`` says where
    the digits came from."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str


def binary_digits(sizes: SuiteSizes, seed: int = 0) -> BinaryDigits:
    """MNIST 3s and 8s where the files are at hand (``$MORE_FL_MNIST_DIR``), else two
    synthetic Gaussian classes of the same dimension, so the suite never needs a download."""
    from federation.tasks.mnist import MnistDataError, load_task_data, resolve_data_dir

    need = sizes.logreg_train + sizes.logreg_test
    try:
        data = load_task_data(split="carve", n_train=min(9000, 6 * need), n_test=1, seed=seed)
    except MnistDataError:
        gen = torch.Generator().manual_seed(seed)
        y = (torch.arange(need) % 2).double()
        dims = sizes.logreg_side**2
        centre = torch.randn(dims, generator=gen, dtype=torch.float64) * 0.1
        x = torch.randn(need, dims, generator=gen, dtype=torch.float64) * 0.3
        x += (2 * y[:, None] - 1) * centre
        source = f"synthetic Gaussian classes (no usable MNIST files in {resolve_data_dir()})"
    else:
        keep = (data.y_train == 3) | (data.y_train == 8)
        images = data.x_train[keep][:need].double()
        y = (data.y_train[keep][:need] == 8).double()
        x = F.adaptive_avg_pool2d(images, sizes.logreg_side).flatten(1)
        source = f"MNIST 3 vs 8, {sizes.logreg_side}x{sizes.logreg_side} pooled"
    n = sizes.logreg_train
    x = x - x[:n].mean(dim=0)
    return BinaryDigits(x[:n], y[:n], x[n:], y[n:], source)


def _sigmoid3(z: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(z, SIGMOID3[-1])
    for c in reversed(SIGMOID3[:-1]):
        out = out * z + c
    return out


def _accuracy(w: torch.Tensor, b: torch.Tensor, data: BinaryDigits) -> float:
    predicted = (_sigmoid3(data.x_test @ w + b) > 0.5).double()
    return float((predicted == data.y_test).double().mean())


def _initial_weights(dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(dims, 1).double()
    return layer.weight.detach()[0].clone(), layer.bias.detach().clone()


def logreg_plain(data: BinaryDigits, epochs: int, seed: int) -> tuple[LogRegRow, torch.Tensor]:
    """The tutorial's update in float64: ``w -= mean(x (s(z) - y)) + 0.05 w``, ``b -= mean``."""
    w, b = _initial_weights(data.x_train.shape[1], seed)
    start = time.perf_counter()
    for _ in range(epochs):
        delta = _sigmoid3(data.x_train @ w + b) - data.y_train
        w = w - (data.x_train * delta[:, None]).mean(dim=0) - 0.05 * w
        b = b - delta.mean()
    seconds = (time.perf_counter() - start) / epochs
    return LogRegRow("plaintext", 0.0, seconds, _accuracy(w, b, data), 0.0), w


def logreg_more(data: BinaryDigits, epochs: int, seed: int, reference: torch.Tensor) -> LogRegRow:
    """The same update in the MORE algebra; weights stay encrypted for the whole run (no
    multiplicative depth to refresh)."""
    key = generate_key(seed)
    x, y = data.x_train, data.y_train
    start = time.perf_counter()
    ex = encrypt(x, key, FeatureRange(float(x.min()), float(x.max())), seed=seed)
    ey = encrypt(y[:, None], key, FeatureRange(0.0, 1.0), seed=seed + 1)
    encrypt_s = time.perf_counter() - start
    w0, b0 = _initial_weights(x.shape[1], seed)
    ew, eb = encrypt(w0[:, None], key, seed=seed + 2), encrypt(b0, key, seed=seed + 3)
    ext = ex.transpose(0, 1)
    start = time.perf_counter()
    for _ in range(epochs):
        delta = (ex @ ew + eb).polynomial(SIGMOID3) - ey
        ew = ew - (ext @ delta) * (1.0 / len(x)) - ew * 0.05
        eb = eb - delta.mean(dim=0)
    seconds = (time.perf_counter() - start) / epochs
    w, b = decrypt(ew, key)[:, 0], decrypt(eb, key)
    return LogRegRow(
        "MORE", encrypt_s, seconds, _accuracy(w, b, data), float((w - reference).abs().max())
    )


def logreg_ckks(
    ts: ModuleType, data: BinaryDigits, epochs: int, seed: int, reference: torch.Tensor
) -> LogRegRow:
    """TenSEAL's tutorial, step for step: one CKKS vector per example, weights encrypted at
    the start of every epoch and decrypted after it (the data owner refreshes them, since
    each epoch uses up the multiplicative depth)."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, -1, [40, 21, 21, 21, 21, 21, 21, 40])
    context.global_scale = 2**21
    context.generate_galois_keys()
    x, y = data.x_train, data.y_train
    start = time.perf_counter()
    ex = [ts.ckks_vector(context, row.tolist()) for row in x]
    ey = [ts.ckks_vector(context, [float(v)]) for v in y]
    encrypt_s = time.perf_counter() - start
    w0, b0 = _initial_weights(x.shape[1], seed)
    w, b = w0.tolist(), b0.tolist()
    start = time.perf_counter()
    for _ in range(epochs):
        ew, eb = ts.ckks_vector(context, w), ts.ckks_vector(context, b)
        grad_w = grad_b = None
        for enc_x, enc_y in zip(ex, ey, strict=True):
            delta = (enc_x.dot(ew) + eb).polyval(list(SIGMOID3)) - enc_y
            if grad_w is None:
                grad_w, grad_b = enc_x * delta, delta
            else:
                grad_w += enc_x * delta
                grad_b += delta
        ew = ew - grad_w * (1.0 / len(x)) - ew * 0.05
        eb = eb - grad_b * (1.0 / len(x))
        w, b = ew.decrypt(), eb.decrypt()
    seconds = (time.perf_counter() - start) / epochs
    wt, bt = torch.tensor(w, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return LogRegRow(
        "CKKS (TenSEAL tutorial)", encrypt_s, seconds, _accuracy(wt, bt, data),
        float((wt - reference).abs().max()),
    )  # fmt: skip


def bench_logreg(
    sizes: SuiteSizes, ts: ModuleType | None, seed: int = 0
) -> tuple[list[LogRegRow], str]:
    """Plaintext, MORE and CKKS runs of one logistic regression; also describes the data."""
    data = binary_digits(sizes, seed)
    plain, reference = logreg_plain(data, sizes.logreg_epochs, seed)
    rows = [plain, logreg_more(data, sizes.logreg_epochs, seed, reference)]
    if ts is None:
        rows.append(LogRegRow("CKKS", note=f"TenSEAL not installed ({TENSEAL_PIP})"))
    else:
        rows.append(logreg_ckks(ts, data, sizes.logreg_epochs, seed, reference))
    described = f"{data.source}: {len(data.y_train)} training and {len(data.y_test)} test examples"
    return rows, described
