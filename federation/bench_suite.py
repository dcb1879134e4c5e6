"""``more-fl bench --suite full``: MORE against plaintext and against CKKS, side by side.

One run measures, on this machine and in one process (so the numbers compare):

1. a training epoch (a fixed number of batches) of every task model, plaintext against
   encrypted: time, memory held by a step, and their ratios;
2. one FedAvg round of 3 sites on the MNIST MLP update: bytes on the wire, encryption,
   aggregation and decryption time for plaintext, MORE, and CKKS with TenSEAL the way
   NVIDIA FLARE does it (each site encrypts its weighted flattened update, the server adds
   the ciphertexts and scales, the sites decrypt);
3. a logistic regression trained on encrypted data with MORE and with CKKS, following the
   TenSEAL tutorial (encrypted features, targets and weights, the degree-3 sigmoid
   approximation, one full-batch update per epoch), with a plaintext reference;
4. the encrypted/plaintext step ratio over layer width and batch size, against the 8
   multiply-adds a 2x2 ciphertext product costs per plaintext one;
5. section 1 again on a CUDA device, where one is available.

Results go to ``bench-suite.md`` and PNG plots in one folder, each file written atomically.
Without TenSEAL the CKKS rows say so instead of failing.
"""

from __future__ import annotations

import importlib
import io
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from torch import nn

from federation.aggregation import fedavg
from federation.atomic import atomic_write_bytes
from federation.bench import BENCH_SGD, held_bytes, step_holding
from federation.more import EncryptedTensor, FeatureRange, decrypt, encrypt, generate_key
from federation.nn.check import Deviation
from federation.nn.convert import to_encrypted
from federation.nn.session import (
    EncryptedSession,
    PlainSession,
    SessionConfig,
    encrypt_examples,
    target_shadow,
)
from federation.protocol import MODE_ENCRYPTED, MODE_PLAINTEXT
from federation.tasks import get_task

REPORT = "bench-suite.md"
TENSEAL_PIP = "tenseal==0.3.18"
"""The TenSEAL release this suite was written against (a cp311 manylinux wheel exists)."""

SIGMOID3 = (0.5, 0.197, 0.0, -0.004)
"""The TenSEAL tutorial's degree-3 sigmoid approximation (increasing powers), good on [-5, 5]."""

GEMM_BOUND = 8.0
"""Multiply-adds of a 2x2 ciphertext product per plaintext multiply-add."""

Print = Callable[[str], None]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The shipped experiments (section 6 runs a copy of ``wbc.yaml``)."""


@dataclass(frozen=True)
class SuiteSizes:
    """How much each section measures; ``QUICK`` is a smoke run, ``FULL`` the real one."""

    batches: int  # batches per training epoch (section 1)
    batch: int
    repeats: int  # epochs timed per model (median reported)
    angio_size: int  # angiography image side
    mlp_hidden: int  # hidden width of the MNIST MLP whose update is aggregated
    sites: int
    logreg_train: int  # logistic regression: training and test examples
    logreg_test: int
    logreg_epochs: int
    logreg_side: int  # digits average-pooled to side x side features
    widths: tuple[int, ...]  # section 4
    scale_batches: tuple[int, ...]
    scale_steps: int
    site_counts: tuple[int, ...] = ()  # section 6: simulated sites (a real Flower simulation)
    federated_rounds: int = 3


QUICK = SuiteSizes(
    batches=2, batch=8, repeats=1, angio_size=32, mlp_hidden=16, sites=3, logreg_train=8,
    logreg_test=32, logreg_epochs=1, logreg_side=7, widths=(16, 64), scale_batches=(4, 16),
    scale_steps=2,
)  # fmt: skip
FULL = SuiteSizes(
    batches=20, batch=64, repeats=3, angio_size=64, mlp_hidden=128, sites=3, logreg_train=200,
    logreg_test=400, logreg_epochs=2, logreg_side=14, widths=(32, 64, 128, 256, 512),
    scale_batches=(16, 64, 256), scale_steps=10, site_counts=(3, 30, 100, 300),
)  # fmt: skip


# --- 1. Training epochs ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model to train and the synthetic data that feeds it (no dataset needed to time it)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    loss: str  # "cross_entropy" (one-hot targets) or "mse"
    feature_range: tuple[float, float]


@dataclass(frozen=True)
class EpochRow:
    model: str
    device: str
    params: int
    batches: int
    batch: int
    plain_s: float
    encrypted_s: float
    plain_mib: float
    encrypted_mib: float

    @property
    def ratio(self) -> float:
        return self.encrypted_s / self.plain_s

    @property
    def memory_ratio(self) -> float:
        return self.encrypted_mib / self.plain_mib


def _task_model(
    task: str,
    arch: str,
    shape: tuple[int, ...],
    loss: str,
    feature_range: tuple[float, float] = (0.0, 1.0),
    **options: int,
) -> ModelSpec:
    module = get_task(task)
    return ModelSpec(
        f"{task} {arch}", lambda: module.build_model(arch, **options), shape, loss, feature_range
    )


def task_models(sizes: SuiteSizes) -> list[ModelSpec]:
    """Every built-in task model at its default options: the tanh originals and the
    ReLU / batch-norm / max-pool / residual models."""
    side = get_task("mnist").IMAGE_SIZE
    wbc = (len(get_task("wbc").INPUT_RANGES),)
    angio = sizes.angio_size
    return [
        _task_model("mnist", "mlp", (1, side, side), "cross_entropy"),
        _task_model("mnist", "cnn", (1, side, side), "cross_entropy"),
        _task_model("mnist", "relu-cnn", (1, side, side), "cross_entropy"),
        _task_model("wbc", "mlp", wbc, "mse", (-1.0, 1.0)),
        _task_model("wbc", "bn-mlp", wbc, "mse", (-1.0, 1.0)),
        _task_model("angio", "cnn", (1, angio, angio), "cross_entropy", image_size=angio),
        _task_model("angio", "resnet", (1, angio, angio), "cross_entropy", image_size=angio),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[..., object], device: torch.device, *args: object) -> float:
    _sync(device)
    start = time.perf_counter()
    step(*args)
    _sync(device)
    return time.perf_counter() - start


class _TrainingSteps:
    """A model and its encrypted twin, their sessions and pre-encrypted batches.

    The data is encrypted before any timing: a site encrypts its dataset once, not per
    epoch. float32, SGD with momentum, the task's loss on random data of the right shape.
    The twin starts from the key-free encoding of the same weights (as a federation does).
    """

    def __init__(
        self, spec: ModelSpec, *, batches: int, batch: int, device: torch.device, seed: int
    ) -> None:
        torch.manual_seed(seed)
        self.batches = batches
        model = spec.build().float()
        twin = to_encrypted(model, None, dtype=torch.float32)
        key = generate_key(seed)
        lo, hi = spec.feature_range
        xs = [lo + (hi - lo) * torch.rand(batch, *spec.input_shape) for _ in range(batches)]
        model.eval()  # batch norm refuses one example in training mode
        with torch.no_grad():
            outputs = int(model(xs[0][:1]).shape[-1])
        model.train()
        if spec.loss == "cross_entropy":
            ys = [torch.randint(outputs, (batch,)) for _ in range(batches)]
        else:
            ys = [torch.randn(batch, outputs).clamp(-3.0, 3.0) for _ in range(batches)]
        policy = target_shadow(ys[0], spec.loss, num_classes=outputs, target_range=(-3.0, 3.0))
        self.plain = [(x.to(device), y.to(device)) for x, y in zip(xs, ys, strict=True)]
        features = FeatureRange(lo, hi)
        self.encrypted: list[tuple[EncryptedTensor, EncryptedTensor]] = []
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            ex, ey = encrypt_examples(
                x, y, key, features=features, target=policy, dtype=torch.float32, seed=seed + 2 * i
            )
            self.encrypted.append((ex.to(device), ey.to(device)))
        model.to(device)
        twin.to(device)
        config = SessionConfig("sgd", BENCH_SGD, batch_size=batch, dtype=torch.float32)
        self.sessions = (
            PlainSession(model, *self.plain[0], loss=spec.loss, config=config),
            EncryptedSession(twin, *self.encrypted[0], loss=spec.loss, config=config),
        )
        self.params = sum(p.numel() for p in model.parameters())
        for i in range(2):  # warm-up: first calls allocate optimiser state and kernels
            self.plain_step(i)
            self.encrypted_step(i)

    def plain_step(self, i: int) -> list[torch.Tensor]:
        """One step on batch ``i``; returns the tensors it holds (for memory accounting)."""
        return step_holding(self.sessions[0], self.plain[i % self.batches])

    def encrypted_step(self, i: int) -> list[torch.Tensor]:
        return step_holding(self.sessions[1], self.encrypted[i % self.batches])


def bench_epoch(
    spec: ModelSpec,
    *,
    batches: int,
    batch: int,
    repeats: int,
    device: torch.device,
    seed: int = 0,
) -> EpochRow:
    """Median plaintext and encrypted epoch time, steps interleaved (plain, encrypted, plain,
    ...) so machine noise hits both alike, and the bytes one step holds (parameters,
    gradients, momentum, batch and every tensor autograd saves)."""
    steps = _TrainingSteps(spec, batches=batches, batch=batch, device=device, seed=seed)
    plain_bytes = held_bytes(lambda: steps.plain_step(0))
    enc_bytes = held_bytes(lambda: steps.encrypted_step(0))
    plain_t, enc_t = [0.0] * repeats, [0.0] * repeats
    for r in range(repeats):
        for i in range(batches):
            plain_t[r] += _timed(steps.plain_step, device, i)
            enc_t[r] += _timed(steps.encrypted_step, device, i)
    return EpochRow(
        spec.name,
        _device_name(device),
        steps.params,
        batches,
        batch,
        statistics.median(plain_t),
        statistics.median(enc_t),
        plain_bytes / 2**20,
        enc_bytes / 2**20,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s)"


# --- 2. One aggregation round ------------------------------------------------------------------


@dataclass(frozen=True)
class AggregationRow:
    """One FedAvg round: per-site upload and broadcast sizes, per-site encrypt and decrypt
    time, the aggregator's time, and the decrypted average's error against plaintext."""

    scheme: str
    up_bytes: int | None = None
    down_bytes: int | None = None
    encrypt_ms: float | None = None
    aggregate_ms: float | None = None
    decrypt_ms: float | None = None
    max_error: float | None = None
    note: str = ""


def _site_updates(sizes: SuiteSizes, seed: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """Each site's MNIST MLP update (float32) and its example count."""
    torch.manual_seed(seed)
    state = get_task("mnist").build_model("mlp", hidden=sizes.mlp_hidden).state_dict()
    rng = np.random.default_rng(seed)
    return [
        (
            {k: (v.numpy() + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in state.items()},
            int(n),
        )
        for n in rng.integers(100, 1000, size=sizes.sites)
    ]  # fmt: skip


def _ms(start: float) -> float:
    return 1e3 * (time.perf_counter() - start)


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(a)) for k, a in arrays.items()}

    return Deviation.between(tensors(got), tensors(want)).abs


def aggregate_plain(
    updates: list[tuple[dict[str, np.ndarray], int]], reference: dict[str, np.ndarray]
) -> AggregationRow:
    """float32 arrays as they are; the error is float32 rounding of the average."""
    start = time.perf_counter()
    average = fedavg(updates)
    aggregate_ms = _ms(start)
    size = sum(a.nbytes for a in updates[0][0].values())
    return AggregationRow(
        "plaintext FedAvg", size, size, 0.0, aggregate_ms, 0.0, _max_error(average, reference)
    )


def aggregate_more(
    updates: list[tuple[dict[str, np.ndarray], int]], reference: dict[str, np.ndarray]
) -> AggregationRow:
    """Sites encrypt with the shared key; the aggregator averages ciphertexts without it."""
    key = generate_key(0)
    start = time.perf_counter()
    sent = [
        ({k: encrypt(torch.from_numpy(a), key).entries.numpy() for k, a in arrays.items()}, n)
        for arrays, n in updates
    ]
    encrypt_ms = _ms(start) / len(updates)
    start = time.perf_counter()
    average = fedavg(sent)
    aggregate_ms = _ms(start)
    start = time.perf_counter()
    plain = {
        k: decrypt(EncryptedTensor(torch.from_numpy(v), key.fingerprint), key).numpy()
        for k, v in average.items()
    }
    decrypt_ms = _ms(start)
    size = sum(a.nbytes for a in sent[0][0].values())
    return AggregationRow(
        "MORE FedAvg", size, size, encrypt_ms, aggregate_ms, decrypt_ms,
        _max_error(plain, reference),
    )  # fmt: skip


def aggregate_ckks(
    ts: ModuleType,
    updates: list[tuple[dict[str, np.ndarray], int]],
    reference: dict[str, np.ndarray],
) -> AggregationRow:
    """NVIDIA FLARE's HE path: FLARE's default context (CKKS, N=8192, [60, 40, 40], scale
    2^40, symmetric), the site multiplies its update by its weight and encrypts it, the
    server deserialises, adds, scales by 1/total and serialises, the site decrypts.

    Arrays are split into vectors of N/2 slots, as TenSEAL does internally for long ones.
    """
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.generate_relin_keys()
    context.global_scale = 2**40
    slots = 8192 // 2
    start = time.perf_counter()
    sent = [
        {
            k: [
                ts.ckks_vector(context, chunk.tolist()).serialize()
                for chunk in np.array_split(a.astype(np.float64).ravel() * n, -(-a.size // slots))
            ]
            for k, a in arrays.items()
        }
        for arrays, n in updates
    ]
    encrypt_ms = _ms(start) / len(updates)
    total = float(sum(n for _, n in updates))
    start = time.perf_counter()
    wire: dict[str, list[bytes]] = {}
    for k, chunks in sent[0].items():
        wire[k] = []
        for i in range(len(chunks)):
            acc = ts.ckks_vector_from(context, sent[0][k][i])
            for site in sent[1:]:
                acc += ts.ckks_vector_from(context, site[k][i])
            wire[k].append((acc * (1.0 / total)).serialize())
    aggregate_ms = _ms(start)
    start = time.perf_counter()
    plain = {
        k: np.concatenate(
            [ts.ckks_vector_from(context, blob).decrypt() for blob in chunks]
        ).reshape(updates[0][0][k].shape)
        for k, chunks in wire.items()
    }
    decrypt_ms = _ms(start)
    return AggregationRow(
        "CKKS FedAvg (TenSEAL, FLARE-style)",
        sum(len(b) for chunks in sent[0].values() for b in chunks),
        sum(len(b) for chunks in wire.values() for b in chunks),
        encrypt_ms,
        aggregate_ms,
        decrypt_ms,
        _max_error(plain, reference),
    )


def bench_aggregation(
    sizes: SuiteSizes, ts: ModuleType | None, seed: int = 0
) -> tuple[list[AggregationRow], int]:
    """The three schemes on the same site updates; also returns the update's value count.

    The reference is the float64 average of the float32 updates."""
    updates = _site_updates(sizes, seed)
    reference = {
        k: v.astype(np.float64)
        for k, v in fedavg(
            [({k: a.astype(np.float64) for k, a in arr.items()}, n) for arr, n in updates]
        ).items()
    }
    rows = [aggregate_plain(updates, reference), aggregate_more(updates, reference)]
    if ts is None:
        rows.append(AggregationRow("CKKS FedAvg", note=f"TenSEAL not installed ({TENSEAL_PIP})"))
    else:
        rows.append(aggregate_ckks(ts, updates, reference))
    return rows, sum(a.size for a in updates[0][0].values())


# --- 3. Logistic regression on encrypted data --------------------------------------------------


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


# --- 4. Ratio against width and batch -------------------------------------------------------


@dataclass(frozen=True)
class ScalingRow:
    """Best step times (ms) of a whole training step and of one Linear layer alone."""

    width: int
    batch: int
    plain_step_ms: float
    encrypted_step_ms: float
    plain_linear_ms: float
    encrypted_linear_ms: float

    @property
    def step_ratio(self) -> float:
        return self.encrypted_step_ms / self.plain_step_ms

    @property
    def linear_ratio(self) -> float:
        return self.encrypted_linear_ms / self.plain_linear_ms


def scaling_spec(width: int) -> ModelSpec:
    """A ``width -> width -> 10`` tanh MLP: one hidden layer as wide as its input."""
    return ModelSpec(
        f"mlp {width}-{width}-10",
        lambda: nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)),
        (width,),
        "cross_entropy",
        (0.0, 1.0),
    )


def _best_ms(
    first: Callable[[], object], second: Callable[[], object], steps: int
) -> tuple[float, float]:
    """Best times (ms) of two CPU steps run alternately: the least-disturbed run of each, as
    ``timeit`` advises, since other load only ever adds time."""
    cpu = torch.device("cpu")
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        times[0].append(_timed(first, cpu))
        times[1].append(_timed(second, cpu))
    return 1e3 * min(times[0]), 1e3 * min(times[1])


def bench_scaling(width: int, batch: int, steps: int, seed: int = 0) -> ScalingRow:
    """Whole training steps of :func:`scaling_spec`, and forward + backward of its first
    Linear alone. The Linear's arithmetic is 8 multiply-adds per plaintext one (a 2x2
    product), so a ratio above 8 there is data movement or kernel overhead, not the scheme."""
    cpu = torch.device("cpu")
    training = _TrainingSteps(scaling_spec(width), batches=1, batch=batch, device=cpu, seed=seed)
    plain_step, enc_step = _best_ms(
        lambda: training.plain_step(0), lambda: training.encrypted_step(0), steps
    )
    layer = nn.Linear(width, width)
    twin = to_encrypted(nn.Sequential(layer), None, dtype=torch.float32)
    key = generate_key(seed)
    x, g = torch.rand(batch, width), torch.full((batch, width), 1.0 / batch)
    ex, eg = encrypt(x, key, seed=seed), encrypt(g, key, seed=seed + 1)

    def plain_linear() -> None:
        layer.zero_grad()
        layer(x).backward(g)

    def encrypted_linear() -> None:
        twin.zero_grad()
        twin(ex).backward(eg)

    plain_linear()  # warm-up
    encrypted_linear()
    plain_lin, enc_lin = _best_ms(plain_linear, encrypted_linear, steps)
    return ScalingRow(width, batch, plain_step, enc_step, plain_lin, enc_lin)


# --- Report ------------------------------------------------------------------------------------


def _fmt(value: float | int | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def _epoch_table(rows: list[EpochRow]) -> list[str]:
    out = [
        "| model | parameters | epoch | plaintext (s) | encrypted (s) | time ratio "
        "| plaintext step memory (MiB) | encrypted (MiB) | memory ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.model} | {r.params:,} | {r.batches} x {r.batch} | {r.plain_s:.3f} | "
        f"{r.encrypted_s:.3f} | {r.ratio:.2f} | {r.plain_mib:.2f} | {r.encrypted_mib:.2f} | "
        f"{r.memory_ratio:.2f} |"
        for r in rows
    ]
    return out


def _aggregation_table(rows: list[AggregationRow], sites: int) -> list[str]:
    out = [
        "| scheme | upload per site (KiB) | broadcast (KiB) | round on the wire (MiB) "
        "| encrypt per site (ms) | aggregate (ms) | decrypt (ms) | max error vs plaintext |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.note:
            out.append(f"| {r.scheme} | {r.note} |  |  |  |  |  |  |")
            continue
        assert r.up_bytes is not None and r.down_bytes is not None
        wire = sites * (r.up_bytes + r.down_bytes) / 2**20
        out.append(
            f"| {r.scheme} | {r.up_bytes / 1024:,.0f} | {r.down_bytes / 1024:,.0f} | "
            f"{wire:.2f} | {_fmt(r.encrypt_ms, '.1f')} | {_fmt(r.aggregate_ms, '.1f')} | "
            f"{_fmt(r.decrypt_ms, '.1f')} | {_fmt(r.max_error, '.1e')} |"
        )
    return out


def _logreg_table(rows: list[LogRegRow]) -> list[str]:
    out = [
        "| scheme | encrypt training set (s) | epoch (s) | test accuracy "
        "| max weight difference vs plaintext |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.note:
            out.append(f"| {r.scheme} | {r.note} |  |  |  |")
        else:
            out.append(
                f"| {r.scheme} | {_fmt(r.encrypt_s, '.3f')} | {_fmt(r.epoch_s, '.4g')} | "
                f"{_fmt(r.accuracy, '.3f')} | {_fmt(r.max_weight_error, '.1e')} |"
            )
    return out


def _scaling_table(rows: list[ScalingRow], batches: Sequence[int]) -> list[str]:
    """One row per width, one cell per batch: whole-step ratio / Linear-layer ratio."""
    cells: dict[int, list[str]] = {}
    for r in rows:
        cells.setdefault(r.width, []).append(f"{r.step_ratio:.2f} / {r.linear_ratio:.2f}")
    out = [
        "| width \\ batch | " + " | ".join(str(b) for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    out += [f"| {scaling_spec(w).name} | {' | '.join(c)} |" for w, c in cells.items()]
    return out


# --- 6. Federated rounds against the number of sites --------------------------------------


@dataclass(frozen=True)
class FederationRow:
    """Median seconds of a simulated round after the first (which also loads and encrypts
    each site's data), encrypted and plaintext, in one ``more-fl run``."""

    sites: int
    secure: bool
    encrypted_s: float
    plain_s: float

    @property
    def ratio(self) -> float:
        return self.encrypted_s / self.plain_s


def bench_federation(sites: int, rounds: int, *, secure: bool = False) -> FederationRow:
    """``configs/wbc.yaml`` with ``sites`` simulated sites (Flower's simulation on this
    machine, a SuperLink of its own), encrypted and the plaintext baseline."""
    from federation.launch import run_federation  # starts Flower processes: tools only
    from federation.report import load_histories

    experiment = yaml.safe_load((CONFIGS / "wbc.yaml").read_text(encoding="utf-8"))
    experiment["training"]["rounds"] = rounds
    experiment["sites"]["count"] = sites
    experiment["federation"]["secure_aggregation"]["enabled"] = secure
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp:
        path = Path(tmp) / "wbc.yaml"
        path.write_text(yaml.safe_dump(experiment), encoding="utf-8")
        result = run_federation(
            path, sites=sites, output_dir=Path(tmp) / "run", resume=False,
            centralised=False, echo=lambda _: None,
        )  # fmt: skip
        if not result.ok:
            raise RuntimeError(f"the {sites}-site federation failed: {result.cause}")
        histories = load_histories(Path(tmp) / "run")
    later = {
        mode: statistics.median(e["seconds"] for e in history[1:])
        for mode, history in histories.items()
    }
    return FederationRow(sites, secure, later[MODE_ENCRYPTED], later[MODE_PLAINTEXT])


def _federation_table(rows: list[FederationRow]) -> list[str]:
    out = [
        "| sites | secure aggregation | encrypted round (s) | plaintext round (s) | ratio "
        "| encrypted per site (ms) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.sites} | {'SecAgg+' if r.secure else 'no'} | {r.encrypted_s:.2f} | "
        f"{r.plain_s:.2f} | {r.ratio:.2f} | {1e3 * r.encrypted_s / r.sites:.0f} |"
        for r in rows
    ]
    return out


def _headline(
    epochs: list[EpochRow],
    aggregation: list[AggregationRow],
    logreg: list[LogRegRow],
    sizes: SuiteSizes,
    federation: list[FederationRow],
) -> list[str]:
    """One table of the suite's key figures, plaintext / MORE / CKKS side by side (the
    README's performance headline). Rows are in the order the benches return them."""
    schemes = ("plaintext", "MORE", "CKKS (TenSEAL, FLARE-style)")

    def row(what: str, cells: list[str]) -> str:
        return f"| {what} | " + " | ".join(cells) + " |"

    def wire(r: AggregationRow) -> str:
        if r.note:
            return r.note
        assert r.up_bytes is not None and r.down_bytes is not None
        return f"{sizes.sites * (r.up_bytes + r.down_bytes) / 2**20:.2f} MiB"

    def costs(r: AggregationRow, first: bool) -> str:
        if r.note:
            return "-"
        parts = [r.encrypt_ms, r.aggregate_ms, r.decrypt_ms]
        return " / ".join("-" if first and i != 1 else _fmt(v, ".1f") for i, v in enumerate(parts))

    def epoch(r: LogRegRow) -> str:
        if r.note or r.epoch_s is None:
            return "-"
        return f"{r.epoch_s * 1e3:.1f} ms" if r.epoch_s < 1 else f"{r.epoch_s:.1f} s"

    ratios = " / ".join(f"{r.ratio:.1f}" for r in epochs)
    memory = " / ".join(f"{r.memory_ratio:.1f}" for r in epochs)
    models = " / ".join(r.model for r in epochs)
    batches = f"{epochs[0].batches} x {epochs[0].batch}" if epochs else "-"
    return [
        "| what | " + " | ".join(schemes) + " |",
        "|---|---:|---:|---:|",
        row(
            f"one FedAvg round, {sizes.sites} sites, MNIST MLP update: bytes on the wire",
            [wire(r) for r in aggregation],
        ),
        row(
            "same round: encrypt per site / aggregate / decrypt (ms)",
            [costs(r, i == 0) for i, r in enumerate(aggregation)],
        ),
        row(
            f"logistic regression, {sizes.logreg_train} examples: one epoch",
            [epoch(r) for r in logreg],
        ),
        row(
            "same: max weight difference vs plaintext",
            ["-", *(_fmt(r.max_weight_error, ".1e") if not r.note else "-" for r in logreg[1:])],
        ),
        row(f"training epoch ({batches}), {models}: time ratio", ["1", ratios, "-"]),
        row("same: step memory ratio", ["1", memory, "-"]),
        *(
            row(
                f"simulated WBC round, {r.sites} sites"
                + (", SecAgg+" if r.secure else "")
                + " (s, later rounds)",
                [f"{r.plain_s:.2f}", f"{r.encrypted_s:.2f} ({r.ratio:.1f}x)", "-"],
            )
            for r in federation
        ),
    ]


def _png(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plot_training(rows: list[EpochRow], path: Path) -> None:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    pos = np.arange(len(rows))
    ax.bar(pos - 0.2, [r.plain_s for r in rows], 0.4, label="plaintext")
    ax.bar(pos + 0.2, [r.encrypted_s for r in rows], 0.4, label="MORE encrypted")
    for i, r in enumerate(rows):
        ax.annotate(f"{r.ratio:.1f}x", (i + 0.2, r.encrypted_s), ha="center", va="bottom")
    ax.set_xticks(pos, [r.model for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel(f"epoch time (s), {rows[0].batches} batches of {rows[0].batch}")
    ax.set_title(f"Training epoch on {rows[0].device}")
    ax.margins(y=0.2)
    ax.legend()
    _png(fig, path)


def _plot_aggregation(rows: list[AggregationRow], path: Path) -> None:
    shown = [r for r in rows if not r.note]
    fig = Figure(figsize=(10, 3.6))
    size_ax, time_ax = fig.subplots(1, 2)
    names = [r.scheme.split(" (")[0] for r in shown]
    size_ax.bar(names, [(r.up_bytes or 0) / 2**10 for r in shown])
    size_ax.set_ylabel("upload per site (KiB)")
    size_ax.set_yscale("log")
    pos = np.arange(len(shown))
    for i, (label, attr) in enumerate(
        (("encrypt / site", "encrypt_ms"), ("aggregate", "aggregate_ms"), ("decrypt", "decrypt_ms"))
    ):
        values = [getattr(r, attr) or np.nan for r in shown]  # plaintext: no bar
        time_ax.bar(pos + (i - 1) * 0.27, values, 0.27, label=label)
    time_ax.set_xticks(pos, names)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("time (ms)")
    time_ax.legend(fontsize="small")
    fig.suptitle("One FedAvg round, MNIST MLP update")
    _png(fig, path)


def _plot_logreg(rows: list[LogRegRow], path: Path) -> None:
    shown = [r for r in rows if not r.note]
    fig = Figure(figsize=(9, 3.4))
    time_ax, acc_ax = fig.subplots(1, 2)
    names = [r.scheme.split(" (")[0] for r in shown]
    time_ax.bar(names, [r.epoch_s or np.nan for r in shown])
    time_ax.set_yscale("log")
    time_ax.set_ylabel("epoch time (s)")
    acc_ax.bar(names, [r.accuracy or 0.0 for r in shown])
    acc_ax.set_ylim(0.0, 1.0)
    acc_ax.set_ylabel("test accuracy")
    fig.suptitle("Logistic regression trained on encrypted data")
    _png(fig, path)


def _plot_scaling(rows: list[ScalingRow], path: Path) -> None:
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, attr, title in (
        (axes[0], "step_ratio", "whole training step"),
        (axes[1], "linear_ratio", "one Linear layer, forward + backward"),
    ):
        for batch in sorted({r.batch for r in rows}):
            mine = [r for r in rows if r.batch == batch]
            ax.plot([r.width for r in mine], [getattr(r, attr) for r in mine], "o-")
            ax.lines[-1].set_label(f"batch {batch}")
        ax.axhline(GEMM_BOUND, color="grey", linestyle="--", label="8 multiply-adds (2x2)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("layer width")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("encrypted / plaintext time")
    axes[1].legend(fontsize="small")
    _png(fig, path)


def _tenseal() -> ModuleType | None:
    try:
        return importlib.import_module("tenseal")
    except ImportError:
        return None


def run_suite(
    out_dir: Path, *, quick: bool = False, print_fn: Print = print, threads: int | None = None
) -> Path:
    """Run every section, write ``bench-suite.md`` and the plots into ``out_dir``; returns the
    markdown's path. Each file is replaced atomically, the markdown last.

    ``threads`` pins torch's intra-op threads for the run (restored after): on a machine
    shared with other work, 1 thread keeps small steps from waiting on busy cores.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), quick, print_fn)
    finally:
        torch.set_num_threads(previous)


def _run(out_dir: Path, quick: bool, print_fn: Print) -> Path:
    sizes = QUICK if quick else FULL
    ts = _tenseal()
    started = time.perf_counter()
    ckks = f"TenSEAL {ts.__version__}" if ts else f"TenSEAL not installed ({TENSEAL_PIP})"
    lines = [
        f"# more-fl benchmark suite ({'quick' if quick else 'full'})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, {ckks}.",
        "",
    ]

    sections: list[str] = []

    def section(title: str, body: list[str]) -> None:
        sections.extend([f"## {title}", "", *body, ""])
        print_fn(f"\n## {title}\n" + "\n".join(body))

    cpu = torch.device("cpu")
    epochs = [
        bench_epoch(s, batches=sizes.batches, batch=sizes.batch, repeats=sizes.repeats, device=cpu)
        for s in task_models(sizes)
    ]
    _plot_training(epochs, out_dir / "training.png")
    section(
        "1. Training epoch per task model (CPU)",
        [
            f"float32, SGD with momentum, median of {sizes.repeats} interleaved epochs. Memory: "
            "what one step holds (parameters, gradients, momentum, batch, saved activations).",
            "",
            *_epoch_table(epochs),
            "",
            "![training](training.png)",
        ],
    )

    aggregation, values = bench_aggregation(sizes, ts)
    _plot_aggregation(aggregation, out_dir / "aggregation.png")
    section(
        f"2. One FedAvg round, {sizes.sites} sites, MNIST MLP update ({values:,} values)",
        [
            "Plaintext and MORE send float32 arrays (MORE: 4 floats per value); CKKS sends "
            "serialised TenSEAL vectors (FLARE's context: N=8192, [60, 40, 40], scale 2^40, "
            "symmetric). The round counts every upload and every broadcast. In more-fl the "
            "sites train on ciphertexts, so their updates are encrypted already; MORE's encrypt "
            "and decrypt columns show what encrypting a plaintext update would cost.",
            "",
            *_aggregation_table(aggregation, sizes.sites),
            "",
            "![aggregation](aggregation.png)",
        ],
    )

    logreg, source = bench_logreg(sizes, ts)
    _plot_logreg(logreg, out_dir / "logreg.png")
    section(
        "3. Logistic regression on encrypted data",
        [
            f"{source}, {sizes.logreg_epochs} epoch(s) of full-batch gradient descent "
            "with the TenSEAL tutorial's update and degree-3 sigmoid. Accuracy: the decrypted "
            "model on the plaintext test set.",
            "",
            *_logreg_table(logreg),
            "",
            "![logistic regression](logreg.png)",
        ],
    )

    scaling = [
        bench_scaling(w, b, sizes.scale_steps) for w in sizes.widths for b in sizes.scale_batches
    ]
    _plot_scaling(scaling, out_dir / "scaling.png")
    section(
        "4. Encrypted / plaintext time ratio against width and batch",
        [
            f"Cells: whole training step / one Linear layer (forward + backward), best of "
            f"{sizes.scale_steps} alternated steps each. A 2x2 ciphertext product costs "
            f"{GEMM_BOUND:g} multiply-adds per plaintext one, so a Linear ratio above "
            f"{GEMM_BOUND:g} is data movement or kernel overhead; the activation and the "
            "softmax gradient add a per-element cost.",
            "",
            *_scaling_table(scaling, sizes.scale_batches),
            "",
            "![scaling](scaling.png)",
        ],
    )

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        gpu_rows = [
            bench_epoch(
                s, batches=sizes.batches, batch=sizes.batch, repeats=sizes.repeats, device=gpu
            )
            for s in task_models(sizes)
        ]
        _plot_training(gpu_rows, out_dir / "training-gpu.png")
        body = [*_epoch_table(gpu_rows), "", "![training on GPU](training-gpu.png)"]
    else:
        body = ["No CUDA device here: skipped."]
    section(f"5. Training epoch per task model on GPU ({_gpu_name()})", body)

    federation = [bench_federation(n, sizes.federated_rounds) for n in sizes.site_counts]
    if sizes.site_counts:
        federation.append(bench_federation(3, sizes.federated_rounds, secure=True))
    section(
        "6. Federated rounds against the number of sites (Flower simulation, CPU)",
        [
            f"`configs/wbc.yaml`, {sizes.federated_rounds} rounds, one `more-fl run` per row "
            "(encrypted and the plaintext baseline); the median of the rounds after the "
            "first, which also loads and encrypts the data. Simulated sites share this "
            "machine's cores, so a round grows with the site count; the last row masks the "
            "updates with SecAgg+.",
            "",
            *(_federation_table(federation) if federation else ["Skipped in quick mode."]),
        ],
    )

    lines += [
        "## Headline",
        "",
        *_headline(epochs, aggregation, logreg, sizes, federation),
        "",
        *sections,
        f"Suite run time: {time.perf_counter() - started:.1f} s.",
    ]
    report = out_dir / REPORT
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    print_fn(f"\nwrote {report}")
    return report


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
