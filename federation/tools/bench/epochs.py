"""Section 1 of the suite: a training epoch of every task model, plaintext against encrypted
(time, the memory one step holds, and their ratios)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from federation.more import EncryptedTensor, FeatureRange, generate_key
from federation.nn.convert import to_encrypted
from federation.nn.session import (
    EncryptedSession,
    PlainSession,
    SessionConfig,
    encrypt_examples,
    target_shadow,
)
from federation.tasks import get_task
from federation.tools.bench.sizes import SuiteSizes
from federation.tools.bench.steps import BENCH_SGD, held_bytes, step_holding


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


def timed(step: Callable[..., object], device: torch.device, *args: object) -> float:
    _sync(device)
    start = time.perf_counter()
    step(*args)
    _sync(device)
    return time.perf_counter() - start


class TrainingSteps:
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
    steps = TrainingSteps(spec, batches=batches, batch=batch, device=device, seed=seed)
    plain_bytes = held_bytes(lambda: steps.plain_step(0))
    enc_bytes = held_bytes(lambda: steps.encrypted_step(0))
    plain_t, enc_t = [0.0] * repeats, [0.0] * repeats
    for r in range(repeats):
        for i in range(batches):
            plain_t[r] += timed(steps.plain_step, device, i)
            enc_t[r] += timed(steps.encrypted_step, device, i)
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
