"""From a validated experiment config to data, models and training runs (no Flower here).

Shared by the CLI (``more-fl train``), the site agent and the aggregator, so every entry
point builds the same seeded model and the same data split.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from federation.config import ExperimentConfig, thaw
from federation.more.cipher import FeatureRange, ShadowPolicy, decrypt, encrypt
from federation.more.health import check_tensors
from federation.more.keys import MoreKey, generate_key, load_key
from federation.more.tensor import EncryptedTensor
from federation.nn.check import Deviation
from federation.nn.convert import encrypted_parameters, to_encrypted, to_plain
from federation.nn.session import (
    EncryptedSession,
    PlainSession,
    SessionConfig,
    encode_targets,
    predict_encrypted,
    target_shadow,
)
from federation.tasks import model_factory, task_module
from federation.tasks.base import TaskData, default_site_partition
from federation.tasks.stats import DataStats, prepare


def dtype_of(config: ExperimentConfig) -> torch.dtype:
    return torch.float64 if config.training.dtype == "float64" else torch.float32


def loss_of(data: TaskData) -> str:
    return "cross_entropy" if data.kind == "classification" else "mse"


def session_config(
    config: ExperimentConfig, *, epochs: int | None = None, seed: int | None = None
) -> SessionConfig:
    """The experiment's training settings for a session (one place reads them): a site's
    local epochs and the run's seed unless ``epochs`` and the batch-order ``seed`` are given."""
    t = config.training
    hyper: dict[str, object] = {"lr": t.lr, "weight_decay": t.weight_decay}
    if t.optimizer == "sgd":
        hyper["momentum"] = t.momentum
    else:
        hyper.update(betas=t.betas, eps=t.eps)
    return SessionConfig(
        optimizer=t.optimizer,
        hyper=hyper,
        batch_size=t.batch_size,
        epochs=t.local_epochs if epochs is None else epochs,
        refresh_every=config.encryption.refresh_every,
        dtype=dtype_of(config),
        seed=t.seed if seed is None else seed,
    )


def task_of(config: ExperimentConfig) -> ModuleType:
    """The experiment's task module (built-in, or the study's own ``task.module``)."""
    module = config.task.module
    return task_module(config.task.name, None if module is None else str(module))


@functools.lru_cache(maxsize=8)
def _load(
    loader: str, name: str, module: str | None, options: str, data_dir: str | None, seed: int
) -> TaskData:
    kwargs = json.loads(options)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    return getattr(task_module(name, module), loader)(seed=seed, **kwargs)


def _task_data(config: ExperimentConfig, loader: str) -> TaskData:
    """``loader`` of the task (cached per process: simulated sites share one copy; the
    options, nested mappings included, are the cache key as canonical JSON)."""
    options = json.dumps(thaw(config.task.options), sort_keys=True, default=str)
    data_dir = None if config.task.data_dir is None else str(config.task.data_dir)
    module = None if config.task.module is None else str(config.task.module)
    return _load(loader, config.task.name, module, options, data_dir, config.training.seed)


def load_data(config: ExperimentConfig) -> TaskData:
    """The whole task data, ready to train."""
    return _task_data(config, "load_task_data")


def load_raw_data(config: ExperimentConfig) -> TaskData:
    """The task's data before normalisation (features in their own units)."""
    return _task_data(config, "load_raw")


def site_data(config: ExperimentConfig, site_id: int, *, raw: bool = False) -> TaskData:
    """Site ``site_id``'s share under the configured partition (deterministic from the seed);
    ``raw``: of :func:`load_raw_data` (before federation statistics)."""
    if not 0 <= site_id < config.sites.count:
        raise ValueError(f"site id {site_id} outside 0..{config.sites.count - 1}")
    data = load_raw_data(config) if raw else load_data(config)
    if config.sites.count == 1:
        return data
    partition = getattr(task_of(config), "site_partition", default_site_partition)
    parts = partition(
        data,
        num_sites=config.sites.count,
        scheme=config.sites.partition,
        seed=config.training.seed,
        alpha=config.sites.alpha,
    )
    return parts[site_id]


def takes_statistics(config: ExperimentConfig) -> bool:
    """Whether the task normalises with federation statistics (it offers ``load_raw``)."""
    return callable(getattr(task_of(config), "load_raw", None))


def with_statistics(config: ExperimentConfig, raw: TaskData, stats: DataStats) -> TaskData:
    """A site's raw data normalised with the federation's statistics (or the declared
    values of ``task.options.normalise``)."""
    declared = thaw(config.task.options).get("normalise")
    return prepare(raw, stats, declared=declared, where=f"{config.source}: task {raw.name}")


def initial_model(config: ExperimentConfig) -> nn.Module:
    """The seeded initial plain model: identical in every process that builds it."""
    torch.manual_seed(config.training.seed)
    task = task_of(config)
    options = thaw(config.model.options)
    model_io = getattr(task, "model_io", None)
    io = dict(model_io(thaw(config.task.options))) if model_io is not None else {}
    if config.model.factory is not None:
        factory = model_factory(config.model.factory.reference)
        model = factory(**_accepted(factory, io), **options)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model factory {config.model.factory.reference} returned "
                f"{type(model).__name__}, not a torch.nn.Module"
            )
    else:
        arch = {} if config.model.arch is None else {"arch": config.model.arch}
        model = task.build_model(**arch, **io, **options)
    return model.to(dtype_of(config))


def _accepted(function: Callable[..., object], io: dict[str, object]) -> dict[str, object]:
    """The task's model inputs (``in_features``, ``num_outputs``, ...) that ``function``
    takes: a study's factory may ignore them and hard-code its own sizes."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return io
    return {k: v for k, v in io.items() if k in parameters}


def target_policy(config: ExperimentConfig, data: TaskData) -> ShadowPolicy:
    """The shadow rule for targets: valid labels (classification), the target range (regression)."""
    choice = config.encryption.target_shadow
    if choice == "uniform":
        return FeatureRange(0.0, 1.0)
    if data.kind == "classification":
        if choice == "range":
            raise ValueError("target_shadow 'range' is for regression; use valid-label")
        assert data.num_classes is not None
        return target_shadow(data.y_train, loss_of(data), num_classes=data.num_classes)
    if choice == "valid-label":
        raise ValueError("target_shadow 'valid-label' is for classification; use range")
    return target_shadow(data.y_train, loss_of(data), target_range=data.target_range)


KEY_HOWTO = (
    "make one with `more-fl keygen --out keys/federation.key --parents`, give the file to "
    "every site over the hospitals' own secure channel (never through Flower), and name it in "
    "encryption.key_file (or the SuperNode's --node-config 'key-file=...')"
)


class SimulationKeyError(RuntimeError):
    """A deployed site was asked to use the public, seeded simulation key."""


def federation_key(config: ExperimentConfig, *, deployed: bool = False) -> MoreKey:
    """The site's key: the configured key file, else the simulation key from ``key_seed``.

    ``key_seed`` is in the experiment file, so everyone who has it has that key: a deployed
    site refuses it, and a local run on a site's own data folder warns that it uses it.
    """
    if config.encryption.key_file is not None:
        return load_key(config.encryption.key_file)
    if deployed:
        raise SimulationKeyError(f"this site has no key file: {KEY_HOWTO}")
    private = getattr(task_of(config), "PRIVATE_DATA_DIR", False)
    if config.task.data_dir is not None and private:
        _warn_simulation_key(str(config.task.data_dir))
    return generate_key(config.encryption.key_seed)


@functools.cache
def _warn_simulation_key(data_dir: str) -> None:
    """Once per data folder and process (lru_cache is the 'once')."""
    logging.getLogger("more-fl").warning(
        "warning: encrypting the data in %s with the simulation key from "
        "encryption.key_seed, which anyone with the experiment file can rebuild; for real "
        "data %s",
        data_dir,
        KEY_HOWTO,
    )


@dataclass
class EncryptedSplit:
    """A site's data under its key, kept between rounds (encryption is the costly part)."""

    x_train: EncryptedTensor
    y_train: EncryptedTensor
    x_test: EncryptedTensor
    fingerprint: str


@dataclass(frozen=True)
class EncryptionInputs:
    """Exactly what :func:`encrypt_data` encrypts, and with which shadow policies (one
    definition, so a cache of the ciphertexts can digest the same tensors)."""

    x_train: torch.Tensor
    targets: torch.Tensor
    x_test: torch.Tensor
    features: FeatureRange
    target: ShadowPolicy


def encryption_inputs(config: ExperimentConfig, data: TaskData) -> EncryptionInputs:
    """The site's plain tensors in the run's dtype (targets one-hot for classes)."""
    dtype = dtype_of(config)
    lo, hi = data.feature_range
    policy = target_policy(config, data)
    return EncryptionInputs(
        data.x_train.to(dtype),
        encode_targets(data.y_train, policy, dtype),
        data.x_test.to(dtype),
        FeatureRange(lo, hi),
        policy,
    )


def encrypt_data(
    config: ExperimentConfig, data: TaskData, key: MoreKey, seed: int | None
) -> EncryptedSplit:
    """The site's data under ``key``; ``seed=None`` draws the shadows from OS randomness."""
    plain = encryption_inputs(config, data)
    return EncryptedSplit(
        x_train=encrypt(plain.x_train, key, plain.features, seed=seed),
        y_train=encrypt(plain.targets, key, plain.target, seed=None if seed is None else seed + 1),
        x_test=encrypt(plain.x_test, key, plain.features, seed=None if seed is None else seed + 2),
        fingerprint=key.fingerprint,
    )


@dataclass
class CentralResult:
    """Per-epoch test metrics of one centralised run."""

    mode: str
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = None


def train_centralised(
    config: ExperimentConfig,
    *,
    encrypted: bool,
    key: MoreKey | None = None,
    epochs: int | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    perturb: float = 0.0,
) -> CentralResult:
    """Train on the whole task (plaintext, or encrypted under ``key``) and evaluate each epoch.

    Evaluation of the encrypted model runs encrypted inference and decrypts the predictions
    only, as a site does. Epochs default to rounds x local epochs of the experiment.
    ``perturb`` scales the initial weights by ``1 + perturb``: a plaintext control run that
    measures how much the training itself amplifies round-off.
    """
    data = load_data(config)
    dtype, loss = dtype_of(config), loss_of(data)
    t = config.training
    epochs = t.rounds * t.local_epochs if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    settings = session_config(config, epochs=epochs)
    plain = initial_model(config)
    if perturb:
        with torch.no_grad():
            for p in plain.parameters():
                p.mul_(1.0 + perturb)
    result = CentralResult("encrypted" if encrypted else "plaintext")
    start = time.perf_counter()

    def record(epoch: int, outputs: torch.Tensor) -> None:
        metrics = {"epoch": float(epoch + 1), **data.metrics(outputs, data.y_test)}
        result.history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    if not encrypted:
        x_test = data.x_test.to(dtype)

        def plain_eval(epoch: int, model: nn.Module) -> None:
            model.eval()
            with torch.no_grad():
                record(epoch, model(x_test))
            model.train()

        PlainSession(
            plain, data.x_train, data.y_train, loss=loss, config=settings, callback=plain_eval
        ).train()
        result.model = plain
    else:
        if key is None:
            raise ValueError("encrypted training needs the site's key to encrypt its data")
        split = encrypt_data(config, data, key, seed=t.seed + 7)
        twin = to_encrypted(plain, None, dtype=dtype)

        def enc_eval(epoch: int, model: nn.Module) -> None:
            check_tensors(
                encrypted_parameters(model), key, limit=config.encryption.health_limit
            ).raise_if_unhealthy()
            record(epoch, decrypt(predict_encrypted(model, split.x_test), key))
            model.train()

        EncryptedSession(
            twin,
            split.x_train,
            split.y_train,
            loss=loss,
            config=settings,
            key=key,
            callback=enc_eval,
        ).train()
        result.model = to_plain(twin, key)
    result.seconds = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class SideBySide:
    """Plaintext and encrypted centralised runs of one experiment, same seed."""

    plaintext: CentralResult
    encrypted: CentralResult
    param_abs: float
    param_rel: float
    control_abs: float
    """Deviation of a plaintext run whose initial weights moved by one ulp: how chaotic the
    training itself is. Encrypted-vs-plaintext deviations at this level are round-off
    amplified by the training, not an encryption error."""


def compare_centralised(
    config: ExperimentConfig,
    key: MoreKey,
    *,
    epochs: int | None = None,
    on_epoch: Callable[[str, int, dict[str, float]], None] | None = None,
) -> SideBySide:
    """``more-fl train``: both runs, then the deviation of the decrypted model's weights."""

    def hook(mode: str) -> Callable[[int, dict[str, float]], None] | None:
        if on_epoch is None:
            return None
        return lambda epoch, metrics: on_epoch(mode, epoch, metrics)

    plain = train_centralised(config, encrypted=False, epochs=epochs, on_epoch=hook("plaintext"))
    enc = train_centralised(
        config, encrypted=True, key=key, epochs=epochs, on_epoch=hook("encrypted")
    )
    eps = torch.finfo(dtype_of(config)).eps
    control = train_centralised(config, encrypted=False, epochs=epochs, perturb=eps)
    assert plain.model is not None and enc.model is not None and control.model is not None
    reference = plain.model.state_dict()
    deviation = Deviation.between(enc.model.state_dict(), reference)
    control_abs = Deviation.between(control.model.state_dict(), reference).abs
    return SideBySide(plain, enc, deviation.abs, deviation.rel, control_abs)
