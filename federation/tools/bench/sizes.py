"""What the benchmark suite measures, and how much: one :class:`SuiteSizes` per mode."""

from __future__ import annotations

from dataclasses import dataclass

TENSEAL_PIP = "tenseal==0.3.18"
"""The TenSEAL release this suite was written against (a cp311 manylinux wheel exists)."""


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
