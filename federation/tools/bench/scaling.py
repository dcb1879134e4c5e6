"""Section 4 of the suite: the encrypted/plaintext step ratio over layer width and batch size,
against the 8 multiply-adds a 2x2 ciphertext product costs per plaintext one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from federation.more import encrypt, generate_key
from federation.nn.convert import to_encrypted
from federation.tools.bench.epochs import ModelSpec, TrainingSteps, timed

GEMM_BOUND = 8.0
"""Multiply-adds of a 2x2 ciphertext product per plaintext multiply-add."""


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
        times[0].append(timed(first, cpu))
        times[1].append(timed(second, cpu))
    return 1e3 * min(times[0]), 1e3 * min(times[1])


def bench_scaling(width: int, batch: int, steps: int, seed: int = 0) -> ScalingRow:
    """Whole training steps of :func:`scaling_spec`, and forward + backward of its first
    Linear alone. The Linear's arithmetic is 8 multiply-adds per plaintext one (a 2x2
    product), so a ratio above 8 there is data movement or kernel overhead, not the scheme."""
    cpu = torch.device("cpu")
    training = TrainingSteps(scaling_spec(width), batches=1, batch=batch, device=cpu, seed=seed)
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
