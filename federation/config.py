"""The one schema: YAML in, a validated, frozen config out.

Only entry points (the CLI, the Flower apps) call :func:`load_experiment` /
:func:`load_deployment`; everything below them receives typed values. Every error names the
file, the dotted key and what was expected. Unknown keys are errors (a typo must not be
silently ignored).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

TASKS = ("mnist", "wbc", "angio", "tabular", "arrays", "images", "dicom")
"""The built-in tasks (``federation.tasks.BUILTIN_TASKS``); ``task.module`` names any other."""
PARTITIONS = ("iid", "non-iid")
DTYPES = ("float32", "float64")
OPTIMIZERS = ("sgd", "adam", "adamw")
ADAMS = ("adam", "adamw")
REFRESH_EVERY_ADAM = 1
"""``encryption.refresh_every``'s default for Adam/AdamW (see :class:`EncryptionConfig`)."""
TARGET_SHADOWS = ("auto", "valid-label", "range", "uniform")


class ConfigError(ValueError):
    """A config file is unreadable or holds a bad key or value."""


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable copy of a frozen option mapping (for keyword arguments)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


class _Reader:
    """Reads one mapping of a YAML file, naming file and dotted key in every error."""

    def __init__(self, source: str, prefix: str, data: Any) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: '{prefix or '<top>'}' must be a mapping, got {data!r}")
        self.source, self.prefix, self.data = source, prefix, dict(data)
        self.used: set[str] = set()

    def _key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: '{self._key(name)}' must be {expected}, got {value!r}")

    def get(self, name: str, default: Any = ..., *, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required or default is ...:
                raise ConfigError(f"{self.source}: '{self._key(name)}' is required")
            return default
        return self.data[name]

    def integer(self, name: str, default: Any = ..., *, minimum: int = 0) -> int:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(name, f"an integer >= {minimum}", v)
        return v

    def number(
        self, name: str, default: Any = ..., *, minimum: float = 0.0, strict: bool = False
    ) -> float:
        v = self.get(name, default)
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise self.fail(name, "a number", v) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(name, "a number", v)
        try:
            number = float(v)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(name, "a finite number", v)
        if not (number > minimum if strict else number >= minimum):
            raise self.fail(name, f"a number {'>' if strict else '>='} {minimum}", v)
        return number

    def choice(self, name: str, options: tuple[str, ...], default: Any = ...) -> str:
        v = self.get(name, default)
        if v not in options:
            raise self.fail(name, f"one of {', '.join(options)}", v)
        return str(v)

    def boolean(self, name: str, default: Any = ...) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise self.fail(name, "true or false", v)
        return v

    def string(self, name: str, default: Any = ...) -> str | None:
        v = self.get(name, default)
        if v is not None and (not isinstance(v, str) or not v):
            raise self.fail(name, "a non-empty string", v)
        if v is not None and "\x00" in v:
            raise self.fail(name, "a string without NUL characters", v)
        return v

    def path(self, name: str, base: Path, default: Any = None) -> Path | None:
        v = self.string(name, default)
        if v is None:
            return None
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else (base / p)

    def mapping(self, name: str) -> Mapping[str, Any]:
        v = self.get(name, {})
        if v is None:
            return MappingProxyType({})
        if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
            raise self.fail(name, "a mapping of option names to values", v)
        return _freeze(v)

    def child(self, name: str) -> _Reader:
        self.used.add(name)
        return _Reader(self.source, self._key(name), self.data.get(name))

    def done(self) -> None:
        """Refuse keys nobody read: typos, and non-string keys (YAML ``1:`` or ``null:``)."""
        unknown = sorted(set(self.data) - self.used, key=lambda k: (isinstance(k, str), str(k)))
        if not unknown:
            return
        expected = f"expected one of: {', '.join(sorted(self.used))}"
        first = unknown[0]
        if not isinstance(first, str):
            raise ConfigError(
                f"{self.source}: key {first!r} in '{self.prefix or '<top>'}' is not a name "
                f"({expected})"
            )
        raise ConfigError(f"{self.source}: unknown key '{self._key(first)}' ({expected})")


def _text(r: _Reader, name: str, default: Any = ...) -> str:
    """A string that may be defaulted but not nulled."""
    v = r.string(name, default)
    if v is None:
        raise r.fail(name, "a non-empty string", v)
    return v


def _fraction(r: _Reader, name: str, default: float) -> float:
    v = r.number(name, default, strict=True)
    if v > 1.0:
        raise r.fail(name, "a fraction in (0, 1]", v)
    return v


def _betas(r: _Reader, name: str, default: tuple[float, float]) -> tuple[float, float]:
    """Adam's two decay rates, each in [0, 1)."""
    v = r.get(name, list(default))
    ok = (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v)
        and all(0.0 <= b < 1.0 for b in v)
    )
    if not ok:
        raise r.fail(name, "two numbers in [0, 1), e.g. [0.9, 0.999]", v)
    return (float(v[0]), float(v[1]))


def _only_for(r: _Reader, chosen: str, keys: Mapping[str, tuple[str, ...]]) -> None:
    """Refuse a key the chosen optimiser would silently ignore."""
    for key, owners in keys.items():
        if key in r.data and chosen not in owners:
            raise ConfigError(
                f"{r.source}: '{r._key(key)}' is not used by optimizer {chosen!r} "
                f"(it is for {', '.join(owners)}); remove it or change 'training.optimizer'"
            )


def _module(r: _Reader, name: str, base: Path) -> Path | str | None:
    """A ``.py`` file (must exist; relative to the config) or a dotted module name."""
    v = r.string(name, None)
    if v is None:
        return None
    if v.endswith(".py"):
        path = Path(os.path.expanduser(v))
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise r.fail(name, "a Python file that exists (relative to the config's folder)", v)
        return path
    if not all(part.isidentifier() for part in v.split(".")):
        raise r.fail(name, "a .py file or an importable module name like 'my_study.task'", v)
    return v


def _factory(r: _Reader, base: Path) -> ModelFactory | None:
    """``"module:function"`` with the module as in :func:`_module`."""
    v = r.string("factory", None)
    if v is None:
        return None
    module, sep, function = v.rpartition(":")
    if not sep or not module or not function.isidentifier():
        raise r.fail("factory", "'module:function', e.g. 'models.py:build_model'", v)
    resolved = _module(_Reader(r.source, r.prefix, {"factory": module}), "factory", base)
    assert resolved is not None
    return ModelFactory(resolved, function)


def _location(r: _Reader, name: str, base: Path, default: Any = ...) -> Path:
    """A path that may be defaulted but not nulled."""
    v = r.path(name, base, default)
    if v is None:
        raise r.fail(name, "a path", None)
    return v


@dataclass(frozen=True)
class TaskConfig:
    """Which task, with keyword options for its ``load_task_data``. ``module``: a study's
    own task module (a ``.py`` file, resolved against the config's folder, or an importable
    dotted name) following the task protocol of :mod:`federation.tasks`."""

    name: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    data_dir: Path | None = None
    module: Path | str | None = None


@dataclass(frozen=True)
class ModelFactory:
    """``model.factory: "module:function"``: a study's function that builds its model."""

    module: Path | str
    function: str

    @property
    def reference(self) -> str:
        return f"{self.module}:{self.function}"


@dataclass(frozen=True)
class ModelConfig:
    """``arch`` (the task's ``build_model``; ``None``: its default) or ``factory`` (a study's
    function), each called with ``options`` as keyword arguments."""

    arch: str | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    factory: ModelFactory | None = None

    @property
    def name(self) -> str:
        """How reports name the model."""
        if self.factory is not None:
            return self.factory.reference
        return self.arch or "the task's default"


@dataclass(frozen=True)
class SitesConfig:
    """Simulated hospitals: how many, and how the task data is split among them."""

    count: int = 3
    partition: str = "iid"
    alpha: float = 0.5


@dataclass(frozen=True)
class TrainingConfig:
    """Local training. ``optimizer`` is torch's SGD (``momentum``), Adam or AdamW (``betas``,
    ``eps``), each with ``weight_decay``. ``keep_optimizer_state``: false starts each round's
    local optimiser afresh (FedAvg's usual rule); true sends the sites' optimiser state
    (momentum, Adam moments: ciphertexts like the weights) with their updates, averages it
    like the weights, checkpoints it and continues from it in the next round."""

    rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    keep_optimizer_state: bool = False
    dtype: str = "float64"
    seed: int = 0


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+ so the aggregator learns only the sum of the sites' updates.

    SecAgg+ works on integers: each site scales its update by ``num_examples / max_weight``,
    clips it to ``[-clipping_range, clipping_range]`` and quantises it; the levels are set
    per round from the site count (see :mod:`federation.secagg`). A site whose weighted
    ciphertext entries leave the clipping range refuses rather than be silently clipped.
    ``num_shares`` and ``reconstruction_threshold`` are fractions (of the round's sites and
    of the shares) as in ``SecAggPlusWorkflow``.
    """

    enabled: bool = False
    clipping_range: float = 32.0
    max_weight: float = 10_000.0
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5


@dataclass(frozen=True)
class FederationConfig:
    """``min_sites``: replies needed to aggregate a round; ``encrypted: false`` runs the
    plaintext FedAvg baseline with the same seeds."""

    min_sites: int = 2
    encrypted: bool = True
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)


@dataclass(frozen=True)
class EncryptionConfig:
    """Shadow policy for targets, the key, and the shadow-health limit.

    ``target_shadow: auto`` means valid labels for classification and the target range for
    regression (the design's rule); ``uniform`` exists to demonstrate why not. Without a
    ``key_file`` a simulation derives one shared key from ``key_seed`` (never for real data).
    ``refresh_every``: the site re-encrypts its model every so many optimiser steps (0:
    never), which stops round-off outside the key's algebra from growing. The default is 10
    for SGD and 1 for Adam/AdamW, whose division by ``sqrt(v) + eps`` amplifies that
    round-off wherever a gradient nearly vanishes (measured: a ReLU MLP on a patient table
    diverged in 8 Adam steps with 10, and matched plaintext to 1e-11 with 1).
    """

    target_shadow: str = "auto"
    key_file: Path | None = None
    key_seed: int = 1234
    health_limit: float = 1e4  # federation.more.health.DEFAULT_LIMIT (a test holds them equal)
    refresh_every: int = 10


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    task: TaskConfig
    model: ModelConfig
    sites: SitesConfig
    training: TrainingConfig
    federation: FederationConfig
    encryption: EncryptionConfig
    output_dir: Path
    source: str = "<dict>"


def experiment_from_dict(
    data: Any, *, source: str = "<dict>", base: Path | None = None
) -> ExperimentConfig:
    """Validate a parsed experiment mapping; ``base`` resolves relative paths."""
    base = base or Path.cwd()
    top = _Reader(source, "", data)
    name = _text(top, "name")

    t = top.child("task")
    module = _module(t, "module", base)
    if module is None:
        task_name = t.choice("name", TASKS, ...)
    else:
        stem = module.stem if isinstance(module, Path) else module.rpartition(".")[2]
        task_name = _text(t, "name", stem)
    task = TaskConfig(
        name=task_name,
        options=t.mapping("options"),
        data_dir=t.path("data_dir", base),
        module=module,
    )
    t.done()

    m = top.child("model")
    arch = _text(m, "arch") if "arch" in m.data else None  # absent: the task's default
    model = ModelConfig(arch=arch, options=m.mapping("options"), factory=_factory(m, base))
    m.done()

    s, d_sites = top.child("sites"), SitesConfig()
    sites = SitesConfig(
        count=s.integer("count", d_sites.count, minimum=1),
        partition=s.choice("partition", PARTITIONS, d_sites.partition),
        alpha=s.number("alpha", d_sites.alpha, strict=True),
    )
    s.done()

    tr, d_tr = top.child("training"), TrainingConfig()
    optimizer = tr.choice("optimizer", OPTIMIZERS, d_tr.optimizer)
    _only_for(tr, optimizer, {"momentum": ("sgd",), "betas": ADAMS, "eps": ADAMS})
    training = TrainingConfig(
        rounds=tr.integer("rounds", d_tr.rounds, minimum=1),
        local_epochs=tr.integer("local_epochs", d_tr.local_epochs, minimum=1),
        batch_size=tr.integer("batch_size", d_tr.batch_size, minimum=1),
        optimizer=optimizer,
        lr=tr.number("lr", d_tr.lr, strict=True),
        momentum=tr.number("momentum", d_tr.momentum),
        betas=_betas(tr, "betas", d_tr.betas),
        eps=tr.number("eps", d_tr.eps, strict=True),
        weight_decay=tr.number("weight_decay", d_tr.weight_decay),
        keep_optimizer_state=tr.boolean("keep_optimizer_state", d_tr.keep_optimizer_state),
        dtype=tr.choice("dtype", DTYPES, d_tr.dtype),
        seed=tr.integer("seed", d_tr.seed),
    )
    tr.done()

    fe = top.child("federation")
    sa, d_sa = fe.child("secure_aggregation"), SecureAggregationConfig()
    secure = SecureAggregationConfig(
        enabled=sa.boolean("enabled", d_sa.enabled),
        clipping_range=sa.number("clipping_range", d_sa.clipping_range, strict=True),
        max_weight=sa.number("max_weight", d_sa.max_weight, strict=True),
        num_shares=_fraction(sa, "num_shares", d_sa.num_shares),
        reconstruction_threshold=_fraction(
            sa, "reconstruction_threshold", d_sa.reconstruction_threshold
        ),
    )
    sa.done()
    d_fe = FederationConfig()
    federation = FederationConfig(
        min_sites=fe.integer("min_sites", min(d_fe.min_sites, sites.count), minimum=1),
        encrypted=fe.boolean("encrypted", d_fe.encrypted),
        secure_aggregation=secure,
    )
    fe.done()
    if secure.enabled and sites.count < 2:
        raise ConfigError(
            f"{source}: 'federation.secure_aggregation.enabled' needs 'sites.count' >= 2 "
            f"(a secure sum over one site is that site's update), got {sites.count}"
        )
    if federation.min_sites > sites.count:
        raise ConfigError(
            f"{source}: 'federation.min_sites' must be <= 'sites.count' ({sites.count}), "
            f"got {federation.min_sites}"
        )

    en, d_en = top.child("encryption"), EncryptionConfig()
    refresh = REFRESH_EVERY_ADAM if training.optimizer in ADAMS else d_en.refresh_every
    encryption = EncryptionConfig(
        target_shadow=en.choice("target_shadow", TARGET_SHADOWS, d_en.target_shadow),
        key_file=en.path("key_file", base),
        key_seed=en.integer("key_seed", d_en.key_seed),
        health_limit=en.number("health_limit", d_en.health_limit, strict=True),
        refresh_every=en.integer("refresh_every", refresh),
    )
    en.done()

    output_dir = _location(top, "output_dir", base, f"runs/{name}")
    top.done()
    return ExperimentConfig(
        name=name,
        task=task,
        model=model,
        sites=sites,
        training=training,
        federation=federation,
        encryption=encryption,
        output_dir=output_dir,
        source=source,
    )


def _read_yaml(path: str | os.PathLike[str]) -> tuple[Any, Path]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")), p
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None


def load_experiment(path: str | os.PathLike[str], base: Path | None = None) -> ExperimentConfig:
    """Load an experiment YAML; relative paths in it resolve against ``base``, by default
    the file's own directory (so a config works from any working directory)."""
    data, p = _read_yaml(path)
    config = experiment_from_dict(data, source=str(p), base=base or p.resolve().parent)
    check_site_count(config, config.sites.count, "'sites.count'")
    return config


# --- Deployments: one SuperLink and one SuperNode per site (``more-fl deploy``) -------------


@dataclass(frozen=True)
class TlsConfig:
    """TLS between SuperNodes, the ``flwr`` CLI and the SuperLink.

    ``generate`` writes a private CA and a server certificate for the SuperLink host into
    ``cert_dir`` when they are missing; otherwise ``cert_dir`` must hold ``ca.crt``,
    ``server.pem`` and ``server.key``.
    """

    enabled: bool = True
    generate: bool = True
    cert_dir: Path | None = None


@dataclass(frozen=True)
class DeploySite:
    """One hospital's SuperNode: which experiment site it is and its own data and key.

    ``port`` is the SuperNode's local ClientApp API; sites sharing a host need distinct ones.
    """

    name: str
    site_id: int
    port: int
    data_dir: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class DeploymentConfig:
    """A federation on real Flower processes. ``work_dir`` holds logs, certificates,
    SuperNode authentication keys and one Flower home per process. ``key_file``: the
    federation key of every site that names none of its own; ``generate_key`` makes it
    when missing (one machine only: across hosts it travels by the hospitals' channel)."""

    experiment: Path
    host: str
    port: int
    tls: TlsConfig
    node_auth: bool
    auth_dir: Path
    sites: tuple[DeploySite, ...]
    work_dir: Path
    output_dir: Path | None = None
    key_file: Path | None = None
    generate_key: bool = False
    round_timeout: float = 600.0
    timeout: float = 3600.0
    source: str = "<dict>"

    def site(self, name: str) -> DeploySite:
        for s in self.sites:
            if s.name == name:
                return s
        names = ", ".join(s.name for s in self.sites)
        raise ConfigError(f"{self.source}: no site named {name!r} (sites: {names})")


def _port(r: _Reader, name: str, default: Any = ...) -> int:
    v = r.integer(name, default, minimum=1)
    if v > 65535:
        raise r.fail(name, "a port number (1..65535)", v)
    return v


def deployment_from_dict(data: Any, *, source: str = "<dict>", base: Path) -> DeploymentConfig:
    """Validate a parsed deployment mapping; relative paths resolve against ``base``."""
    top = _Reader(source, "", data)
    experiment = _location(top, "experiment", base)
    work_dir = _location(top, "work_dir", base, "runs/deploy")

    sl = top.child("superlink")
    host = _text(sl, "host", "127.0.0.1")
    port = _port(sl, "port", 9092)
    sl.done()

    t = top.child("tls")
    tls = TlsConfig(
        enabled=t.boolean("enabled", TlsConfig.enabled),
        generate=t.boolean("generate", TlsConfig.generate),
        cert_dir=t.path("cert_dir", base) or work_dir / "certs",
    )
    t.done()

    a = top.child("node_auth")
    node_auth = a.boolean("enabled", False)
    auth_dir = a.path("key_dir", base) or work_dir / "node-keys"
    a.done()
    if node_auth and not tls.enabled:
        raise ConfigError(f"{source}: 'node_auth.enabled' needs 'tls.enabled: true'")

    k = top.child("key")
    key_file = k.path("file", base)
    generate_key = k.boolean("generate", DeploymentConfig.generate_key)
    k.done()
    if generate_key and key_file is None:
        raise ConfigError(f"{source}: 'key.generate' needs 'key.file' (where to write it)")

    raw_sites = top.get("sites", required=True)
    if not isinstance(raw_sites, list) or not raw_sites:
        raise top.fail("sites", "a non-empty list of sites", raw_sites)
    sites = []
    for i, item in enumerate(raw_sites):
        s = _Reader(source, f"sites[{i}]", item)
        sites.append(
            DeploySite(
                name=_text(s, "name", f"site-{i}"),
                site_id=s.integer("id", i),
                port=_port(s, "port", port + 1 + i),
                data_dir=s.path("data_dir", base),
                key_file=s.path("key_file", base) or key_file,
            )
        )
        s.done()
    for attr in ("name", "site_id", "port"):
        values = [getattr(s, attr) for s in sites]
        if len(set(values)) != len(values):
            raise ConfigError(f"{source}: 'sites' must not repeat a {attr}, got {values}")
    if port in {s.port for s in sites}:
        raise ConfigError(f"{source}: a site port equals 'superlink.port' ({port})")

    r = top.child("run")
    output_dir = r.path("output_dir", base)
    round_timeout = r.number("round_timeout", DeploymentConfig.round_timeout, strict=True)
    timeout = r.number("timeout", DeploymentConfig.timeout, strict=True)
    r.done()
    top.done()
    return DeploymentConfig(
        experiment=experiment,
        host=host,
        port=port,
        tls=tls,
        node_auth=node_auth,
        auth_dir=auth_dir,
        sites=tuple(sites),
        work_dir=work_dir,
        output_dir=output_dir,
        key_file=key_file,
        generate_key=generate_key,
        round_timeout=round_timeout,
        timeout=timeout,
        source=source,
    )


def load_deployment(path: str | os.PathLike[str]) -> DeploymentConfig:
    """Load a deployment YAML; relative paths in it resolve against the file's directory."""
    data, p = _read_yaml(path)
    return deployment_from_dict(data, source=str(p), base=p.resolve().parent)


def find_experiment(reference: str, *, project_dir: str, app_dir: Path) -> Path:
    """The experiment file a Flower run names: an absolute path, else relative to
    ``project_dir`` when the run config names one, else relative to ``app_dir`` (the app that
    ``flwr run`` submitted, as Flower installed it). Never the working directory: in
    simulation that is wherever the long-lived local SuperLink was first started, possibly
    another checkout."""
    p = Path(os.path.expanduser(reference))
    if p.is_absolute():
        candidate = p
    else:
        candidate = (Path(project_dir).expanduser() if project_dir else app_dir) / p
    if candidate.is_file():
        return candidate.resolve()
    where = "the run config's project-dir" if project_dir else "the submitted app"
    raise ConfigError(f"experiment {reference!r} not found in {where} (looked at {candidate})")


def check_site_count(config: ExperimentConfig, count: int, where: str) -> None:
    """Refuse a site count the task's data cannot give every site a train and a test
    example (so 1,000 sites on 800 test rows fail here, once, not in round 1 at each site)."""
    from federation.tasks import task_module  # task modules import torch: only when needed

    options = {**config.task.options, "data_dir": config.task.data_dir}
    module = None if config.task.module is None else str(config.task.module)
    split_sizes = getattr(task_module(config.task.name, module), "split_sizes", None)
    if split_sizes is None:
        return
    try:
        sizes = split_sizes(options)
    except (TypeError, ValueError):  # a malformed option: the task's loader names it
        return
    if sizes is not None and count > min(sizes):
        raise ConfigError(
            f"{config.source}: {where} is {count}, but task {config.task.name!r} has "
            f"{sizes[0]} train and {sizes[1]} test examples: at most {min(sizes)} sites can "
            "each get both"
        )


def with_site_count(config: ExperimentConfig, count: int) -> ExperimentConfig:
    """The experiment run by ``count`` sites (a simulation's node count decides it)."""
    if count == config.sites.count:
        return config
    check_site_count(config, count, "the number of sites")
    secure = config.federation.secure_aggregation.enabled
    needed = max(config.federation.min_sites, 2 if secure else 1)
    if count < needed:
        raise ConfigError(
            f"{config.source}: the federation has {count} site(s) but needs at least {needed} "
            "('federation.min_sites', or 2 for secure aggregation): simulate more SuperNodes "
            "(--federation-config 'num-supernodes=N') or lower federation.min_sites"
        )
    return replace(config, sites=replace(config.sites, count=count))


def _field_value(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return os.path.relpath(value, base) if value.is_absolute() else str(value)
    if isinstance(value, Mapping):
        return {str(k): _field_value(v, base) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_field_value(v, base) for v in value]
    return value


def experiment_fields(config: ExperimentConfig) -> dict[str, Any]:
    """Every setting that shapes training, as dotted keys (``training.lr``: 0.05).

    Paths are written relative to the experiment file, so two hosts that installed the same
    app agree; ``output_dir`` (where results go) and ``name`` are left out.
    """
    base = Path(config.source).resolve().parent if config.source != "<dict>" else Path.cwd()
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if is_dataclass(value):
                walk(f"{key}.", value)
            else:
                out[key] = _field_value(value, base)

    for section in ("task", "model", "sites", "training", "federation", "encryption"):
        walk(f"{section}.", getattr(config, section))
    return out


def fields_digest(values: Mapping[str, Any]) -> str:
    """A short SHA-256 of :func:`experiment_fields` (how sites and aggregator agree)."""
    text = json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def experiment_digest(config: ExperimentConfig) -> str:
    return fields_digest(experiment_fields(config))


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ (or exist on one side only)."""
    normalised_old = json.loads(json.dumps(old, sort_keys=True, default=str))
    normalised_new = json.loads(json.dumps(new, sort_keys=True, default=str))
    keys = sorted(set(normalised_old) | set(normalised_new))
    return [k for k in keys if normalised_old.get(k, ...) != normalised_new.get(k, ...)]
