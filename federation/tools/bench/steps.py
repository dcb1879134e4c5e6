"""``more-fl bench``: plaintext vs encrypted training steps, side by side in one process.

Steps are interleaved (plain, encrypted, plain, ...) so machine noise hits both alike, and
the median is reported. Memory is what a training step holds: parameters, gradients,
optimiser state, the batch and every tensor autograd saves for the backward pass, counted
exactly with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from federation.more.cipher import FeatureRange, ValidLabel
from federation.more.keys import generate_key
from federation.nn.convert import to_encrypted
from federation.nn.session import (
    Batch,
    EncryptedSession,
    PlainSession,
    SessionConfig,
    encrypt_examples,
)

BENCH_SGD = {"lr": 0.01, "momentum": 0.9}
"""The optimiser of every timed step (plaintext and encrypted alike)."""


@dataclass(frozen=True)
class BenchRow:
    model: str
    batch: int
    dtype: torch.dtype
    plain_ms: float
    encrypted_ms: float
    plain_mib: float
    encrypted_mib: float

    @property
    def ratio(self) -> float:
        return self.encrypted_ms / self.plain_ms

    @property
    def memory_ratio(self) -> float:
        return self.encrypted_mib / self.plain_mib


class ResidualNet(nn.Module):
    """A small residual network (traced into an encrypted graph): a strided conv stem, one
    basic block whose output is added to its input (the skip connection), a pooled head."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        x = F.relu(x + h)
        return self.fc(torch.flatten(self.pool(x), 1))


def bench_models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """The MNIST-size MLP (784-128-10), a small CNN, a ReLU/BatchNorm/MaxPool CNN and a
    small residual network, with their input shapes (10 classes each)."""
    return {
        "mlp 784-128-10": (
            lambda: nn.Sequential(
                nn.Flatten(), nn.Linear(784, 128), nn.Sigmoid(), nn.Linear(128, 10)
            ),
            (1, 28, 28),
        ),
        "cnn 1x28x28": (
            lambda: nn.Sequential(
                nn.Conv2d(1, 6, 5, stride=2),
                nn.Tanh(),
                nn.AvgPool2d(2),
                nn.Flatten(),
                nn.Linear(6 * 6 * 6, 10),
            ),
            (1, 28, 28),
        ),
        "cnn-bn-maxpool 1x28x28": (
            lambda: nn.Sequential(
                nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(16 * 3 * 3, 10),
            ),
            (1, 28, 28),
        ),
        "resnet 1x28x28": (ResidualNet, (1, 28, 28)),
    }


def _bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def step_holding(session: PlainSession | EncryptedSession, batch: Batch) -> list[torch.Tensor]:
    """One step of ``session`` on ``batch``, returning what it holds (for :func:`held_bytes`)."""
    session.step(batch)
    return session.held(batch[0])


def held_bytes(step: Callable[[], list[torch.Tensor]]) -> int:
    """Bytes held during one step: saved activations plus the persistent tensors it lists."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        persistent = step()
    return _bytes(saved + persistent)


def bench_one(
    name: str,
    build: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    *,
    batch: int,
    dtype: torch.dtype,
    steps: int,
    seed: int = 0,
) -> BenchRow:
    torch.manual_seed(seed)
    model = build().to(dtype)
    twin = to_encrypted(model, None, dtype=dtype)
    key = generate_key(seed)
    x = torch.rand(batch, *input_shape, dtype=dtype)
    y = torch.randint(10, (batch,))
    features, target = FeatureRange(0.0, 1.0), ValidLabel(10)
    ex, ey = encrypt_examples(x, y, key, features=features, target=target, dtype=dtype, seed=seed)
    config = SessionConfig("sgd", BENCH_SGD, batch_size=batch, dtype=dtype, seed=seed)
    plain = PlainSession(model, x, y, loss="cross_entropy", config=config)
    encrypted = EncryptedSession(twin, ex, ey, loss="cross_entropy", config=config)

    def plain_step() -> list[torch.Tensor]:
        return step_holding(plain, (x, y))

    def encrypted_step() -> list[torch.Tensor]:
        return step_holding(encrypted, (ex, ey))

    for _ in range(2):
        plain_step()
        encrypted_step()
    plain_bytes, enc_bytes = held_bytes(plain_step), held_bytes(encrypted_step)
    plain_t, enc_t = [], []
    for _ in range(steps):
        for fn, times in ((plain_step, plain_t), (encrypted_step, enc_t)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return BenchRow(
        name,
        batch,
        dtype,
        1e3 * statistics.median(plain_t),
        1e3 * statistics.median(enc_t),
        plain_bytes / 2**20,
        enc_bytes / 2**20,
    )


def run(
    *, quick: bool = False, steps: int | None = None, print_fn: Callable[[str], None] = print
) -> list[BenchRow]:
    """Benchmark each model (and dtype, unless quick); print a table and the worst ratio."""
    dtypes = (torch.float32,) if quick else (torch.float32, torch.float64)
    steps = steps or (15 if quick else 40)
    rows = [
        bench_one(name, build, shape, batch=64, dtype=dtype, steps=steps)
        for name, (build, shape) in bench_models().items()
        for dtype in dtypes
    ]
    print_fn(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64, "
        f"median of {steps} steps"
    )
    print_fn(
        "| model | dtype | plaintext step (ms) | encrypted step (ms) | ratio "
        "| plaintext memory (MiB) | encrypted memory (MiB) | memory ratio |"
    )
    print_fn("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print_fn(
            f"| {r.model} | {str(r.dtype).removeprefix('torch.')} | {r.plain_ms:.2f} | "
            f"{r.encrypted_ms:.2f} | {r.ratio:.2f} | {r.plain_mib:.2f} | {r.encrypted_mib:.2f} | "
            f"{r.memory_ratio:.2f} |"
        )
    print_fn(f"worst encrypted/plaintext step ratio: {max(r.ratio for r in rows):.2f}")
    return rows
