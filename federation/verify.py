"""``more-fl verify``: train small models plaintext and encrypted and print the deviation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from federation.equivalence import (
    FLOAT32_REL_TOL,
    FLOAT64_ABS_TOL,
    Comparison,
    compare_training,
)
from federation.more.keys import generate_key
from federation.nn.layers import Square


@dataclass(frozen=True)
class Case:
    name: str
    loss: str
    build: Callable[[], nn.Module]
    outputs: int


CASES = (
    Case(
        "mlp",
        "cross_entropy",
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.Sigmoid(),
            nn.Linear(32, 16),
            nn.Tanh(),
            nn.Linear(16, 10),
        ),
        10,
    ),
    Case(
        "cnn",
        "cross_entropy",
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(24, 10),
        ),
        10,
    ),
    Case(
        "mlp-regression",
        "mse",
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 16),
            nn.Softplus(),
            nn.Linear(16, 8),
            Square(),
            nn.Linear(8, 3),
        ),
        3,
    ),
)


def run(seed: int = 0, print_fn: Callable[[str], None] = print) -> bool:
    """Run every case in float64 and float32; print a table; return whether all passed."""
    key = generate_key(seed + 12345)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(192, 1, 8, 8, generator=gen, dtype=torch.float64)
    worst = {torch.float64: 0.0, torch.float32: 0.0}
    ok = True
    print_fn(f"{'model':16} {'dtype':8} {'max |dev|':>11} {'rel':>10} {'infer |dev|':>11}  result")
    for case in CASES:
        torch.manual_seed(seed)
        model = case.build()
        if case.loss == "cross_entropy":
            y = torch.randint(case.outputs, (len(x),), generator=gen)
        else:
            y = torch.rand(len(x), case.outputs, generator=gen, dtype=torch.float64) * 2 - 1
        for dtype in (torch.float64, torch.float32):
            cmp: Comparison = compare_training(
                model,
                x,
                y,
                key=key,
                loss=case.loss,
                dtype=dtype,
                epochs=2,
                batch_size=32,
                lr=0.2,
                momentum=0.9,
                weight_decay=1e-3,
                seed=seed,
                num_classes=case.outputs,
                feature_range=(0.0, 1.0),
                target_range=(-1.0, 1.0),
            )
            worst[dtype] = max(worst[dtype], cmp.max_abs)
            ok &= cmp.passed
            print_fn(
                f"{case.name:16} {str(dtype).removeprefix('torch.'):8} {cmp.max_abs:11.3e} "
                f"{cmp.max_rel:10.3e} {cmp.output_abs:11.3e}  {'ok' if cmp.passed else 'FAIL'}"
            )
    print_fn(
        f"bounds: float64 <= {FLOAT64_ABS_TOL:g} absolute, float32 <= {FLOAT32_REL_TOL:g} relative"
    )
    print_fn(f"max deviation float32: {worst[torch.float32]:.3e}")
    print_fn(f"max deviation float64: {worst[torch.float64]:.3e}")
    return ok
