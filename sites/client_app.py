"""The hospital's Flower ClientApp: unpack a message, run the site's work, pack the reply.

All the work is :class:`federation.site.Site`'s; this module only translates between Flower
records and the library. A ``Site`` is built once per (experiment, site, mode, local paths)
and cached for the life of the process: in simulation the process lives for the whole run, so
the data is encrypted once; a deployed SuperNode starts a fresh ClientApp process per message
and rebuilds it (the encryption is seeded, so the ciphertexts are the same every round).

Any failure, a :class:`~federation.site.SiteError` (e.g. a diverged shadow channel) or
anything else, becomes an ``Error`` reply with a one-line reason: the update is never sent,
and the traceback stays in the site's own log.

When the aggregator runs secure aggregation, Flower's ``secaggplus_mod`` wraps ``train``:
the update leaves the site only quantised and masked. A site whose experiment enables
secure aggregation refuses to send an update any other way.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from logging import DEBUG, ERROR
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, log, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from federation import protocol
from federation.ciphercache import cache_dir
from federation.config import (
    ConfigError,
    ExperimentConfig,
    experiment_digest,
    find_experiment,
    load_experiment,
    with_site_count,
)
from federation.more.keys import KeyFileError
from federation.secagg import check_quantisable
from federation.site import Site, SiteError

APP_DIR = Path(__file__).resolve().parents[1]
"""more-fl's own app root: the project checkout, or the copy Flower installed from the FAB."""

_SITES: dict[tuple[str, int, str, str, str], Site] = {}


@functools.lru_cache(maxsize=8)
def _experiment(path: Path) -> ExperimentConfig:
    return load_experiment(path)


def _experiment_path(run_config: dict, app_dir: Path) -> Path:
    """The run's experiment file: absolute, or in the run config's ``project-dir``, or in
    the app as Flower installed it (never the process's working directory)."""
    return find_experiment(
        str(run_config[protocol.RUN_EXPERIMENT]),
        project_dir=str(run_config.get(protocol.RUN_PROJECT_DIR, "")),
        app_dir=app_dir,
    )


def site_identity(node_config: dict, num_sites: int) -> tuple[int, bool]:
    """``(site id, simulated)`` from the node config: ``site-id`` on a deployed SuperNode,
    ``partition-id`` in simulation (where the site count is the node count)."""
    if protocol.NODE_SITE_ID in node_config:
        site_id, simulated = int(node_config[protocol.NODE_SITE_ID]), False
    elif protocol.NODE_PARTITION_ID in node_config:
        partitions = int(node_config.get(protocol.NODE_NUM_PARTITIONS, num_sites))
        if partitions != num_sites:
            raise SiteError(
                f"the simulation has {partitions} nodes but the aggregator runs {num_sites} sites"
            )
        site_id, simulated = int(node_config[protocol.NODE_PARTITION_ID]), True
    else:
        raise SiteError(
            f"the node config names no site: start the SuperNode with "
            f"--node-config '{protocol.NODE_SITE_ID}=<0..{num_sites - 1}>'"
        )
    if not 0 <= site_id < num_sites:
        raise SiteError(f"site id {site_id} is outside 0..{num_sites - 1} of this federation")
    return site_id, simulated


def site_config(config: ExperimentConfig, node_config: dict) -> ExperimentConfig:
    """The experiment as this site runs it: its own data directory and key file (node config)
    override the experiment's."""
    task, encryption = config.task, config.encryption
    if node_config.get(protocol.NODE_DATA_DIR):
        data_dir = Path(str(node_config[protocol.NODE_DATA_DIR])).expanduser()
        task = replace(task, data_dir=data_dir)
    if node_config.get(protocol.NODE_KEY_FILE):
        key_file = Path(str(node_config[protocol.NODE_KEY_FILE])).expanduser()
        encryption = replace(encryption, key_file=key_file)
    return replace(config, task=task, encryption=encryption)


def _site(msg: Message, context: Context, app_dir: Path) -> tuple[Site, int]:
    """The cached Site this message is for, and the server round."""
    path = _experiment_path(context.run_config, app_dir)
    config = _experiment(path)
    settings = msg.content[protocol.CONFIG]
    expected = settings.get(protocol.EXPERIMENT_DIGEST)
    digest = experiment_digest(config)
    if expected is not None and digest != expected:
        raise SiteError(
            f"this site loaded {path} (settings digest {digest}) but the aggregator runs "
            f"settings {expected}: the SuperNode holds another copy of the app or experiment"
        )
    num_sites = int(settings.get(protocol.NUM_SITES, config.sites.count))
    site_id, simulated = site_identity(context.node_config, num_sites)
    config = with_site_count(config, num_sites)
    try:
        mode = protocol.Mode(str(settings[protocol.MODE]))
    except ValueError:
        raise SiteError(
            f"unknown mode {settings[protocol.MODE]!r}; expected one of {', '.join(protocol.MODES)}"
        ) from None
    if mode is protocol.Mode.PLAINTEXT and config.federation.encrypted and not simulated:
        raise SiteError(
            f"site {site_id} refuses to send plaintext updates: experiment {config.name!r} is "
            "encrypted (the plaintext baseline runs in simulation only)"
        )
    node = context.node_config
    cache_key = (
        f"{path}#{digest}",
        site_id,
        mode,
        simulated,  # a deployed site never reuses a simulated one (its key and shadows)
        str(node.get(protocol.NODE_DATA_DIR, "")),
        str(node.get(protocol.NODE_KEY_FILE, "")),
    )
    if cache_key not in _SITES:
        _SITES[cache_key] = Site.for_node(
            site_config(config, node),
            site_id,
            mode=mode,
            deployed=not simulated,
            own_data=bool(node.get(protocol.NODE_DATA_DIR)),
            cache_dir=None if simulated else cache_dir(node.get(protocol.NODE_CACHE_DIR)),
        )
    site = _SITES[cache_key]
    statistics = settings.get(protocol.STATISTICS)
    if statistics is not None:
        site.use_statistics(str(statistics))
    federation_fingerprint = settings.get(protocol.FINGERPRINT)
    if federation_fingerprint is not None and site.fingerprint != federation_fingerprint:
        raise SiteError(
            f"site {site_id} holds key {site.fingerprint}, the federation uses "
            f"{federation_fingerprint}: check this site's key file"
        )
    return site, int(settings[protocol.SERVER_ROUND])


def _identity(site_id: int, fingerprint: str | None) -> ConfigRecord:
    record = ConfigRecord({protocol.SITE_ID: site_id})
    if fingerprint is not None:
        record[protocol.FINGERPRINT] = fingerprint
    return record


def _metrics(num_examples: int, metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({protocol.NUM_EXAMPLES: num_examples, **metrics})


def _arrays(msg: Message) -> dict:
    return {name: a.numpy() for name, a in msg.content[protocol.ARRAYS].items()}


def _error_reply(msg: Message, context: Context, exc: Exception) -> Message:
    """One line in the site's log (the traceback at DEBUG) and an ``Error`` reply with it.

    A refusal the site explains itself (:class:`SiteError`, a config or data error) needs
    no exception type; anything else is a bug and keeps its type in the reason."""
    node = context.node_config
    where = node.get(protocol.NODE_SITE_ID, node.get(protocol.NODE_PARTITION_ID))
    explained = isinstance(exc, (SiteError, ConfigError, KeyFileError, FileNotFoundError))
    reason = str(exc) if explained else f"{type(exc).__name__}: {exc}"
    if where is not None and not reason.startswith(f"site {where}"):
        reason = f"site {where}: {reason}"
    log(ERROR, "site %s: %s refused: %s", where, msg.metadata.message_type, reason)
    log(DEBUG, "site %s: %s failed", where, msg.metadata.message_type, exc_info=exc)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _secure_round(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def _fitres_reply(msg: Message, context: Context, reply: Message) -> Message:
    """``train``'s reply as the legacy ``fitres`` that ``secaggplus_mod`` masks, once the
    update is known to fit the announced quantisation (clipping would corrupt it)."""
    if reply.has_error():
        raise SiteError(reply.error.reason)
    announced = context.state.config_records[protocol.SECURE_SETTINGS]
    content = reply.content
    update = content[protocol.ARRAYS]
    # The global model's order, which is the aggregator's: the masked vector has no names.
    arrays = {name: update[name].numpy() for name in msg.content[protocol.ARRAYS]}
    metrics = dict(content[protocol.METRICS])
    num_examples = int(metrics.pop(protocol.NUM_EXAMPLES))
    try:
        check_quantisable(
            arrays,
            num_examples,
            clipping_range=float(announced[Key.CLIPPING_RANGE]),
            max_weight=float(announced[Key.MAX_WEIGHT]),
            levels=int(announced[Key.TARGET_RANGE]),
        )
    except ValueError as exc:
        raise SiteError(f"site refuses to send its update: {exc}") from None
    fitres = FitRes(
        status=Status(Code.OK, "OK"),
        parameters=ndarrays_to_parameters(list(arrays.values())),
        num_examples=num_examples,
        metrics={**metrics, **dict(content[protocol.SITE])},
    )
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ around ``train`` when the aggregator asks for it (the message
    carries its stage); remember the announced quantisation to check the update against."""
    if not _secure_round(msg):
        return call_next(msg, context)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) == Stage.SETUP:
        context.state.config_records[protocol.SECURE_SETTINGS] = ConfigRecord(
            {k: configs[k] for k in (Key.CLIPPING_RANGE, Key.MAX_WEIGHT, Key.TARGET_RANGE)}
        )

    def masked_train(inner: Message, ctx: Context) -> Message:
        return _fitres_reply(inner, ctx, call_next(inner, ctx))

    return secaggplus_mod(msg, context, masked_train)


def train(msg: Message, context: Context, app_dir: Path = APP_DIR) -> Message:
    """Local training on the site's encrypted data; replies with the encrypted update. A
    secure statistics pass (a SecAgg+ round, never unmasked) replies with its vectors."""
    try:
        site, server_round = _site(msg, context, app_dir)
        settings = msg.content[protocol.CONFIG]
        if protocol.STATISTICS_PASS in settings:
            if not _secure_round(msg):
                raise SiteError(f"site {site.site_id} refuses to send a statistics pass unmasked")
            arrays, num_examples = site.statistics_pass(
                str(settings[protocol.STATISTICS_PASS]),
                str(settings.get(protocol.STATISTICS_PARAMETERS, "{}")),
            )
            metrics: dict[str, float] = {}
            fingerprint = site.fingerprint
        else:
            if site.config.federation.secure_aggregation.enabled and not _secure_round(msg):
                raise SiteError(
                    f"site {site.site_id} refuses to send an unmasked update: experiment "
                    f"{site.config.name!r} requires secure aggregation"
                )
            update = site.train(_arrays(msg), server_round)
            arrays, num_examples = update.arrays, update.num_examples
            metrics, fingerprint = update.metrics, update.fingerprint
    except Exception as exc:  # every failure is an error reply, never a partial update
        return _error_reply(msg, context, exc)
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            protocol.METRICS: _metrics(num_examples, metrics),
            protocol.SITE: _identity(site.site_id, fingerprint),
        }
    )
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, app_dir: Path = APP_DIR) -> Message:
    """Test metrics of the global model on the site's test split (only metrics leave)."""
    try:
        site, server_round = _site(msg, context, app_dir)
        result = site.evaluate(_arrays(msg), server_round)
    except Exception as exc:  # same contract as train
        return _error_reply(msg, context, exc)
    content = RecordDict(
        {
            protocol.METRICS: _metrics(result.num_examples, result.metrics),
            protocol.SITE: _identity(site.site_id, site.fingerprint),
        }
    )
    return Message(content, reply_to=msg)


def statistics(msg: Message, context: Context, app_dir: Path = APP_DIR) -> Message:
    """The site's feature statistics for the federation's normalisation (only these leave).

    Under secure aggregation the statistics come in SecAgg+ passes (``train``), so the site
    answers the query with only its row count and the sizes of its data, and refuses to send
    its statistics in clear."""
    try:
        site, _ = _site(msg, context, app_dir)
        if msg.content[protocol.CONFIG].get(protocol.STATISTICS_PASS) == protocol.STATISTICS_SHAPE:
            values = site.statistics_values()
            content = RecordDict(
                {
                    protocol.METRICS: _metrics(values.rows, values.shape.to_metrics()),
                    protocol.SITE: _identity(site.site_id, site.fingerprint),
                }
            )
            return Message(content, reply_to=msg)
        if site.config.federation.secure_aggregation.enabled:
            raise SiteError(
                f"site {site.site_id} refuses to send its statistics in clear: experiment "
                f"{site.config.name!r} requires secure aggregation"
            )
        arrays = site.statistics()
    except Exception as exc:  # same contract as train
        return _error_reply(msg, context, exc)
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            protocol.METRICS: _metrics(int(arrays["features.count"].sum()), {}),
            protocol.SITE: _identity(site.site_id, site.fingerprint),
        }
    )
    return Message(content, reply_to=msg)


def create_app(app_dir: Path) -> ClientApp:
    """The site agent of the Flower app rooted at ``app_dir`` (where its experiment files
    are): more-fl's own app below, or a study made with ``more-fl new``."""
    client = ClientApp()

    @client.train(mods=[secure_aggregation])
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, app_dir)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, app_dir)

    @client.query()
    def _statistics(msg: Message, context: Context) -> Message:
        return statistics(msg, context, app_dir)

    return client


app = create_app(APP_DIR)
