"""``more-fl attack``: the attacks applied to an experiment's encrypted data and to the
encrypted model updates an aggregator receives, scored against the plaintext."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

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
from federation.nn.session import plain_targets
from federation.site import EncryptedSite, SiteError
from federation.tasks.base import TaskData
from federation.tools.attacks.maths import (
    ChannelPair,
    channels,
    eigenvalue_pairs,
    entries64,
    equivalent_key,
    resolve_by_evaluation,
    resolve_by_statistics,
    resolve_by_supervision,
    resolve_known_pair,
)
from federation.tools.attacks.plots import plot_images, plot_recovery
from federation.tools.attacks.report import markdown
from federation.tools.attacks.results import (
    RTOL,
    Attacked,
    AttackReport,
    Recovery,
    ResolutionResult,
    TargetResult,
)

REPORT = "report.md"
RECOVERY_PNG = "recovery.png"
IMAGES_PNG = "images.png"


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


def _score(
    t: Attacked, feature_key: tuple[np.ndarray, int], rng: np.random.Generator
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
) -> tuple[list[Attacked], list[ResolutionResult]]:
    """Encrypt a site's examples, recover them ciphertext-only, and try every way of picking
    the data channel on ``trials`` disjoint chunks of examples."""
    split = encrypt_data(config, sample, key, seed=config.training.seed)
    entries = {"features": split.x_train.entries, "targets": split.y_train.entries}
    entries = {name: entries64(e) for name, e in entries.items()}
    plain = encryption_inputs(config, sample)  # exactly what encrypt_data encrypted
    truth = {
        "features": plain.x_train.double().numpy(),
        "targets": plain.targets.double().numpy(),
    }
    basis = equivalent_key(entries["features"])
    pairs = {name: channels(e, basis) for name, e in entries.items()}
    decision = resolve_by_supervision(pairs["features"], pairs["targets"])
    attacked = [
        Attacked(
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
) -> tuple[Attacked | None, list[ResolutionResult], list[str]]:
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
        entries = np.concatenate([entries64(a).reshape(-1, 2, 2) for a in arrays.values()])
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
    attacked = Attacked(
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
    atomic_write_bytes(figures[0], plot_recovery(attacked, results))
    if features.truth.ndim >= 3:
        figures.append(out / IMAGES_PNG)
        atomic_write_bytes(figures[1], plot_images(features))
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
    atomic_write_bytes(report.report, markdown(config, report).encode())
    return report
