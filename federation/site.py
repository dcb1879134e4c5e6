"""One hospital's work in a federation round: the site holds the key, nothing else does.

Encrypts its share of the task data once (cached between rounds), trains the received
global model on ciphertexts (the trainer never sees the key), checks both channels with the
key before replying, and evaluates by encrypted inference, decrypting only predictions.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from federation.ciphercache import cached_encrypt
from federation.config import ExperimentConfig
from federation.experiment import (
    EncryptedSplit,
    SimulationKeyError,
    dtype_of,
    federation_key,
    initial_model,
    load_data,
    load_raw_data,
    loss_of,
    session_config,
    site_data,
    with_statistics,
)
from federation.more.cipher import decrypt
from federation.more.health import check_tensors, diagnose
from federation.more.keys import MoreKey
from federation.nn.convert import (
    encrypted_buffers,
    encrypted_parameters,
    load_encrypted_state,
    to_encrypted,
)
from federation.nn.losses import plain_loss
from federation.nn.optim import optimizer_arrays, split_arrays
from federation.nn.refresh import model_ciphertexts, refresh_in_place
from federation.nn.session import (
    EncryptedSession,
    PlainSession,
    SessionConfig,
    TrainingDivergedError,
    plain_targets,
    predict_encrypted,
)
from federation.protocol import Mode
from federation.secure_stats import SiteValues
from federation.tasks.base import TaskData
from federation.tasks.stats import DataStats, data_stats


class SiteError(RuntimeError):
    """The site refuses to send an update (e.g. its shadow channel diverged)."""


@dataclass(frozen=True)
class LocalUpdate:
    arrays: dict[str, np.ndarray]
    num_examples: int
    fingerprint: str | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class LocalEvaluation:
    num_examples: int
    metrics: dict[str, float]


def round_seed(config: ExperimentConfig, site_id: int, server_round: int) -> int:
    """Batch-order seed of a site's local training in a round (same in both modes)."""
    return config.training.seed * 1_000_003 + server_round * 1_009 + site_id


class Site(ABC):
    """A hospital site agent's library side (Flower only unpacks and packs around it).

    Two kinds behind this one interface, chosen by :meth:`for_node` from the run's mode:
    :class:`EncryptedSite` (holds the key, trains on ciphertexts) and :class:`PlainSite`
    (the plaintext baseline, simulation only). Data, statistics and metrics are common."""

    mode: Mode

    def __init__(
        self,
        config: ExperimentConfig,
        site_id: int,
        *,
        deployed: bool = False,
        own_data: bool = False,
    ) -> None:
        self.config, self.site_id = config, site_id
        self.deployed, self.own_data = deployed, own_data
        self.data: TaskData = load_data(config) if own_data else site_data(config, site_id)
        self._statistics: str | None = None

    @staticmethod
    def for_node(
        config: ExperimentConfig,
        site_id: int,
        *,
        mode: Mode | None = None,
        deployed: bool = False,
        own_data: bool = False,
        cache_dir: Path | None = None,
    ) -> Site:
        """The site for a run in ``mode`` (default: the experiment's). A deployed site
        refuses the seeded simulation key and draws its shadow values from OS randomness
        (the training seed is public); a simulated site keeps both. ``own_data``: the site's
        data folder is its own (a SuperNode's ``data-dir``), used whole; otherwise the site
        takes its share of the experiment's data. ``cache_dir``: where its ciphertexts
        persist between processes (``federation.ciphercache``)."""
        if mode is None:
            mode = Mode.ENCRYPTED if config.federation.encrypted else Mode.PLAINTEXT
        if mode is Mode.PLAINTEXT:
            return PlainSite(config, site_id, deployed=deployed, own_data=own_data)
        try:
            key = federation_key(config, deployed=deployed)
        except SimulationKeyError as exc:
            raise SiteError(f"site {site_id}: {exc}") from None
        return EncryptedSite(
            config, site_id, key, deployed=deployed, own_data=own_data, cache_dir=cache_dir
        )

    @functools.cached_property
    def _raw_data(self) -> TaskData:
        """The site's data before federation statistics, read once: the statistics query,
        every secure statistics pass and the normalisation all start from it."""
        if self.own_data:
            return load_raw_data(self.config)
        return site_data(self.config, self.site_id, raw=True)

    def statistics(self) -> dict[str, np.ndarray]:
        """This site's contribution to the federation statistics (counts, sums, sums of
        squares, min and max per feature of its raw data); only these numbers leave."""
        return data_stats(self._raw_data).to_dict()

    def statistics_values(self) -> SiteValues:
        """This site's raw values for the secure statistics passes (they never leave as
        such: only each pass's bounded vector, masked)."""
        return SiteValues.of(self._raw_data)

    def statistics_pass(self, name: str, parameters: str) -> tuple[dict[str, np.ndarray], int]:
        """This site's vectors of secure statistics pass ``name`` given its public
        ``parameters`` (JSON), and its row count (the SecAgg+ weight); SiteError if they do
        not fit its data."""
        values = self.statistics_values()
        try:
            given = json.loads(parameters)
            return values.vectors(name, given if isinstance(given, Mapping) else {}), values.rows
        except ValueError as exc:  # also malformed JSON
            raise SiteError(f"site {self.site_id} refuses the statistics pass: {exc}") from None

    def use_statistics(self, statistics: str) -> None:
        """Normalise with the federation's statistics (JSON of their arrays), once per
        distinct value: the encrypted data is redone only when they change."""
        if statistics == self._statistics:
            return
        arrays = {k: np.asarray(v) for k, v in json.loads(statistics).items()}
        self.data = with_statistics(self.config, self._raw_data, DataStats.from_dict(arrays))
        self._statistics = statistics

    @property
    def fingerprint(self) -> str | None:
        """The key's fingerprint (``None``: a plaintext site holds no key)."""
        return None

    def _session_config(self, server_round: int) -> SessionConfig:
        return session_config(self.config, seed=round_seed(self.config, self.site_id, server_round))

    def _arrays(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
        """The reply: the model's ``state_dict``, and the optimiser state when it is kept."""
        state = dict(model.state_dict())
        if self.config.training.keep_optimizer_state:
            state.update(optimizer_arrays(optimizer, model))
        return {k: v.detach().numpy() for k, v in state.items()}

    def _metrics(self, outputs: torch.Tensor) -> LocalEvaluation:
        """Test loss and the task's metrics of this site's (decrypted) test outputs."""
        loss, dtype = loss_of(self.data), dtype_of(self.config)
        y = plain_targets(self.data.y_test, loss, dtype)
        metrics = {
            "loss": float(plain_loss(loss, outputs, y)),
            **self.data.metrics(outputs, self.data.y_test),
        }
        return LocalEvaluation(len(self.data.x_test), metrics)

    @abstractmethod
    def train(self, arrays: Mapping[str, np.ndarray], server_round: int) -> LocalUpdate:
        """Local training from the global model ``arrays``; the update to send."""

    @abstractmethod
    def evaluate(self, arrays: Mapping[str, np.ndarray], server_round: int) -> LocalEvaluation:
        """Test metrics of the global model on this site's test split (only metrics leave)."""


class PlainSite(Site):
    """The plaintext baseline: the same training on the plain data, same seeds."""

    mode = Mode.PLAINTEXT

    def _model(
        self, arrays: Mapping[str, np.ndarray]
    ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
        model_arrays, optimizer_state = split_arrays(arrays)
        model = initial_model(self.config)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in model_arrays.items()})
        return model, optimizer_state

    def train(self, arrays: Mapping[str, np.ndarray], server_round: int) -> LocalUpdate:
        model, optimizer_state = self._model(arrays)
        session = PlainSession(
            model,
            self.data.x_train,
            self.data.y_train,
            loss=loss_of(self.data),
            config=self._session_config(server_round),
            optimizer_state=optimizer_state,
        )
        session.train()
        n = len(self.data.x_train)
        return LocalUpdate(self._arrays(model, session.optimizer), n, None, {})

    def evaluate(self, arrays: Mapping[str, np.ndarray], server_round: int) -> LocalEvaluation:
        model, _ = self._model(arrays)
        model.eval()
        with torch.no_grad():
            return self._metrics(model(self.data.x_test.to(dtype_of(self.config))))


class EncryptedSite(Site):
    """Trains on its data encrypted under the federation key, which never leaves it."""

    mode = Mode.ENCRYPTED

    def __init__(
        self,
        config: ExperimentConfig,
        site_id: int,
        key: MoreKey,
        *,
        deployed: bool = False,
        own_data: bool = False,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(config, site_id, deployed=deployed, own_data=own_data)
        self._key, self.cache_dir = key, cache_dir
        self._split: EncryptedSplit | None = None

    @property
    def fingerprint(self) -> str:
        return self._key.fingerprint

    def use_statistics(self, statistics: str) -> None:
        if statistics != self._statistics:
            self._split = None  # new normalisation: new plaintexts to encrypt
        super().use_statistics(statistics)

    def _encrypted(self) -> EncryptedSplit:
        """Encrypted once per data, key and settings: kept on the object between rounds of
        one process, and in ``cache_dir`` (if any) between processes."""
        if self._split is None:
            seed = None if self.deployed else self.config.training.seed * 7919 + self.site_id
            self._split = cached_encrypt(
                self.cache_dir, self.config, self.site_id, self.data, self._key, seed
            )
        return self._split

    def _model(
        self, arrays: Mapping[str, np.ndarray]
    ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
        """The received global model, and its optimiser state when the run keeps one."""
        model_arrays, optimizer_state = split_arrays(arrays)
        twin = to_encrypted(initial_model(self.config), None, dtype=dtype_of(self.config))
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in model_arrays.items()}
        # A global model is under the federation key (or key-free in round 1). Re-encrypt it:
        # whatever the aggregation left outside the key's algebra (round-off, or SecAgg+'s
        # quantisation noise) would otherwise grow during training.
        load_encrypted_state(twin, state, self.fingerprint)
        refresh_in_place(model_ciphertexts(twin), self._key)
        return twin, optimizer_state

    def train(self, arrays: Mapping[str, np.ndarray], server_round: int) -> LocalUpdate:
        model, optimizer_state = self._model(arrays)
        split = self._encrypted()
        session = EncryptedSession(
            model,
            split.x_train,
            split.y_train,
            loss=loss_of(self.data),
            config=self._session_config(server_round),
            key=self._key,
            optimizer_state=optimizer_state,
        )
        limit = self.config.encryption.health_limit
        try:
            session.train()
        except TrainingDivergedError as exc:
            batch = session.batches(exc.epoch)[exc.step]
            where = diagnose(model, split.x_train[batch], self._key, limit=limit)
            raise SiteError(f"site {self.site_id}: {exc}; {where}") from exc
        tensors = {**encrypted_parameters(model), **encrypted_buffers(model)}
        report = check_tensors(tensors, self._key, limit=limit)
        if not report.healthy:
            raise SiteError(f"site {self.site_id}: {report.describe()}")
        metrics = {
            "shadow_max": report.shadow_max,
            "data_max": report.data_max,
            "channel_mixing": report.mixing,
        }
        n = len(self.data.x_train)
        return LocalUpdate(self._arrays(model, session.optimizer), n, self.fingerprint, metrics)

    def evaluate(self, arrays: Mapping[str, np.ndarray], server_round: int) -> LocalEvaluation:
        """Encrypted inference on the encrypted test split; only the outputs are decrypted,
        here, and only metrics leave."""
        model, _ = self._model(arrays)
        return self._metrics(decrypt(predict_encrypted(model, self._encrypted().x_test), self._key))
