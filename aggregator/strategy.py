"""Encrypted FedAvg: Flower's FedAvg with every reply validated before it is averaged.

The aggregator never holds the key. Averaging ciphertexts is exact (the weighted average of
ciphertexts is a ciphertext of the weighted average), so the strategy only has to make sure
that it averages *compatible* ciphertexts: the expected arrays with the expected shapes,
finite, and all under one key. Sites prove the key by its fingerprint; the federation's
fingerprint is fixed by the majority of the first aggregated round (then kept in the
checkpoint) and any reply under another key is refused with a logged reason.

Flower's ``FedAvg`` does the sampling and message construction; this class adds a join
grace period, the mode, and replaces both aggregations. :func:`run_rounds` is the round
loop (``Strategy.start`` cannot resume from a checkpoint nor stop on a failed round).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

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

from aggregator.secure import SecureReply, SecureResult, secure_round
from federation import protocol
from federation.aggregation import (
    InvalidUpdate,
    RunStore,
    fedavg,
    sum_statistics,
    validate_arrays,
    validate_identity,
    validate_update,
)
from federation.config import SecureAggregationConfig
from federation.secure_stats import SecureStatistics, StatisticsShape
from federation.tasks.stats import DataStats


class _PassDropout(Exception):
    """Sites left a secure statistics pass (node -> why): the passes start over without them."""

    def __init__(self, dropped: dict[int, str]) -> None:
        super().__init__(", ".join(f"node {n}: {r}" for n, r in dropped.items()))
        self.dropped = dropped


class RoundFailedError(RuntimeError):
    """Fewer than ``min_sites`` valid updates arrived: the round cannot be aggregated.

    Carries the round and its refused replies, so the report can list every one."""

    def __init__(self, message: str, *, mode: str, server_round: int, refused: list) -> None:
        super().__init__(message)
        self.mode, self.server_round, self.refused = mode, server_round, refused


@dataclass
class SiteReply:
    """One site's reply as plain values (``arrays`` empty for an evaluation)."""

    node: int
    site: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    fingerprint: str | None
    metrics: dict[str, float]


@dataclass
class RoundLog:
    """What happened to the replies of one round (kept for the history and the report)."""

    accepted: list[int] = field(default_factory=list)
    refused: list[dict[str, object]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    sites: dict[int, int] = field(default_factory=dict)
    """node -> site id, as far as the federation has learnt it (replies name their site)."""

    def refuse(self, node: int, reason: str, stage: str) -> None:
        site = self.sites.get(node)
        who = f"site {site}" if site is not None else f"node {node}"
        log(WARNING, "%s: refused reply of %s: %s", stage, who, reason)
        entry: dict[str, object] = {"node": node, "stage": stage, "reason": reason}
        if site is not None:
            entry["site"] = site
        self.refused.append(entry)


def _unpack(msg: Message, node: int, *, with_arrays: bool) -> SiteReply:
    """A reply's content as plain values; InvalidUpdate for an error or a malformed reply."""
    if msg.has_error():
        raise InvalidUpdate(f"the site replied with an error: {msg.error.reason}")
    try:
        content = msg.content
        metrics = dict(content[protocol.METRICS])
        identity = content[protocol.SITE]
        num_examples = metrics.pop(protocol.NUM_EXAMPLES)
        arrays = {k: a.numpy() for k, a in content[protocol.ARRAYS].items()} if with_arrays else {}
        fingerprint = identity.get(protocol.FINGERPRINT)
        site = int(identity.get(protocol.SITE_ID, -1))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidUpdate(f"malformed reply ({type(exc).__name__}: {exc})") from None
    return _site_reply(node, site, arrays, num_examples, fingerprint, metrics)


def _site_reply(
    node: int,
    site: int,
    arrays: dict[str, np.ndarray],
    num_examples: Any,
    fingerprint: str | None,
    metrics: Mapping[str, Any],
) -> SiteReply:
    """A SiteReply once its example count and metrics are sound; InvalidUpdate if not."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise InvalidUpdate(f"num-examples must be a positive integer, got {num_examples!r}")
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in metrics.values()
    ):
        raise InvalidUpdate("malformed reply: metrics must be finite numbers")
    values = {k: float(v) for k, v in metrics.items()}
    return SiteReply(node, site, arrays, num_examples, fingerprint, values)


def _secure_reply(r: SecureReply) -> SiteReply:
    """What a site reported in clear beside its masked update; InvalidUpdate if malformed."""
    metrics = dict(r.metrics)
    fingerprint = metrics.pop(protocol.FINGERPRINT, None)
    site = metrics.pop(protocol.SITE_ID, -1)
    if isinstance(site, bool) or not isinstance(site, int):
        raise InvalidUpdate(f"malformed site id {site!r}")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise InvalidUpdate(f"malformed key fingerprint {fingerprint!r}")
    return _site_reply(r.node, site, {}, r.num_examples, fingerprint, metrics)


def _majority(updates: list[SiteReply]) -> tuple[str | None, dict[str | None, int]]:
    """The key fingerprint a strict majority of ``updates`` hold (None on a tie at the top),
    with the counts."""
    counts = Counter(u.fingerprint for u in updates).most_common()
    tie = len(counts) > 1 and counts[0][1] == counts[1][1]
    return (None if tie or not counts else counts[0][0]), dict(counts)


def weighted_metrics(updates: list[SiteReply]) -> dict[str, float]:
    """Example-weighted mean of the metrics every update reports."""
    total = sum(u.num_examples for u in updates)
    names = set.intersection(*(set(u.metrics) for u in updates)) if updates else set()
    return {
        name: sum(u.metrics[name] * u.num_examples for u in updates) / total
        for name in sorted(names)
    }


class EncryptedFedAvg(FedAvg):
    """FedAvg over all connected sites that refuses any reply it cannot safely average.

    ``expected``: names and shapes of the model arrays (``counters``: those that are
    integers); ``fingerprint``: the federation's key
    fingerprint when already known (a resumed run), else fixed by the first aggregated round.
    ``join_timeout``: how long the first round waits for all ``num_sites`` sites to be
    connected before it starts with the ``min_sites`` that are (later rounds do not wait
    for a site that dropped out).
    """

    def __init__(
        self,
        *,
        expected: Mapping[str, tuple[int, ...]],
        encrypted: bool,
        num_sites: int,
        min_sites: int,
        fingerprint: str | None = None,
        join_timeout: float = 60.0,
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
        self.expected = dict(expected)
        self.counters = frozenset(counters)
        self.encrypted = encrypted
        self.mode = protocol.MODE_ENCRYPTED if encrypted else protocol.MODE_PLAINTEXT
        self.num_sites = num_sites
        self.min_sites = min_sites
        self.fingerprint = fingerprint
        self.join_timeout = join_timeout
        self.joined = False
        self.rounds: dict[int, RoundLog] = {}
        self.secure: dict[int, dict[str, object]] = {}
        self.sites: dict[int, int] = {}
        """node -> site id learnt from replies, to name a site that later goes missing."""
        self.settings: dict[str, str | int] = {}
        """Extra entries of every message's CONFIG (the experiment digest, the site count)."""
        self._sent: list[Message] = []

    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog(sites=self.sites))

    def _learn(self, reply: SiteReply) -> None:
        if reply.site >= 0:
            self.sites[reply.node] = reply.site

    def note_missing(self, server_round: int) -> None:
        """Name every known site that neither replied nor was refused this round."""
        round_log = self.round_log(server_round)
        seen = {self.sites.get(n) for n in round_log.accepted}
        seen |= {r.get("site") for r in round_log.refused}
        round_log.missing = sorted(set(self.sites.values()) - seen)
        for site in round_log.missing:
            log(WARNING, "round %d: site %d is missing (no reply)", server_round, site)

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t└──> %s FedAvg: %d sites, %d needed per round, expected key %s",
            self.mode,
            self.num_sites,
            self.min_sites,
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
        config[protocol.MODE] = self.mode
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

    def _queries(self, grid: Grid, extra: Mapping[str, str]) -> list[Message]:
        """One statistics QUERY per connected node, before round 1 (round 0)."""
        config = self._settings(ConfigRecord({protocol.SERVER_ROUND: 0, **extra}))
        return [
            Message(
                RecordDict({protocol.CONFIG: ConfigRecord(dict(config))}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in grid.get_node_ids()
        ]

    def gather_statistics(self, grid: Grid, timeout: float) -> tuple[DataStats, int]:
        """The statistics round before round 1: every site sends the counts, sums, sums of
        squares, min and max of its raw features; their sum and how many sites sent one.
        Raises :class:`RoundFailedError` with fewer than ``min_sites`` valid."""
        self._await_sites(grid)
        self._sent = self._queries(grid, {})
        round_log = RoundLog(sites=self.sites)
        valid = []
        for node, msg in self._by_node(
            grid.send_and_receive(self._sent, timeout=timeout), round_log, "statistics"
        ):
            try:
                reply = _unpack(msg, node, with_arrays=True)
                self._learn(reply)
                valid.append(reply)
            except InvalidUpdate as exc:
                round_log.refuse(node, str(exc), "statistics")
        valid.sort(key=lambda u: (u.site, u.node))
        try:
            if len(valid) < self.min_sites:
                raise InvalidUpdate(f"{len(valid)} sites sent statistics, {self.min_sites} needed")
            total = sum_statistics([u.arrays for u in valid])
        except InvalidUpdate as exc:
            raise RoundFailedError(
                f"the statistics round failed: {exc}",
                mode=self.mode,
                server_round=0,
                refused=round_log.refused,
            ) from None
        log(INFO, "statistics: %d sites, %d rows", len(valid), total.features.count)
        return total, len(valid)

    def gather_secure_statistics(
        self, grid: Grid, timeout: float, secure: SecureAggregationConfig
    ) -> tuple[DataStats, int, dict[str, object]]:
        """The statistics round under secure aggregation: a clear query for each site's row
        count and data sizes only, then the passes of :mod:`federation.secure_stats`, each a
        SecAgg+ round, so the aggregator sees federation averages and never a site's own
        numbers. Returns the statistics, the site count and their accuracy. A site that
        drops out is left out and the passes start over; :class:`RoundFailedError` with
        fewer than ``min_sites``."""
        self._await_sites(grid)
        round_log = RoundLog(sites=self.sites)

        def fail(reason: str) -> RoundFailedError:
            return RoundFailedError(
                f"the statistics round failed: {reason}",
                mode=self.mode,
                server_round=0,
                refused=round_log.refused,
            )

        shapes = self._statistics_shapes(grid, timeout, round_log)
        counts = Counter(shape for _, shape in shapes.values())
        if not counts:
            raise fail(f"0 sites sent their data sizes, {self.min_sites} needed")
        shape = counts.most_common(1)[0][0]
        rows = {}
        for node, (n, other) in shapes.items():
            if other == shape:
                rows[node] = n
            else:
                round_log.refuse(
                    node, f"its data has sizes {other}, the federation's {shape}", "statistics"
                )
        while True:
            if len(rows) < self.min_sites:
                raise fail(f"{len(rows)} sites in the secure statistics, {self.min_sites} needed")
            try:
                gathering = self._secure_passes(grid, rows, shape, secure, timeout)
            except _PassDropout as exc:
                for node, reason in exc.dropped.items():
                    round_log.refuse(node, f"left the secure statistics: {reason}", "statistics")
                    rows.pop(node, None)
                continue
            except (InvalidUpdate, ValueError) as exc:
                raise fail(str(exc)) from None
            stats = gathering.result()
            log(
                INFO,
                "secure statistics: %d sites, %d rows, error bound %.2e per average",
                len(rows),
                sum(rows.values()),
                gathering.bound,
            )
            return stats, len(rows), gathering.accuracy

    def _statistics_shapes(
        self, grid: Grid, timeout: float, round_log: RoundLog
    ) -> dict[int, tuple[int, StatisticsShape]]:
        """Each answering node's row count and data sizes (the clear part of the query)."""
        self._sent = self._queries(grid, {protocol.STATISTICS_PASS: protocol.STATISTICS_SHAPE})
        shapes = {}
        for node, msg in self._by_node(
            grid.send_and_receive(self._sent, timeout=timeout), round_log, "statistics"
        ):
            try:
                reply = _unpack(msg, node, with_arrays=False)
                self._learn(reply)
                shapes[node] = (reply.num_examples, StatisticsShape.from_metrics(reply.metrics))
            except (InvalidUpdate, ValueError) as exc:
                round_log.refuse(node, str(exc), "statistics")
        return shapes

    def _secure_passes(
        self,
        grid: Grid,
        rows: Mapping[int, int],
        shape: StatisticsShape,
        secure: SecureAggregationConfig,
        timeout: float,
    ) -> SecureStatistics:
        """Every pass through SecAgg+ over the nodes in ``rows``; :class:`_PassDropout` if
        one leaves (the averages of the passes must be over the same sites)."""
        nodes = sorted(rows)
        gathering = SecureStatistics(shape, [rows[n] for n in nodes])
        # Every entry lies in [-1, 1] and each site's weight is its rows over the largest
        # count: the tightest quantisation, whatever the training updates need.
        settings = replace(secure, clipping_range=1.0, max_weight=float(max(rows.values())))
        while (name := gathering.next_pass) is not None:
            config = self._settings(
                ConfigRecord(
                    {
                        protocol.SERVER_ROUND: 0,
                        protocol.STATISTICS_PASS: name,
                        protocol.STATISTICS_PARAMETERS: json.dumps(gathering.parameters()),
                    }
                )
            )
            template = ArrayRecord({k: Array(v) for k, v in gathering.template().items()})
            sent = [
                Message(
                    RecordDict(
                        {protocol.ARRAYS: template, protocol.CONFIG: ConfigRecord(dict(config))}
                    ),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                )
                for node in nodes
            ]
            result = secure_round(grid, sent, 0, settings, timeout)
            dropped = {
                node: result.errors.get(node, "left the protocol") for node in result.dropped
            }
            for r in result.replies:
                reply = _secure_reply(r)  # InvalidUpdate for a malformed one: the sum is spoilt
                self._learn(reply)
                if reply.num_examples != rows[r.node]:
                    dropped[r.node] = (
                        f"it weighted pass {name!r} by {reply.num_examples} rows, "
                        f"not the {rows[r.node]} it reported"
                    )
            if dropped:
                raise _PassDropout(dropped)
            if result.average is None:
                raise InvalidUpdate(f"SecAgg+ halted in pass {name!r}")
            gathering.absorb(result.average, result.bound)
            log(INFO, "secure statistics: pass %s done", name)
        return gathering

    def _by_node(
        self, replies: Iterable[Message], round_log: RoundLog, stage: str
    ) -> list[tuple[int, Message]]:
        """Each reply with the node it answers for (the SuperLink itself signs the error
        reply of a node that went offline), and a refusal for every message unanswered."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        pairs = []
        for msg in replies:
            origin = msg.metadata.reply_to_message_id
            pairs.append((sent.pop(origin, msg.metadata.src_node_id), msg))
        for node in sent.values():
            round_log.refuse(node, "no reply within the round timeout", stage)
        return pairs

    def _agreed_fingerprint(self, updates: list[SiteReply], round_log: RoundLog) -> str | None:
        """The federation's key: kept if known, else the strict majority of this round."""
        if self.fingerprint is not None or not self.encrypted or not updates:
            return self.fingerprint
        majority, counts = _majority(updates)
        if majority is None:
            for u in updates:
                round_log.refuse(
                    u.node,
                    f"no majority among key fingerprints {counts}: sites disagree on "
                    "the key, so no update can be trusted",
                    "train",
                )
            updates.clear()
        return majority

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then FedAvg the valid ones if there are ``min_sites``."""
        round_log = self.round_log(server_round)
        candidates: list[SiteReply] = []
        for node, msg in self._by_node(replies, round_log, "train"):
            try:
                update = _unpack(msg, node, with_arrays=True)
                self._learn(update)
                validate_update(
                    update.arrays,
                    update.num_examples,
                    update.fingerprint,
                    expected=self.expected,
                    federation_fingerprint=self.fingerprint,
                    encrypted=self.encrypted,
                    counters=self.counters,
                )
            except InvalidUpdate as exc:
                round_log.refuse(node, str(exc), "train")
                continue
            candidates.append(update)
        fingerprint = self._agreed_fingerprint(candidates, round_log)
        valid = []
        for u in candidates:
            if self.encrypted and u.fingerprint != fingerprint:
                round_log.refuse(
                    u.node,
                    f"key fingerprint {u.fingerprint} differs from the federation's "
                    f"{fingerprint}: updates under different keys average to garbage",
                    "train",
                )
            else:
                valid.append(u)
        round_log.accepted = [u.node for u in valid]
        log(
            INFO,
            "aggregate_train: %d valid updates, %d refused (need %d)",
            len(valid),
            len(round_log.refused),
            self.min_sites,
        )
        if len(valid) < self.min_sites:
            return None, None
        self.fingerprint = fingerprint
        # A fixed order (by site) makes the floating-point sum, so a resumed or repeated
        # run, bit-for-bit reproducible whatever order the replies arrived in.
        valid.sort(key=lambda u: (u.site, u.node))
        averaged = fedavg([(u.arrays, u.num_examples) for u in valid])
        arrays = ArrayRecord({k: Array(averaged[k]) for k in self.expected})
        return arrays, MetricRecord(weighted_metrics(valid))

    def aggregate_secure(
        self, server_round: int, result: SecureResult
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Accept a SecAgg+ average only if every site in the sum was a valid, same-key
        update: one bad update cannot be taken out of a sum, so it spoils the round."""
        round_log = self.round_log(server_round)
        self.secure[server_round] = {
            "levels": result.levels,
            "error_bound": result.bound,
        }
        for node in result.dropped:
            halted = "the protocol halted before the sum" if result.average is None else None
            reason = result.errors.get(node) or halted or "left the protocol"
            round_log.refuse(node, f"dropped out of the secure round: {reason}", "train")
        replies: list[SiteReply] = []
        for r in result.replies:
            try:
                reply = _secure_reply(r)
                self._learn(reply)
                # Key agreement is settled below, over the whole sum.
                validate_identity(
                    reply.num_examples,
                    reply.fingerprint,
                    federation_fingerprint=None,
                    encrypted=self.encrypted,
                )
                replies.append(reply)
            except InvalidUpdate as exc:
                round_log.refuse(r.node, f"{exc}; it is in the secure sum", "train")
                return None, None
        if self.encrypted and replies:
            majority, _ = _majority(replies)
            agreed = self.fingerprint or majority
            strays = [u for u in replies if u.fingerprint != agreed]
            if agreed is None or strays:
                for u in strays or replies:
                    round_log.refuse(
                        u.node,
                        f"key fingerprint {u.fingerprint} differs from the federation's "
                        f"{agreed}: the secure sum mixes keys and is refused",
                        "train",
                    )
                # A known majority key lets a retry tell the stray sites to stand aside.
                self.fingerprint = self.fingerprint or majority
                return None, None
            self.fingerprint = agreed
        if result.average is None or len(replies) < self.min_sites:
            log(
                INFO, "aggregate_secure: %d sites in the sum, need %d", len(replies), self.min_sites
            )
            return None, None
        try:  # each reply's identity was checked above; the sum has only its arrays
            validate_arrays(result.average, expected=self.expected, counters=self.counters)
        except InvalidUpdate as exc:
            round_log.refuse(-1, f"the secure sum is malformed: {exc}", "train")
            return None, None
        round_log.accepted = [u.node for u in replies]
        log(INFO, "aggregate_secure: sum of %d updates (bound %.2e)", len(replies), result.bound)
        arrays = ArrayRecord({k: Array(result.average[k]) for k in self.expected})
        return arrays, MetricRecord(weighted_metrics(replies))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted test metrics of the sites that answered under the federation's
        key (metrics computed under another key are meaningless)."""
        round_log = self.round_log(server_round)
        results = []
        for node, msg in self._by_node(replies, round_log, "evaluate"):
            try:
                result = _unpack(msg, node, with_arrays=False)
                self._learn(result)
                if self.encrypted and result.fingerprint != self.fingerprint:
                    raise InvalidUpdate(
                        f"key fingerprint {result.fingerprint} differs from the federation's "
                        f"{self.fingerprint}"
                    )
            except InvalidUpdate as exc:
                round_log.refuse(node, str(exc), "evaluate")
                continue
            results.append(result)
        results.sort(key=lambda u: (u.site, u.node))
        return MetricRecord(weighted_metrics(results)) if results else None


def run_rounds(
    strategy: EncryptedFedAvg,
    grid: Grid,
    store: RunStore,
    *,
    initial: dict[str, np.ndarray],
    num_rounds: int,
    round_timeout: float,
    resume: bool = True,
    secure: SecureAggregationConfig | None = None,
) -> list[dict]:
    """Run rounds until ``num_rounds``, checkpointing each; resumes after the last
    checkpointed round. Raises :class:`RoundFailedError` when a round cannot be aggregated
    (the checkpoint keeps every completed round). ``secure``: train rounds through SecAgg+."""
    checkpoint = store.load_latest() if resume else None
    if checkpoint is not None:
        if set(checkpoint.arrays) != set(strategy.expected) or any(
            tuple(checkpoint.arrays[k].shape) != tuple(s) for k, s in strategy.expected.items()
        ):
            raise ValueError(
                f"{store.directory}: the checkpoint holds another model than this experiment's; "
                "move it away or run with resume=false"
            )
        arrays, history = checkpoint.arrays, list(checkpoint.history)
        strategy.fingerprint = checkpoint.fingerprint
        first = checkpoint.server_round + 1
        log(
            INFO,
            "resuming %s after round %d from %s",
            strategy.mode,
            checkpoint.server_round,
            store.directory,
        )
    else:
        arrays, history, first = initial, [], 1
    for server_round in range(first, num_rounds + 1):
        log(INFO, "[%s ROUND %d/%d]", strategy.mode.upper(), server_round, num_rounds)
        start = time.perf_counter()
        record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
        if secure is not None and secure.enabled:
            aggregated, train_metrics = _train_secure(
                strategy, grid, server_round, record, secure, round_timeout
            )
        else:
            sent = list(strategy.configure_train(server_round, record, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(sent, timeout=round_timeout))
            aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        round_log = strategy.round_log(server_round)
        if aggregated is None:
            strategy.note_missing(server_round)
            raise RoundFailedError(
                f"{len(round_log.accepted)} valid updates, {strategy.min_sites} needed"
                + (f" ({_reasons(round_log.refused)})" if round_log.refused else ""),
                mode=strategy.mode,
                server_round=server_round,
                refused=round_log.refused,
            )
        arrays = {k: a.numpy() for k, a in aggregated.items()}
        sent = list(strategy.configure_evaluate(server_round, aggregated, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(sent, timeout=round_timeout))
        evaluation = strategy.aggregate_evaluate(server_round, replies)
        strategy.note_missing(server_round)
        entry = {
            "round": server_round,
            "train": dict(train_metrics or {}),
            "evaluate": dict(evaluation or {}),
            "sites": len(round_log.accepted),
            "refused": round_log.refused,
            "missing": round_log.missing,
            "seconds": time.perf_counter() - start,
        }
        if server_round in strategy.secure:
            entry["secure"] = strategy.secure[server_round]
        history.append(entry)
        store.save_round(server_round, arrays, strategy.fingerprint, history)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in list((evaluation or {}).items())[:4])
        log(INFO, "round %d: %d sites; test %s", server_round, len(round_log.accepted), shown)
    return history


def _reasons(refused: list[dict[str, object]]) -> str:
    """The distinct refusal reasons with the sites (or nodes) that gave each."""
    by_reason: dict[str, list[str]] = {}
    for r in refused:
        who = f"site {r['site']}" if "site" in r else f"node {r['node']}"
        by_reason.setdefault(str(r["reason"]), []).append(who)
    return "; ".join(f"{', '.join(who)}: {reason}" for reason, who in by_reason.items())


def _train_secure(
    strategy: EncryptedFedAvg,
    grid: Grid,
    server_round: int,
    record: ArrayRecord,
    secure: SecureAggregationConfig,
    timeout: float,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One SecAgg+ train round; run again once if it failed only because sites disagreed
    on the key before the federation's was known (now it is, stray sites refuse at once)."""
    for _ in range(2):
        known = strategy.fingerprint
        sent = list(strategy.configure_train(server_round, record, ConfigRecord(), grid))
        result = (
            secure_round(grid, sent, server_round, secure, timeout) if sent else SecureResult(None)
        )
        aggregated, metrics = strategy.aggregate_secure(server_round, result)
        if aggregated is not None or known is not None or strategy.fingerprint is None:
            return aggregated, metrics
        log(INFO, "secure round %d: retrying with the federation's key announced", server_round)
        strategy.rounds[server_round] = RoundLog(
            refused=strategy.rounds[server_round].refused, sites=strategy.sites
        )
    return aggregated, metrics
