"""The attacks themselves: ciphertext entries in, plaintext candidates out, and the ways of
telling which of the two channels of an equivalent key is the data."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from federation.nn.losses import plain_loss

ChannelPair = tuple[np.ndarray, np.ndarray]


# --- the attacks: ciphertext entries in, plaintext candidates out ----------------------------


def entries64(entries: np.ndarray | torch.Tensor) -> np.ndarray:
    """Ciphertext entries as float64 (float32 ciphertexts are attacked at full precision)."""
    if isinstance(entries, torch.Tensor):
        entries = entries.detach().cpu().numpy()
    e = np.asarray(entries, dtype=np.float64)
    if e.ndim < 2 or e.shape[-2:] != (2, 2):
        raise ValueError(f"ciphertext entries must have shape [..., 2, 2], got {e.shape}")
    return e


def eigenvalue_pairs(entries: np.ndarray | torch.Tensor) -> ChannelPair:
    """Ciphertext only: the eigenvalues ``{x, r}`` of every ciphertext, larger first.

    ``trace = x + r`` and ``det = x r``. The discriminant is formed as ``((a - d)/2)^2 + b c``,
    which avoids the cancellation in ``trace^2 - 4 det``, and clipped at zero where round-off
    pushes a double root (``x == r``) slightly negative.
    """
    c = entries64(entries)
    a, b, d, e = c[..., 0, 0], c[..., 0, 1], c[..., 1, 0], c[..., 1, 1]
    middle = (a + e) / 2
    root = np.sqrt(np.maximum(((a - e) / 2) ** 2 + b * d, 0.0))
    return middle + root, middle - root


def equivalent_key(entries: np.ndarray | torch.Tensor) -> np.ndarray:
    """An equivalent key (the columns of ``S``, rescaled and possibly swapped) from one ciphertext.

    Uses the ciphertext whose eigenvalues are best separated (largest ``|x - r| / (|x| + |r|)``),
    where the eigenvectors are most accurate. Key-free encodings ``w I`` and values equal to
    their shadow are double roots that say nothing about ``S``; if all are, this raises.
    """
    c = entries64(entries).reshape(-1, 2, 2)
    hi, lo = eigenvalue_pairs(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.nan_to_num((hi - lo) / (np.abs(hi) + np.abs(lo)))
    best = int(np.argmax(gap)) if gap.size else 0
    if not gap.size or gap[best] <= 1e-6:
        raise ValueError("no ciphertext has distinct eigenvalues: nothing to diagonalise")
    _, vectors = np.linalg.eig(c[best])
    return vectors.real / np.linalg.norm(vectors.real, axis=0)


def channels(entries: np.ndarray | torch.Tensor, basis: np.ndarray) -> ChannelPair:
    """Both diagonal entries of ``B^-1 C B`` for every ciphertext ``C``.

    With an equivalent key ``B`` one of them is ``x`` and the other ``r``, and which is which
    is the same for every ciphertext under the key. With the real key, channel 0 is ``x``.
    """
    c = entries64(entries)
    b = np.asarray(basis, dtype=np.float64)
    inv = np.linalg.inv(b)
    first = np.einsum("...kl,k,l->...", c, inv[0], b[:, 0])
    second = np.einsum("...kl,k,l->...", c, inv[1], b[:, 1])
    return first, second


# --- which channel is the data ----------------------------------------------------------------


def _pick(scores: tuple[float, float]) -> int | None:
    """The channel with the higher score; ``None`` on a tie (the heuristic cannot tell)."""
    a, b = (float(s) if np.isfinite(s) else -np.inf for s in scores)
    if a == b:
        return None
    return 0 if a > b else 1


def resolve_known_pair(
    entry: np.ndarray | torch.Tensor, plaintext: float, basis: np.ndarray
) -> int:
    """The data channel, from one ciphertext whose plaintext is known: the one that equals it.

    Raises when that value equals its own shadow (both channels agree), since such a pair
    cannot tell the channels apart; the attacker then uses another pair.
    """
    first, second = (float(v) for v in channels(entry, basis))
    if abs(first - second) <= 1e-6 * (abs(first) + abs(second)):
        raise ValueError("this value equals its shadow; a known pair needs x != r")
    return 0 if abs(first - plaintext) < abs(second - plaintext) else 1


def _zeros(channel: np.ndarray) -> float:
    """Fraction of zeros up to round-off: image background is exactly 0, a uniform shadow
    almost never is."""
    scale = float(np.abs(channel).max())
    return float(np.mean(np.abs(channel) <= 1e-4 * scale)) if scale > 0 else 1.0


def _smoothness(channel: np.ndarray) -> float:
    """Minus the mean neighbour difference over the mean spread: images are spatially smooth,
    shadows are drawn independently per pixel."""
    if channel.ndim < 3:
        raise ValueError(f"smoothness needs images [N, ..., H, W], got shape {channel.shape}")
    rough = np.abs(np.diff(channel, axis=-1)).mean() + np.abs(np.diff(channel, axis=-2)).mean()
    spread = np.abs(channel - channel.mean()).mean()
    return float(-rough / spread) if spread > 0 else 0.0


def _is_one_hot(channel: np.ndarray) -> bool:
    rows = channel.reshape(len(channel), -1)
    rounded = np.round(rows)
    return bool(
        np.all((rounded == 0) | (rounded == 1))
        and np.all(rounded.sum(axis=-1) == 1)
        and np.allclose(rows, rounded, atol=1e-4)
    )


def _distribution(channel: np.ndarray) -> float:
    """Distance from the public shadow distribution (design note, section 5): for one-hot
    targets the total variation of the class frequencies from uniform random labels, else the
    Kolmogorov-Smirnov distance from uniform over the channel's own range."""
    if _is_one_hot(channel):
        freq = channel.reshape(len(channel), -1).mean(axis=0)
        return float(np.abs(freq - 1.0 / freq.size).sum() / 2)
    v = np.sort(channel.ravel())
    if v[-1] <= v[0]:
        return 1.0
    u = (v - v[0]) / (v[-1] - v[0])
    n = v.size
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def _correlation(channel: np.ndarray) -> float:
    """Mean absolute correlation between columns: shadows are drawn independently per entry,
    so dependence between outputs (pressures, volumes, flows of one patient) is the data's."""
    x = channel.reshape(len(channel), -1)
    x = x[:, x.std(axis=0) > 0]
    if x.shape[0] < 3 or x.shape[1] < 2:
        return 0.0
    corr = np.corrcoef(x, rowvar=False)
    return float(np.abs(corr[~np.eye(len(corr), dtype=bool)]).mean())


HEURISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "zeros": _zeros,
    "smoothness": _smoothness,
    "distribution": _distribution,
    "correlation": _correlation,
}
"""Per-target statistics, higher for the channel that looks like data. Each compares the two
channels of one target ``[N, ...]`` (N examples)."""


def resolve_by_statistics(pair: ChannelPair, heuristic: str) -> int | None:
    """The data channel by one of :data:`HEURISTICS`; ``None`` when it cannot tell."""
    if heuristic not in HEURISTICS:
        raise ValueError(f"unknown heuristic {heuristic!r}; choose one of {sorted(HEURISTICS)}")
    score = HEURISTICS[heuristic]
    return _pick((score(pair[0]), score(pair[1])))


def _heldout_r2(x: np.ndarray, y: np.ndarray, ridge: float) -> float:
    """R^2 on the second half of a ridge regression of ``y`` on ``x`` fitted on the first half
    (in dual form, so 4096-pixel images cost an n x n solve)."""
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    half = len(x) // 2
    if half < 2:
        raise ValueError(f"supervision needs at least 4 examples, got {len(x)}")
    x_mean, y_mean = x[:half].mean(axis=0), y[:half].mean(axis=0)
    xt, yt = x[:half] - x_mean, y[:half] - y_mean
    gram = xt @ xt.T
    lam = ridge * max(float(np.trace(gram)) / half, 1e-300)
    alpha = np.linalg.solve(gram + lam * np.eye(half), yt)
    pred = (x[half:] - x_mean) @ (xt.T @ alpha) + y_mean
    total = float(((y[half:] - y_mean) ** 2).sum())
    return 1.0 - float(((y[half:] - pred) ** 2).sum()) / total if total > 0 else -np.inf


def resolve_by_supervision(
    features: ChannelPair, targets: ChannelPair, *, ridge: float = 0.1
) -> int | None:
    """The channel in which the targets are predictable from the features (held-out R^2).

    A site's targets depend on its features; shadow targets are drawn independently of the
    shadow features (random valid labels, uniform regression targets), so nothing predicts
    them. Both pairs must come from one equivalent key, so that their channels correspond.
    """
    first = _heldout_r2(features[0], targets[0], ridge)
    return _pick((first, _heldout_r2(features[1], targets[1], ridge)))


def resolve_by_evaluation(
    candidates: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
) -> int | None:
    """The channel whose model fits public data of the task better (lower loss).

    An aggregator knows the architecture and can get public data of the task (MNIST is
    public; the WBC simulator and the angiography generator ship with this project). SGD on
    real data lowers that loss; the shadow network was fitted to noise it cannot learn.
    ``model`` is overwritten with each candidate in turn.
    """
    dtype = next(model.parameters()).dtype
    losses = []
    for state in candidates:
        model.load_state_dict({k: torch.as_tensor(v, dtype=dtype) for k, v in state.items()})
        with torch.no_grad():
            losses.append(float(plain_loss(loss, model(x.to(dtype)), y)))
    return _pick((-losses[0], -losses[1]))
