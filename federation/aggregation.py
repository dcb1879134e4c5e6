"""The aggregator's library side: the initial model, reply validation, FedAvg, checkpoints.

Nothing here takes a key. The weighted average of ciphertexts is a ciphertext of the
weighted average (both channels are averaged), so FedAvg on MORE updates is exact.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from federation.atomic import atomic_write_bytes
from federation.config import ExperimentConfig
from federation.experiment import dtype_of, initial_model, session_config, train_centralised
from federation.nn.convert import to_encrypted
from federation.nn.optim import optimizer_arrays
from federation.protocol import Mode
from federation.tasks.stats import DataStats


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, empty, not a checkpoint)."""


class InvalidUpdate(ValueError):
    """A site's reply cannot be aggregated (the reason says why)."""


def initial_arrays(config: ExperimentConfig, mode: Mode | None = None) -> dict[str, np.ndarray]:
    """The seeded initial model of a run in ``mode`` (default: the experiment's): key-free
    encodings ``w * I`` (or plain weights), with the optimiser's state before its first step
    when the run keeps it (zeros are key-free)."""
    encrypted = config.federation.encrypted if mode is None else mode is Mode.ENCRYPTED
    model = initial_model(config)
    if encrypted:
        model = to_encrypted(model, None, dtype=dtype_of(config))
    state = dict(model.state_dict())
    if config.training.keep_optimizer_state:
        optimizer = session_config(config).build_optimizer(model, encrypted=encrypted)
        state.update(optimizer_arrays(optimizer, model))
    return {k: v.detach().numpy().copy() for k, v in state.items()}


def expected_shapes(config: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in initial_arrays(config).items()}


def counter_names(arrays: Mapping[str, np.ndarray]) -> frozenset[str]:
    """The integer arrays (batch norm's ``num_batches_tracked``): averaged, then rounded."""
    return frozenset(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.integer))


def validate_arrays(
    arrays: Mapping[str, np.ndarray],
    *,
    expected: Mapping[str, tuple[int, ...]],
    counters: Collection[str] = (),
) -> None:
    """Refuse anything but finite arrays of the expected names and shapes; ``counters`` name
    the arrays that are integers (every other one is floating point)."""
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise InvalidUpdate(f"arrays differ from the model: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            raise InvalidUpdate(f"'{name}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
        kind = np.integer if name in counters else np.floating
        if not np.issubdtype(a.dtype, kind):
            expected_kind = "an integer" if name in counters else "floating point"
            raise InvalidUpdate(f"'{name}' has dtype {a.dtype}, expected {expected_kind}")
        if not np.isfinite(a).all():
            raise InvalidUpdate(f"'{name}' holds non-finite values")


def check_num_examples(num_examples: object) -> None:
    """Refuse an example count that is not a positive integer: it weights the average."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise InvalidUpdate(f"num-examples must be a positive integer, got {num_examples!r}")


def validate_identity(
    num_examples: int,
    fingerprint: str | None,
    *,
    federation_fingerprint: str | None,
    encrypted: bool,
) -> None:
    """Refuse a reply without a positive example count, or under another key than the
    federation's (``federation_fingerprint`` None: not known yet)."""
    check_num_examples(num_examples)
    if encrypted:
        if not fingerprint:
            raise InvalidUpdate("the reply carries no key fingerprint")
        if federation_fingerprint is not None and fingerprint != federation_fingerprint:
            raise InvalidUpdate(
                f"key fingerprint {fingerprint} differs from the federation's "
                f"{federation_fingerprint}: updates under different keys average to garbage"
            )
    elif fingerprint:
        raise InvalidUpdate("a plaintext federation received an encrypted update")


def validate_update(
    arrays: Mapping[str, np.ndarray],
    num_examples: int,
    fingerprint: str | None,
    *,
    expected: Mapping[str, tuple[int, ...]],
    federation_fingerprint: str | None,
    encrypted: bool,
    counters: Collection[str] = (),
) -> None:
    """One site's reply: its identity (:func:`validate_identity`), then its arrays."""
    validate_identity(
        num_examples,
        fingerprint,
        federation_fingerprint=federation_fingerprint,
        encrypted=encrypted,
    )
    validate_arrays(arrays, expected=expected, counters=counters)


def fedavg(updates: list[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """``sum_k n_k w_k / sum_k n_k`` per array, accumulated in float64 (integer arrays,
    counters, rounded to the nearest integer)."""
    if not updates:
        raise ValueError("FedAvg needs at least one update")
    total = float(sum(n for _, n in updates))
    first = updates[0][0]
    out = {}
    for name, ref in first.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for arrays, n in updates:
            acc += (n / total) * np.asarray(arrays[name], dtype=np.float64)
        out[name] = cast_average(acc, ref.dtype)
    return out


def cast_average(average: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """An average in an array's own dtype: integers (counters) are rounded, not truncated."""
    if np.issubdtype(dtype, np.integer):
        average = np.asarray(np.rint(average))  # np.rint gives a scalar for a 0-d array
    return average.astype(dtype)


@dataclass(frozen=True)
class Checkpoint:
    server_round: int
    arrays: dict[str, np.ndarray]
    fingerprint: str | None
    history: list[dict]


class RunStore:
    """A run directory: ``checkpoint.npz`` (global model + state) and ``history.json``.

    Each round is written atomically, so a crash leaves the last completed round intact
    and a restarted aggregator resumes after it.
    """

    CHECKPOINT = "checkpoint.npz"
    HISTORY = "history.json"
    STATISTICS = "statistics.json"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def save_round(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        fingerprint: str | None,
        history: list[dict],
    ) -> None:
        meta = {"server_round": server_round, "fingerprint": fingerprint, "history": history}
        buf = io.BytesIO()
        np.savez(
            buf, __meta__=np.array(json.dumps(meta)), **{f"a/{k}": v for k, v in arrays.items()}
        )
        atomic_write_bytes(self.directory / self.CHECKPOINT, buf.getvalue())
        atomic_write_bytes(self.directory / self.HISTORY, json.dumps(history, indent=2).encode())

    def load_latest(self) -> Checkpoint | None:
        path = self.directory / self.CHECKPOINT
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["__meta__"]))
                arrays = {k[2:]: npz[k] for k in npz.files if k.startswith("a/")}
            return Checkpoint(
                int(meta["server_round"]), arrays, meta["fingerprint"], list(meta["history"])
            )
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            reason = str(exc) or type(exc).__name__
            raise CheckpointError(
                f"{path}: unreadable checkpoint ({reason}); move it away, or rerun with "
                "--run-config 'resume=false', to start this run over"
            ) from None

    def save_statistics(
        self, stats: DataStats, sites: int, *, secure: Mapping[str, object] | None = None
    ) -> None:
        """What the federation's normalisation used (for the report). ``secure``: the
        statistics were summed by SecAgg+, with this accuracy
        (:attr:`federation.secure_stats.SecureStatistics.accuracy`)."""
        summary: dict[str, object] = {
            "sites": sites,
            "rows": stats.features.count,
            "mean": [float(v) for v in stats.features.mean],
            "std": [float(v) for v in stats.features.scale],
        }
        if secure is not None:
            summary["secure"] = dict(secure)
        atomic_write_bytes(self.directory / self.STATISTICS, json.dumps(summary).encode())

    def load_statistics(self) -> dict | None:
        path = self.directory / self.STATISTICS
        if not path.is_file():
            return None
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def clear(self) -> None:
        """Forget this run (starting over): its checkpoint, history and statistics."""
        for name in (self.CHECKPOINT, self.HISTORY, self.STATISTICS):
            (self.directory / name).unlink(missing_ok=True)


def centralised_history(config: ExperimentConfig) -> list[dict[str, float]]:
    """Per-epoch test metrics of centralised plaintext training (the report's reference)."""
    return train_centralised(config, encrypted=False).history


def sum_statistics(replies: list[Mapping[str, np.ndarray]]) -> DataStats:
    """The federation's statistics: the sum of every site's (each checked for the same
    entries, finite values and at least one row; an unfit one is refused naming why)."""
    if not replies:
        raise InvalidUpdate("no site sent its statistics")
    total = None
    for arrays in replies:
        try:
            stats = DataStats.from_dict(arrays)
        except (KeyError, TypeError, ValueError) as exc:  # also non-finite sums or extremes
            raise InvalidUpdate(f"malformed statistics: {exc}") from None
        if stats.features.count < 1:
            raise InvalidUpdate(f"statistics over {stats.features.count} rows")
        try:
            total = stats if total is None else total + stats
        except ValueError as exc:
            raise InvalidUpdate(f"statistics do not add up: {exc}") from None
    assert total is not None
    return total


def statistics_json(stats: DataStats) -> str:
    """The federation statistics as sent to every site (JSON, in each message's config)."""
    return json.dumps({k: np.asarray(v).tolist() for k, v in stats.to_dict().items()})
