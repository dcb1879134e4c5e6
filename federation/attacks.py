"""Attacks on MORE ciphertexts: what anyone who knows the scheme recovers without the key.

MORE encrypts ``x`` as ``C = S diag(x, r) S^-1`` (design note, section 8). The attacks read
only ciphertext entries ``[..., 2, 2]``:

- the eigenvalues of ``C`` are ``{x, r}``; trace and determinant give them
  (:func:`eigenvalue_pairs`);
- all ciphertexts under one key share their eigenvectors, the columns of ``S``, so
  diagonalising one ciphertext gives an equivalent key for every other one
  (:func:`equivalent_key`, :func:`channels`);
- one bit is left for the whole key: which channel is the data. One known
  plaintext/ciphertext pair settles it (:func:`resolve_known_pair`), so, mostly, do the
  statistics of the data (:func:`resolve_by_statistics`, :func:`resolve_by_supervision`,
  :func:`resolve_by_evaluation`). (The public key fingerprint used to settle it too, for
  float64 ciphertexts: it hashed the key's columns in order. It is now salted with a secret
  part of the key, so it cannot confirm a recovered key.)

:func:`run_attack` applies them to a task's encrypted data and to the encrypted model updates
an aggregator receives. It uses the key to make the ciphertexts (as a site does) and to score
the attack afterwards, never inside an attack.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from federation.aggregation import initial_arrays
from federation.atomic import atomic_write_bytes
from federation.config import ExperimentConfig
from federation.experiment import (
    dtype_of,
    encrypt_data,
    encryption_inputs,
    federation_key,
    initial_model,
    load_data,
    loss_of,
    site_data,
)
from federation.more.keys import MoreKey
from federation.nn.losses import plain_loss
from federation.nn.session import plain_targets
from federation.site import EncryptedSite, SiteError
from federation.tasks.base import TaskData

RTOL = 1e-6
"""A value counts as recovered when ``|recovered - x| <= RTOL * max|x|`` over its target
(relative to the target's scale: values at zero, like MNIST background, have no relative
error of their own)."""

REPORT = "report.md"
RECOVERY_PNG = "recovery.png"
IMAGES_PNG = "images.png"

ChannelPair = tuple[np.ndarray, np.ndarray]


# --- the attacks: ciphertext entries in, plaintext candidates out ----------------------------


def _entries64(entries: np.ndarray | torch.Tensor) -> np.ndarray:
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
    c = _entries64(entries)
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
    c = _entries64(entries).reshape(-1, 2, 2)
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
    c = _entries64(entries)
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


# --- measuring the attacks on an experiment's data and updates --------------------------------


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
                f"  {t.name}: {t.values} values; eigenvalues {_pct(t.eigenvalues.rate)}, "
                f"key + 1 pair {_pct(t.known_pair.rate)}, ciphertext only ({t.blind_by}) "
                f"{_pct(t.blind.rate)}, max abs error {t.blind.max_err:.1e}"
            )
        for h in self.resolutions:
            lines.append(f"  data channel of {h.target} by {h.method}: {h.right}/{h.trials}")
        lines += [f"  refused: {reason}" for reason in self.refused]
        lines.append(f"report: {self.report} ({self.seconds:.1f} s)")
        return lines


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def _measure(recovered: np.ndarray, truth: np.ndarray) -> Recovery:
    err = np.abs(recovered - truth)
    scale = float(np.abs(truth).max()) or 1.0
    return Recovery(float(np.mean(err <= RTOL * scale)), float(err.max()), float(err.mean()))


def _data_channel(pair: ChannelPair, truth: np.ndarray) -> int:
    """Scoring only: which channel of an equivalent key is the data, judged by the plaintext."""
    return int(np.abs(pair[1] - truth).mean() < np.abs(pair[0] - truth).mean())


def _known_pair(
    entries: np.ndarray, truth: np.ndarray, basis: np.ndarray, rng: np.random.Generator
) -> int:
    """Resolve with one known pair, drawn at random among the values whose ciphertext has
    distinct eigenvalues (the attacker sees which those are)."""
    flat_e, flat_x = entries.reshape(-1, 2, 2), truth.reshape(-1)
    hi, lo = eigenvalue_pairs(flat_e)
    usable = np.flatnonzero(hi - lo > 1e-6 * (np.abs(hi) + np.abs(lo)))
    i = int(rng.choice(usable))
    return resolve_known_pair(flat_e[i], float(flat_x[i]), basis)


@dataclass(frozen=True)
class _Attacked:
    """One target's ciphertexts, its plaintext (to score) and the ciphertext-only recovery."""

    name: str
    entries: np.ndarray
    truth: np.ndarray
    blind: np.ndarray
    blind_by: str
    key_holder: np.ndarray | None


def _score(
    t: _Attacked, feature_key: tuple[np.ndarray, int], rng: np.random.Generator
) -> TargetResult:
    hi, lo = eigenvalue_pairs(t.entries)
    closer = np.where(np.abs(hi - t.truth) <= np.abs(lo - t.truth), hi, lo)
    basis = equivalent_key(t.entries)
    own = channels(t.entries, basis)[_known_pair(t.entries, t.truth, basis, rng)]
    f_basis, f_channel = feature_key
    return TargetResult(
        name=t.name,
        values=int(t.truth.size),
        eigenvalues=_measure(closer, t.truth),
        known_pair=_measure(own, t.truth),
        feature_key=_measure(channels(t.entries, f_basis)[f_channel], t.truth),
        blind=_measure(t.blind, t.truth),
        blind_by=t.blind_by,
        key_holder=None if t.key_holder is None else _measure(t.key_holder, t.truth),
    )


def _tally(
    target: str, method: str, outcomes: list[tuple[int | None, int]], examples: int
) -> ResolutionResult:
    """Count the right picks among ``(pick, true channel)`` outcomes, one per trial."""
    return ResolutionResult(
        target,
        method,
        right=sum(pick == true for pick, true in outcomes),
        undecided=sum(pick is None for pick, _ in outcomes),
        trials=len(outcomes),
        examples=examples,
    )


def _statistics_for(plain: np.ndarray, one_hot: bool) -> tuple[str, ...]:
    if plain.ndim >= 3:
        return ("zeros", "smoothness", "distribution")
    return ("distribution",) if one_hot else ("distribution", "correlation")


def _attack_data(
    config: ExperimentConfig, sample: TaskData, key: MoreKey, trials: int, rng: np.random.Generator
) -> tuple[list[_Attacked], list[ResolutionResult]]:
    """Encrypt a site's examples, recover them ciphertext-only, and try every way of picking
    the data channel on ``trials`` disjoint chunks of examples."""
    split = encrypt_data(config, sample, key, seed=config.training.seed)
    entries = {"features": split.x_train.entries, "targets": split.y_train.entries}
    entries = {name: _entries64(e) for name, e in entries.items()}
    plain = encryption_inputs(config, sample)  # exactly what encrypt_data encrypted
    truth = {
        "features": plain.x_train.double().numpy(),
        "targets": plain.targets.double().numpy(),
    }
    basis = equivalent_key(entries["features"])
    pairs = {name: channels(e, basis) for name, e in entries.items()}
    decision = resolve_by_supervision(pairs["features"], pairs["targets"])
    attacked = [
        _Attacked(
            name,
            entries[name],
            truth[name],
            pairs[name][0 if decision is None else decision],
            "supervision",
            channels(entries[name], key.matrix)[0],
        )
        for name in ("features", "targets")
    ]

    n = len(truth["features"])
    chunks = np.array_split(np.arange(n), max(1, min(trials, n // 4)))
    data = _data_channel(pairs["features"], truth["features"])

    def tally(
        target: str, method: str, decide: Callable[[np.ndarray], int | None]
    ) -> ResolutionResult:
        return _tally(target, method, [(decide(rows), data) for rows in chunks], len(chunks[0]))

    results = []
    for name, (first, second) in pairs.items():
        e, x = entries[name], truth[name]
        results.append(
            tally(
                name, "known pair", lambda rows, e=e, x=x: _known_pair(e[rows], x[rows], basis, rng)
            )
        )
        one_hot = name == "targets" and sample.kind == "classification"
        for h in _statistics_for(x, one_hot):
            results.append(
                tally(
                    name,
                    h,
                    lambda rows, h=h, a=first, b=second: resolve_by_statistics(
                        (a[rows], b[rows]), h
                    ),
                )
            )
    (f0, f1), (t0, t1) = pairs["features"], pairs["targets"]
    results.append(
        tally(
            "features + targets",
            "supervision",
            lambda rows: resolve_by_supervision((f0[rows], f1[rows]), (t0[rows], t1[rows])),
        )
    )
    return attacked, results


def _split_like(flat: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut a flat channel back into the update's named arrays (their logical shapes)."""
    out, start = {}, 0
    for name, a in arrays.items():
        size = int(np.prod(a.shape[:-2]))
        out[name] = flat[start : start + size].reshape(a.shape[:-2])
        start += size
    return out


def _attack_updates(
    config: ExperimentConfig,
    data: TaskData,
    key: MoreKey,
    sites: int,
    max_examples: int,
    rng: np.random.Generator,
) -> tuple[_Attacked | None, list[ResolutionResult], list[str]]:
    """The aggregator's view: each site's encrypted update after one local round, nothing else.

    Returns the ciphertext-only recovery of all updates, the per-update trials of the two ways
    to pick the channel, and the refusals of sites whose shadow health check failed.
    """
    model = initial_model(config)
    m = min(max_examples, len(data.x_test))
    loss = loss_of(data)
    public = (data.x_test[:m], plain_targets(data.y_test[:m], loss, dtype_of(config)), loss)
    start = initial_arrays(config)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    outcomes: dict[str, list[tuple[int | None, int]]] = {
        "known pair": [],
        "evaluation": [],
    }
    refused = []
    for site_id in range(min(sites, config.sites.count)):
        try:
            arrays = EncryptedSite(config, site_id, key).train(start, 1).arrays
        except SiteError as exc:
            refused.append(str(exc))
            continue
        entries = np.concatenate([_entries64(a).reshape(-1, 2, 2) for a in arrays.values()])
        truth = channels(entries, key.matrix)[0]  # the update's plaintext, by definition
        basis = equivalent_key(entries)
        pair = channels(entries, basis)
        candidates = (_split_like(pair[0], arrays), _split_like(pair[1], arrays))
        decision = resolve_by_evaluation(candidates, model, *public)
        data_channel = _data_channel(pair, truth)
        outcomes["known pair"].append((_known_pair(entries, truth, basis, rng), data_channel))
        outcomes["evaluation"].append((decision, data_channel))
        parts.append((entries, truth, pair[0 if decision is None else decision]))
    if not parts:
        return None, [], refused
    attacked = _Attacked(
        "model update",
        *(np.concatenate(column) for column in zip(*parts, strict=True)),
        "evaluation",
        None,
    )
    trials = [_tally("model update", method, picks, 1) for method, picks in outcomes.items()]
    return attacked, trials, refused


def run_attack(
    config: ExperimentConfig,
    out_dir: Path | None = None,
    *,
    max_examples: int = 2000,
    trials: int = 20,
    sites: int = 3,
) -> AttackReport:
    """Attack an experiment's encrypted data and model updates; write ``report.md`` and PNGs.

    Encrypts up to ``max_examples`` training examples of site 0 with the federation key, as
    that site does, and runs one local training round of up to ``sites`` sites to get the updates an
    aggregator receives (a site whose health check fails sends nothing and is listed). The
    ways of picking the data channel are each tried on ``trials`` disjoint chunks of the
    examples, and once per update. Files go to ``out_dir`` (default ``<output_dir>/attack``),
    each written atomically.
    """
    if max_examples < 4:
        raise ValueError(f"max_examples must be at least 4, got {max_examples}")
    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else config.output_dir / "attack"
    rng = np.random.default_rng(config.training.seed)
    key = federation_key(config)
    share = site_data(config, 0)
    sample = share.subset(np.arange(min(max_examples, len(share.x_train))), np.arange(0))
    attacked, resolutions = _attack_data(config, sample, key, trials, rng)
    update, update_trials, refused = _attack_updates(
        config, load_data(config), key, sites, max_examples, rng
    )
    if update is not None:
        attacked.append(update)
        resolutions += update_trials

    features = attacked[0]
    f_basis = equivalent_key(features.entries)
    feature_key = (f_basis, _known_pair(features.entries, features.truth, f_basis, rng))
    results = tuple(_score(t, feature_key, rng) for t in attacked)
    figures = [out / RECOVERY_PNG]
    atomic_write_bytes(figures[0], _plot_recovery(attacked, results))
    if features.truth.ndim >= 3:
        figures.append(out / IMAGES_PNG)
        atomic_write_bytes(figures[1], _plot_images(features))
    report = AttackReport(
        experiment=config.name,
        task=config.task.name,
        dtype=config.training.dtype,
        fingerprint=key.fingerprint,
        examples=len(sample.x_train),
        updates=update_trials[0].trials if update_trials else 0,
        targets=results,
        resolutions=tuple(resolutions),
        refused=tuple(refused),
        report=out / REPORT,
        figures=tuple(figures),
        seconds=time.perf_counter() - start,
    )
    atomic_write_bytes(report.report, _markdown(config, report).encode())
    return report


# --- report files ---------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _plot_recovery(attacked: list[_Attacked], results: tuple[TargetResult, ...]) -> bytes:
    """Plaintext against the ciphertext-only recovery, one panel per target."""
    fig = Figure(figsize=(4.0 * len(attacked), 3.6), layout="tight")
    axes = fig.subplots(1, len(attacked), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, t, result in zip(axes, attacked, results, strict=True):
        x, got = t.truth.ravel(), t.blind.ravel()
        shown = rng.choice(x.size, size=min(x.size, 4000), replace=False)
        ax.plot(x[shown], got[shown], ".", markersize=2, alpha=0.5)
        lo, hi = float(x.min()), float(x.max())
        ax.plot([lo, hi], [lo, hi], "-", color="gray", linewidth=0.8)
        ax.set_title(f"{t.name}: {_pct(result.blind.rate)} recovered", fontsize=9)
        ax.set_xlabel("plaintext")
        ax.set_ylabel(f"recovered, ciphertext only ({t.blind_by})")
        ax.grid(alpha=0.3)
    return _png(fig)


def _plot_images(features: _Attacked) -> bytes:
    """Per example: the original, one ciphertext entry ``C[..., 0, 1]``, the recovered image."""
    rows = min(4, len(features.truth))
    fig = Figure(figsize=(6.6, 2.2 * rows), layout="tight")
    axes = fig.subplots(rows, 3, squeeze=False)
    titles = ("original", "ciphertext entry C[0, 1]", "recovered (ciphertext only)")
    for i in range(rows):
        images = (features.truth[i], features.entries[i][..., 0, 1], features.blind[i])
        for j, (ax, image) in enumerate(zip(axes[i], images, strict=True)):
            ax.imshow(image.reshape(image.shape[-2:]), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    return _png(fig)


def _fmt_recovery(r: Recovery | None) -> str:
    if r is None:
        return "(defines the truth)"
    return f"{_pct(r.rate)} (max {r.max_err:.1e}, mean {r.mean_err:.1e})"


def _markdown(config: ExperimentConfig, report: AttackReport) -> str:
    lines = [
        f"# {config.name}: attacks on MORE ciphertexts",
        "",
        f"Task `{config.task.name}`, {config.training.dtype} ciphertexts, key fingerprint "
        f"`{report.fingerprint}`. Reproduce with `more-fl attack --config {config.source}`.",
        "",
        f"Attacked: the encrypted features and targets of {report.examples} training examples "
        f"of site 0 (encrypted as the site does), and the encrypted updates of "
        f"{report.updates} site(s) after one local round (what the aggregator receives). The "
        "attacks read ciphertext entries only; the key made the ciphertexts and scores the "
        "result.",
        *(f"Refused to send (health check): {reason}" for reason in report.refused),
        "",
        f"A value counts as recovered when it is within {RTOL:g} of the plaintext, relative "
        "to the largest plaintext magnitude of its target. Errors are absolute.",
        "",
        "## Recovery",
        "",
        "| target | values | eigenvalues contain x | equivalent key + 1 known pair | "
        "key + pair from 1 feature ciphertext | ciphertext only | key holder's decryption |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in report.targets:
        lines.append(
            f"| {t.name} | {t.values} | {_fmt_recovery(t.eigenvalues)} | "
            f"{_fmt_recovery(t.known_pair)} | {_fmt_recovery(t.feature_key)} | "
            f"{_fmt_recovery(t.blind)} by {t.blind_by} | {_fmt_recovery(t.key_holder)} |"
        )
    lines += [
        "",
        "- *eigenvalues contain x*: trace and determinant of each ciphertext give {x, r}; "
        "the closer one is scored (this step alone does not say which is x).",
        "- *equivalent key*: eigenvectors of one ciphertext of the target, then every other "
        "ciphertext decrypted with them; one known plaintext/ciphertext pair picks the channel.",
        "- *ciphertext only*: no pair. The data's channel is the one in which targets are "
        "predictable from features (*supervision*); an update's is the one whose model has "
        "the lower loss on public data of the task (*evaluation*; the task's held-out test "
        "split stands in for public data).",
        "",
        "## Which eigenvalue is the plaintext",
        "",
        "One bit per key: which channel of the equivalent key is the data. Each way of "
        "deciding it was tried on disjoint chunks of examples (or once per site update); ties "
        "count as failures.",
        "",
        "| target | method | right | undecided | trials | examples per trial |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for h in report.resolutions:
        lines.append(
            f"| {h.target} | {h.method} | {h.right}/{h.trials} ({_pct(h.rate)}) | "
            f"{h.undecided} | {h.trials} | {h.examples} |"
        )
    lines += [
        "",
        "- *zeros*: image background is exactly 0; a uniform shadow is almost never 0.",
        "- *smoothness*: neighbouring pixels are close; shadows are independent per pixel.",
        "- *distribution*: the shadow policy is public (uniform over a range, or random valid "
        "labels); the channel farther from it is the data. Useless where the data is itself "
        "uniform (WBC inputs) or its labels are balanced.",
        "- *correlation*: dependent columns (e.g. pressures of one patient) are the data's; "
        "shadow entries are independent.",
        "- *supervision*: targets are predictable from features only in the data channel.",
        "- *evaluation*: the update's data-channel model has the lower loss on public data.",
        "",
        "## Figures",
        "",
        *(f"![{p.stem}]({p.name})" for p in report.figures),
        "",
        "MORE hides values from casual exposure only; see SECURITY.md.",
        "",
    ]
    return "\n".join(lines)
