"""``more-fl verify``: train small models plaintext and encrypted and print the deviation.

A handful of compact models together exercise every layer with an encrypted twin
(:data:`federation.nn.layers.TWINS`), the graph operations of traced modules (residual
additions, concatenation, reshapes, means), every loss and every optimiser, in float64 and
float32. :func:`coverage` lists what the cases exercise; the tests check it against the
engine's registries, so a newly supported layer needs a case here.

Every case trains through :func:`federation.nn.check.compare_training`: a plaintext and an
encrypted :mod:`federation.nn.session` on one config, the global generator seeded alike for
both runs (dropout masks agree). The first three also re-encrypt the model every 10 steps,
as a site does in ``more-fl train``.
"""

from __future__ import annotations

import operator
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from federation.more.keys import MoreKey, generate_key
from federation.nn import check
from federation.nn.graph import trace
from federation.nn.layers import TWINS, Square
from federation.nn.losses import BCEWithLogits, CrossEntropy, Huber, LossSpec, SmoothL1, get_loss
from federation.nn.optim import OPTIMIZERS
from federation.nn.session import SessionConfig

FLOAT64_ABS_TOL = check.FLOAT64_ABS_TOL
FLOAT32_REL_TOL = check.FLOAT32_REL_TOL

# Adam divides by sqrt(v) + eps: a parameter whose data gradient is (nearly) zero turns the
# round-off its shadow leaves in the data channel into a step of up to lr * error / eps (see
# EncryptedAdam). So the Adam cases keep no bias before a BatchNorm (its gradient is zero)
# and no BatchNorm -> ReLU -> MaxPool -> Conv (replicate padding) -> BatchNorm chain: a
# channel of the first BatchNorm whose every pooling window holds a positive value shifts
# all of the second one's inputs alike, so its bias gets a zero gradient.
SGD = {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3}
NESTEROV = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
ADAM = {"lr": 0.01, "weight_decay": 1e-3}
ADAMW = {"lr": 0.01, "weight_decay": 1e-2}

SMALL: dict[str, Any] = {"samples": 64, "batch_size": 16}
"""The coverage cases: 2 epochs of 4 steps keep ``more-fl verify`` short."""

SITE_REFRESH = 10
"""The site's re-encryption period of the ``site_refresh`` cases (the experiment default)."""

GRAPH_OPS = ("add", "cat", "view", "flatten", "permute", "mean")
"""Operations of traced modules (outside layers) that at least one case must exercise."""


@dataclass(frozen=True)
class Case:
    """A model, its loss and optimiser, and the data it trains on (features in [0, 1])."""

    name: str
    loss: LossSpec
    build: Callable[[], nn.Module]
    outputs: int
    optimizer: str = "sgd"
    hyper: Mapping[str, Any] = field(default_factory=lambda: dict(SGD))
    input_shape: tuple[int, ...] = (1, 8, 8)
    samples: int = 192
    batch_size: int = 32
    epochs: int = 2
    site_refresh: bool = False
    """Re-encrypt the model every :data:`SITE_REFRESH` steps, as a site training SGD on a
    loss by name does (``more-fl train``)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{self.name}: unknown optimiser {self.optimizer!r}")
        if self.site_refresh and (self.optimizer != "sgd" or not isinstance(self.loss, str)):
            raise ValueError(f"{self.name}: the site's path takes SGD and a loss by name")


class ResidualCatNet(nn.Module):
    """A traced module: a residual block, a concatenated branch, LayerNorm over channels
    (permuted), then adaptive pooling and a mean, reshaped and concatenated for the head."""

    def __init__(self, outputs: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.skip = nn.Identity()
        self.branch = nn.Conv2d(4, 2, 1)
        self.norm = nn.LayerNorm(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(6 * 4 + 6, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = self.skip(h) + torch.tanh(self.conv(h))
        h = torch.cat([h, self.branch(h)], dim=1)
        h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        pooled = self.pool(h)
        means = torch.flatten(h.mean((2, 3), keepdim=True), 1)
        return self.head(torch.cat([pooled.view(pooled.size(0), -1), means], 1))


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
        site_refresh=True,
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
        site_refresh=True,
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
        site_refresh=True,
    ),
    Case(
        "cnn-bn-maxpool",
        CrossEntropy(weight=[0.5 + 0.1 * i for i in range(10)], label_smoothing=0.1),
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect", bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"),
            nn.ReLU6(),
            nn.Dropout2d(0.25),
            nn.AdaptiveMaxPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 10),
        ),
        10,
        optimizer="adam",
        hyper=ADAM,
        **SMALL,
    ),
    Case(
        "residual-cat",
        BCEWithLogits(pos_weight=[2.0, 1.0, 0.5, 1.5]),
        ResidualCatNet,
        4,
        optimizer="adamw",
        hyper=ADAMW,
        **SMALL,
    ),
    Case(
        "mlp-activations",
        Huber(delta=0.5),
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 24),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(24, 24),
            nn.LayerNorm(24),
            nn.SiLU(),
            nn.Linear(24, 24),
            nn.ELU(),
            nn.LeakyReLU(0.1),
            nn.Linear(24, 24),
            nn.Hardtanh(-0.5, 0.5),
            nn.Softplus(beta=2.0),
            nn.Linear(24, 3),
        ),
        3,
        hyper=NESTEROV,
        **SMALL,
    ),
    Case(
        "mlp-activations-2",
        "l1",
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 24, bias=False),
            nn.BatchNorm1d(24),
            nn.CELU(0.5),
            nn.SELU(),
            nn.Linear(24, 24),
            nn.Mish(),
            nn.Hardswish(),
            nn.Linear(24, 24),
            nn.Hardsigmoid(),
            nn.LogSigmoid(),
            nn.Linear(24, 24),
            nn.Softsign(),
            nn.Tanhshrink(),
            nn.Linear(24, 3),
        ),
        3,
        optimizer="adam",
        hyper={**ADAM, "amsgrad": True},
        **SMALL,
    ),
    Case(
        "conv1d",
        SmoothL1(beta=0.5),
        lambda: nn.Sequential(
            nn.Conv1d(
                4, 8, 3, padding=2, dilation=2, groups=2, padding_mode="circular", bias=False
            ),
            nn.BatchNorm1d(8),
            nn.Tanh(),
            nn.Dropout1d(0.2),
            nn.Conv1d(8, 8, 4, padding="same", groups=4),
            nn.Sigmoid(),
            nn.Conv1d(8, 4, 3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(32, 3),
        ),
        3,
        optimizer="adamw",
        hyper=ADAMW,
        input_shape=(4, 16),
        **SMALL,
    ),
)


def _op_name(node: fx.Node) -> str | None:
    """The name of a traced function or tensor method (``x + y`` -> ``add``); None otherwise."""
    if node.op == "call_method":
        return node.target.removesuffix("_")
    if node.op == "call_function" and node.target not in (operator.getitem, getattr):
        return getattr(node.target, "__name__", str(node.target)).removesuffix("_")
    return None


def _conv_options(model: nn.Module) -> set[str]:
    out = set()
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            out.add(f"padding {m.padding if isinstance(m.padding, str) else m.padding_mode}")
            out |= {"groups"} if m.groups > 1 else set()
            out |= {"dilation"} if max(m.dilation) > 1 else set()
            out |= {"stride"} if max(m.stride) > 1 else set()
    return out


def coverage(cases: tuple[Case, ...] = CASES) -> dict[str, tuple[str, ...]]:
    """What ``cases`` exercise: layers, graph operations, conv options, losses, optimisers."""
    layers: set[type[nn.Module]] = set()
    ops: set[str] = set()
    conv: set[str] = set()
    for case in cases:
        model = case.build()
        layers |= {type(m) for m in model.modules() if type(m) in TWINS}
        conv |= _conv_options(model)
        if type(model) is not nn.Sequential:
            ops |= {name for n in trace(model).nodes if (name := _op_name(n)) is not None}
    return {
        "layers": tuple(t.__name__ for t in TWINS if t in layers),
        "graph ops": tuple(sorted(ops)),
        "conv": tuple(sorted(conv)),
        "losses": tuple(dict.fromkeys(get_loss(c.loss).name for c in cases)),
        "optimisers": tuple(o for o in OPTIMIZERS if any(c.optimizer == o for c in cases)),
    }


def uncovered_layers(cases: tuple[Case, ...] = CASES) -> list[str]:
    """The layers with an encrypted twin that no case exercises (the tests require none)."""
    return _missing(coverage(cases)["layers"])


def _missing(layers: tuple[str, ...]) -> list[str]:
    return [t.__name__ for t in TWINS if t.__name__ not in layers]


@dataclass(frozen=True)
class Row:
    """One case in one dtype: parameter/buffer and inference deviations, and the verdict."""

    max_abs: float
    max_rel: float
    output_abs: float
    passed: bool


def _data(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(case.samples, *case.input_shape, generator=gen, dtype=torch.float64)
    criterion = get_loss(case.loss)
    if criterion.categorical:
        y = torch.randint(case.outputs, (case.samples,), generator=gen)
    elif isinstance(criterion, BCEWithLogits):
        y = torch.randint(2, (case.samples, case.outputs), generator=gen).double()
    else:
        y = torch.rand(case.samples, case.outputs, generator=gen, dtype=torch.float64) * 2 - 1
    return x, y


def _compare(
    case: Case,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    key: MoreKey,
    dtype: torch.dtype,
    seed: int,
) -> Row:
    target_range = (0.0, 1.0) if isinstance(get_loss(case.loss), BCEWithLogits) else (-1.0, 1.0)
    config = SessionConfig(
        case.optimizer,
        case.hyper,
        batch_size=case.batch_size,
        epochs=case.epochs,
        refresh_every=SITE_REFRESH if case.site_refresh else 0,
        dtype=dtype,
        seed=seed,
    )
    got = check.compare_training(
        model,
        x,
        y,
        key=key,
        loss=case.loss,
        config=config,
        num_classes=case.outputs,
        feature_range=(0.0, 1.0),
        target_range=target_range,
    )
    return Row(
        max(got.state.abs, got.outputs.abs),
        max(got.state.rel, got.outputs.rel),
        got.outputs.abs,
        got.passed,
    )


def run(
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
    cases: tuple[Case, ...] = CASES,
) -> bool:
    """Run every case in float64 and float32; print a table; return whether all passed."""
    start = time.perf_counter()
    key = generate_key(seed + 12345)
    worst = {torch.float64: 0.0, torch.float32: 0.0}
    ok = True
    print_fn(
        f"{'model':18} {'loss':16} {'optim':6} {'dtype':8} {'max |dev|':>11} {'rel':>10} "
        f"{'infer |dev|':>11}  result"
    )
    for i, case in enumerate(cases):
        torch.manual_seed(seed)
        model = case.build()
        x, y = _data(case, torch.Generator().manual_seed(seed * 1_000 + i))
        for dtype in (torch.float64, torch.float32):
            with warnings.catch_warnings():
                # torch's performance note for the plaintext run of padding='same', even kernel
                warnings.filterwarnings("ignore", "Using padding='same'", UserWarning)
                row = _compare(case, model, x, y, key, dtype, seed)
            worst[dtype] = max(worst[dtype], row.max_abs)
            ok &= row.passed
            print_fn(
                f"{case.name:18} {get_loss(case.loss).name:16} {case.optimizer:6} "
                f"{str(dtype).removeprefix('torch.'):8} {row.max_abs:11.3e} {row.max_rel:10.3e} "
                f"{row.output_abs:11.3e}  {'ok' if row.passed else 'FAIL'}"
            )
    covered = coverage(cases)
    layers = covered.pop("layers")
    print_fn(f"covered layers ({len(layers)} of {len(TWINS)} with a twin): {', '.join(layers)}")
    missing = _missing(layers)
    if missing:
        print_fn(f"not covered: {', '.join(missing)}")
    for what, names in covered.items():
        print_fn(f"covered {what}: {', '.join(names)}")
    print_fn(f"{len(cases)} models, 2 dtypes, {time.perf_counter() - start:.1f} s")
    print_fn(
        f"bounds: float64 <= {FLOAT64_ABS_TOL:g} absolute, float32 <= {FLOAT32_REL_TOL:g} relative"
    )
    print_fn(f"max deviation float32: {worst[torch.float32]:.3e}")
    print_fn(f"max deviation float64: {worst[torch.float64]:.3e}")
    return ok
