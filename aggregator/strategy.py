"""Encrypted FedAvg over Flower: the round policy of :mod:`federation.rounds` on messages.

Flower's ``FedAvg`` does the sampling and message construction; this class adds a join
grace period, the mode and the federation's key to every message, and reads each reply into
the library's :class:`~federation.rounds.SiteReply` (or a :class:`~federation.rounds.Refusal`)
so that :class:`~federation.rounds.Aggregator` decides what is averaged.
:class:`FlowerTransport` carries :func:`federation.rounds.run_rounds` and the statistics
round over a Grid (``Strategy.start`` cannot resume from a checkpoint nor stop on a failed
round).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aggregator.secure import secure_round
from federation import protocol
from federation.aggregation import InvalidUpdate
from federation.config import SecureAggregationConfig
from federation.rounds import (
    Aggregate,
    Aggregator,
    Answer,
    Refusal,
    RoundLog,
    SecureResult,
    site_reply,
)


def _answer(msg: Message, node: int, *, with_arrays: bool) -> Answer:
    """A reply's content as plain values; a Refusal for an error or a malformed reply."""
    try:
        if msg.has_error():
            raise InvalidUpdate(f"the site replied with an error: {msg.error.reason}")
        try:
            content = msg.content
            metrics = dict(content[protocol.METRICS])
            identity = content[protocol.SITE]
            num_examples = metrics.pop(protocol.NUM_EXAMPLES)
            arrays = (
                {k: a.numpy() for k, a in content[protocol.ARRAYS].items()} if with_arrays else {}
            )
            fingerprint = identity.get(protocol.FINGERPRINT)
            site = int(identity.get(protocol.SITE_ID, -1))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidUpdate(f"malformed reply ({type(exc).__name__}: {exc})") from None
        return site_reply(node, site, arrays, num_examples, fingerprint, metrics)
    except InvalidUpdate as exc:
        return Refusal(node, str(exc))


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _records(aggregate: Aggregate | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """An aggregated round as Flower's records; (None, None) for a failed one."""
    if aggregate is None:
        return None, None
    arrays, metrics = aggregate
    return _record(arrays), MetricRecord(metrics)


class EncryptedFedAvg(FedAvg):
    """FedAvg over all connected sites that refuses any reply it cannot safely average.

    ``expected``, ``encrypted``, ``min_sites``, ``fingerprint``, ``counters``: the
    :class:`~federation.rounds.Aggregator`'s (``policy``). ``join_timeout``: how long the
    first round waits for all ``num_sites`` sites to be connected before it starts with the
    ``min_sites`` that are (later rounds do not wait for a site that dropped out).
    """

    def __init__(
        self,
        *,
        expected: Mapping[str, tuple[int, ...]],
        encrypted: bool,
        num_sites: int,
        min_sites: int,
        fingerprint: str | None = None,
        join_timeout: float = float(protocol.RUN_DEFAULTS[protocol.RUN_JOIN_TIMEOUT]),
        counters: Collection[str] = (),
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
            weighted_by_key=protocol.NUM_EXAMPLES,
            arrayrecord_key=protocol.ARRAYS,
            configrecord_key=protocol.CONFIG,
        )
        self.policy = Aggregator(
            expected=expected,
            encrypted=encrypted,
            min_sites=min_sites,
            fingerprint=fingerprint,
            counters=counters,
        )
        self.num_sites = num_sites
        self.join_timeout = join_timeout
        self.joined = False
        self.settings: dict[str, str | int] = {}
        """Extra entries of every message's CONFIG (the experiment digest, the site count)."""
        self._sent: list[Message] = []

    @property
    def fingerprint(self) -> str | None:
        return self.policy.fingerprint

    @property
    def expected(self) -> dict[str, tuple[int, ...]]:
        return self.policy.expected

    @property
    def rounds(self) -> dict[int, RoundLog]:
        return self.policy.rounds

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t└──> %s FedAvg: %d sites, %d needed per round, expected key %s",
            self.policy.mode,
            self.num_sites,
            self.policy.min_sites,
            self.fingerprint or "(first round)",
        )

    def _await_sites(self, grid: Grid) -> None:
        """Give late sites ``join_timeout`` seconds before the first round starts."""
        deadline = time.monotonic() + self.join_timeout
        while not self.joined and len(list(grid.get_node_ids())) < self.num_sites:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        self.joined = True

    def _settings(self, config: ConfigRecord) -> ConfigRecord:
        """The mode, and the federation's fingerprint once known (a site under another key
        can then refuse at once instead of training on ciphertexts it cannot read)."""
        config[protocol.MODE] = str(self.policy.mode)  # a plain string on the wire
        for name, value in self.settings.items():
            config[name] = value
        if self.fingerprint is not None:
            config[protocol.FINGERPRINT] = self.fingerprint
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._await_sites(grid)
        sent = super().configure_train(server_round, arrays, self._settings(config), grid)
        self._sent = list(sent)
        return self._sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sent = super().configure_evaluate(server_round, arrays, self._settings(config), grid)
        self._sent = list(sent)
        return self._sent

    def queries(self, grid: Grid, extra: Mapping[str, str]) -> list[Message]:
        """One statistics QUERY per connected node, before round 1 (round 0)."""
        self._await_sites(grid)
        config = self._settings(ConfigRecord({protocol.SERVER_ROUND: 0, **extra}))
        self._sent = [
            Message(
                RecordDict({protocol.CONFIG: ConfigRecord(dict(config))}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in grid.get_node_ids()
        ]
        return self._sent

    def pass_messages(
        self, nodes: list[int], config: Mapping[str, str | int], template: ArrayRecord
    ) -> list[Message]:
        """One secure statistics pass's train message per node (SecAgg+ masks the replies)."""
        settings = self._settings(ConfigRecord(dict(config)))
        return [
            Message(
                RecordDict(
                    {protocol.ARRAYS: template, protocol.CONFIG: ConfigRecord(dict(settings))}
                ),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in nodes
        ]

    def answers(self, replies: Iterable[Message], *, with_arrays: bool) -> list[Answer]:
        """Each reply read for the node it answers (the SuperLink itself signs the error
        reply of a node that went offline), after a refusal for every message unanswered."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        pairs = []
        for msg in replies:
            origin = msg.metadata.reply_to_message_id
            pairs.append((sent.pop(origin, msg.metadata.src_node_id), msg))
        silent = [Refusal(node, "no reply within the round timeout") for node in sent.values()]
        return silent + [_answer(msg, node, with_arrays=with_arrays) for node, msg in pairs]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then FedAvg the valid ones if there are ``min_sites``."""
        answers = self.answers(replies, with_arrays=True)
        return _records(self.policy.aggregate_train(server_round, answers))

    def aggregate_secure(
        self, server_round: int, result: SecureResult
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The SecAgg+ average if every site in the sum was a valid, same-key update."""
        return _records(self.policy.aggregate_secure(server_round, result))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted test metrics of the sites under the federation's key."""
        answers = self.answers(replies, with_arrays=False)
        metrics = self.policy.aggregate_evaluate(server_round, answers)
        return None if metrics is None else MetricRecord(metrics)


@dataclass
class FlowerTransport:
    """:class:`federation.rounds.Transport` and ``StatisticsTransport`` over a Flower Grid:
    the strategy's messages, each reply read by the strategy, ``timeout`` seconds a round."""

    strategy: EncryptedFedAvg
    grid: Grid
    timeout: float

    def _exchange(self, sent: Iterable[Message], *, with_arrays: bool) -> list[Answer]:
        replies = self.grid.send_and_receive(list(sent), timeout=self.timeout)
        return self.strategy.answers(replies, with_arrays=with_arrays)

    def send_train(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> list[Answer]:
        record = _record(arrays)
        sent = self.strategy.configure_train(server_round, record, ConfigRecord(), self.grid)
        return self._exchange(sent, with_arrays=True)

    def send_evaluate(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> list[Answer]:
        record = _record(arrays)
        sent = self.strategy.configure_evaluate(server_round, record, ConfigRecord(), self.grid)
        return self._exchange(sent, with_arrays=False)

    def secure_train(
        self, server_round: int, arrays: Mapping[str, np.ndarray], settings: SecureAggregationConfig
    ) -> SecureResult:
        record = _record(arrays)
        sent = list(self.strategy.configure_train(server_round, record, ConfigRecord(), self.grid))
        if not sent:
            return SecureResult(None)
        return secure_round(self.grid, sent, server_round, settings, self.timeout)

    def query_statistics(self, config: Mapping[str, str], *, with_arrays: bool) -> list[Answer]:
        return self._exchange(self.strategy.queries(self.grid, config), with_arrays=with_arrays)

    def secure_pass(
        self,
        nodes: list[int],
        config: Mapping[str, str | int],
        template: Mapping[str, np.ndarray],
        settings: SecureAggregationConfig,
    ) -> SecureResult:
        sent = self.strategy.pass_messages(nodes, config, _record(template))
        return secure_round(self.grid, sent, 0, settings, self.timeout)
