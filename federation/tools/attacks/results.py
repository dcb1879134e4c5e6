"""What :func:`federation.tools.attacks.run.run_attack` measures: recovery per target, how
often each way of picking the data channel was right, and the report it hands back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RTOL = 1e-6
"""A value counts as recovered when ``|recovered - x| <= RTOL * max|x|`` over its target
(relative to the target's scale: values at zero, like MNIST background, have no relative
error of their own)."""


@dataclass(frozen=True)
class Recovery:
    """Recovered values of one target against the truth."""

    rate: float  # fraction within RTOL (relative to the target's largest |value|)
    max_err: float
    mean_err: float


@dataclass(frozen=True)
class TargetResult:
    """How much of one encrypted target the attacks recover.

    ``eigenvalues``: the closer of the two eigenvalues (ciphertext only, no labelling);
    ``known_pair``: an equivalent key from one of the target's own ciphertexts and one known
    pair; ``feature_key``: key and known pair from one *feature* ciphertext (one key for all);
    ``blind``: ciphertext only, the channel chosen by ``blind_by``; ``key_holder``: decryption
    with the real key, for comparison (``None`` where it defines the truth).
    """

    name: str
    values: int
    eigenvalues: Recovery
    known_pair: Recovery
    feature_key: Recovery
    blind: Recovery
    blind_by: str
    key_holder: Recovery | None


@dataclass(frozen=True)
class ResolutionResult:
    """How often one way of telling the data channel from the shadow picked right."""

    target: str
    method: str
    right: int
    undecided: int
    trials: int
    examples: int  # examples (or site updates) per trial

    @property
    def rate(self) -> float:
        return self.right / self.trials if self.trials else 0.0


@dataclass(frozen=True)
class AttackReport:
    """What :func:`run_attack` measured, and where it wrote the report and figures."""

    experiment: str
    task: str
    dtype: str
    fingerprint: str
    examples: int  # training examples whose features and targets were attacked
    updates: int  # site updates attacked
    targets: tuple[TargetResult, ...]
    resolutions: tuple[ResolutionResult, ...]
    refused: tuple[str, ...]  # sites whose health check stopped their update
    report: Path
    figures: tuple[Path, ...]
    seconds: float

    def summary_lines(self) -> list[str]:
        """Lines for the terminal: recovery per target, and how often each method found the
        data channel."""
        lines = [f"{self.experiment}: attack on task {self.task} ({self.dtype} ciphertexts)"]
        for t in self.targets:
            lines.append(
                f"  {t.name}: {t.values} values; eigenvalues {pct(t.eigenvalues.rate)}, "
                f"key + 1 pair {pct(t.known_pair.rate)}, ciphertext only ({t.blind_by}) "
                f"{pct(t.blind.rate)}, max abs error {t.blind.max_err:.1e}"
            )
        for h in self.resolutions:
            lines.append(f"  data channel of {h.target} by {h.method}: {h.right}/{h.trials}")
        lines += [f"  refused: {reason}" for reason in self.refused]
        lines.append(f"report: {self.report} ({self.seconds:.1f} s)")
        return lines


def pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


@dataclass(frozen=True)
class Attacked:
    """One target's ciphertexts, its plaintext (to score) and the ciphertext-only recovery."""

    name: str
    entries: np.ndarray
    truth: np.ndarray
    blind: np.ndarray
    blind_by: str
    key_holder: np.ndarray | None
