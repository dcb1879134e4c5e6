"""The aggregator's round policy without Flower: what a round averages, under which key, and
the round loop that checkpoints every round and resumes after a crash.

The aggregator never holds the key. Averaging ciphertexts is exact (the weighted average of
ciphertexts is a ciphertext of the weighted average), so the policy only has to make sure
that it averages *compatible* ciphertexts: the expected arrays with the expected shapes,
finite, and all under one key. Sites prove the key by its fingerprint; the federation's
fingerprint is fixed by the majority of the first aggregated round (then kept in the
checkpoint) and any reply under another key is refused with a logged reason.

Messages are a :class:`Transport`'s (Flower's is :class:`aggregator.strategy.FlowerTransport`):
it hands back each site's reply as a :class:`SiteReply` or a :class:`Refusal`, so the policy
and the loop run, and are tested, without Flower.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np

from federation import protocol
from federation.aggregation import (
    InvalidUpdate,
    RunStore,
    check_num_examples,
    fedavg,
    sum_statistics,
    validate_arrays,
    validate_identity,
    validate_update,
)
from federation.config import SecureAggregationConfig
from federation.secure_stats import SecureStatistics, StatisticsShape
from federation.tasks.stats import DataStats

log = logging.getLogger("flwr").log
"""Flower's logger: the round lines read the same whoever carries the messages."""

Arrays = dict[str, np.ndarray]
Aggregate = tuple[Arrays, dict[str, float]]
"""An aggregated round: the averaged arrays (in the model's order) and the weighted metrics."""


class RoundFailedError(RuntimeError):
    """Fewer than ``min_sites`` valid updates arrived: the round cannot be aggregated.

    Carries the round and its refused replies, so the report can list every one."""

    def __init__(self, message: str, *, mode: str, server_round: int, refused: list) -> None:
        super().__init__(message)
        self.mode, self.server_round, self.refused = mode, server_round, refused


class PassDropout(Exception):
    """Sites left a secure statistics pass (node -> why): the passes start over without them."""

    def __init__(self, dropped: dict[int, str]) -> None:
        super().__init__(", ".join(f"node {n}: {r}" for n, r in dropped.items()))
        self.dropped = dropped


@dataclass
class SiteReply:
    """One site's reply as plain values (``arrays`` empty for an evaluation)."""

    node: int
    site: int
    arrays: Arrays
    num_examples: int
    fingerprint: str | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class Refusal:
    """A node whose reply cannot be read at all (an error, a malformed reply, no reply)."""

    node: int
    reason: str


Answer = SiteReply | Refusal


@dataclass
class SecureReply:
    """What the aggregator learns of one site in a secure round: no update, only these."""

    node: int
    num_examples: int
    metrics: dict[str, Any]


@dataclass
class SecureResult:
    """The unmasked weighted average by array name, in the global model's dtypes (``None`` if
    the protocol halted), the sites in it
    (``replies``), the others (``dropped``, with ``errors`` where a site said why)."""

    average: Arrays | None
    replies: list[SecureReply] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    levels: int = 0
    bound: float = 0.0


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


def site_reply(
    node: int,
    site: int,
    arrays: Arrays,
    num_examples: Any,
    fingerprint: str | None,
    metrics: Mapping[str, Any],
) -> SiteReply:
    """A SiteReply once its example count and metrics are sound; InvalidUpdate if not (a
    metric that is not a finite number would spoil the weighted means)."""
    check_num_examples(num_examples)
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in metrics.values()
    ):
        raise InvalidUpdate("malformed reply: metrics must be finite numbers")
    values = {k: float(v) for k, v in metrics.items()}
    return SiteReply(node, site, arrays, num_examples, fingerprint, values)


def secure_site_reply(r: SecureReply) -> SiteReply:
    """What a site reported in clear beside its masked update; InvalidUpdate if malformed."""
    metrics = dict(r.metrics)
    fingerprint = metrics.pop(protocol.FINGERPRINT, None)
    site = metrics.pop(protocol.SITE_ID, -1)
    if isinstance(site, bool) or not isinstance(site, int):
        raise InvalidUpdate(f"malformed site id {site!r}")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise InvalidUpdate(f"malformed key fingerprint {fingerprint!r}")
    return site_reply(r.node, site, {}, r.num_examples, fingerprint, metrics)


def majority(updates: list[SiteReply]) -> tuple[str | None, dict[str | None, int]]:
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


def _by_site(replies: Iterable[SiteReply]) -> list[SiteReply]:
    """A fixed order (by site) makes the floating-point sum, so a resumed or repeated run,
    bit-for-bit reproducible whatever order the replies arrived in."""
    return sorted(replies, key=lambda u: (u.site, u.node))


class Aggregator:
    """The federation's policy: refuses any reply it cannot safely average, FedAvgs the rest
    once there are ``min_sites``, and keeps each round's log.

    ``expected``: names and shapes of the model arrays (``counters``: those that are
    integers); ``fingerprint``: the federation's key fingerprint when already known (a
    resumed run), else fixed by the first aggregated round.
    """

    def __init__(
        self,
        *,
        expected: Mapping[str, tuple[int, ...]],
        encrypted: bool,
        min_sites: int,
        fingerprint: str | None = None,
        counters: Collection[str] = (),
    ) -> None:
        self.expected = dict(expected)
        self.counters = frozenset(counters)
        self.encrypted = encrypted
        self.mode = protocol.MODE_ENCRYPTED if encrypted else protocol.MODE_PLAINTEXT
        self.min_sites = min_sites
        self.fingerprint = fingerprint
        self.rounds: dict[int, RoundLog] = {}
        self.secure: dict[int, dict[str, object]] = {}
        self.sites: dict[int, int] = {}
        """node -> site id learnt from replies, to name a site that later goes missing."""

    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog(sites=self.sites))

    def learn(self, reply: SiteReply) -> None:
        if reply.site >= 0:
            self.sites[reply.node] = reply.site

    def read(
        self, answers: Iterable[Answer], round_log: RoundLog, stage: str
    ) -> Iterator[SiteReply]:
        """The readable replies (each site learnt), every other answer refused, one at a
        time: the refusals a caller adds stay in the order the answers came."""
        for answer in answers:
            if isinstance(answer, Refusal):
                round_log.refuse(answer.node, answer.reason, stage)
            else:
                self.learn(answer)
                yield answer

    def note_missing(self, server_round: int) -> None:
        """Name every known site that neither replied nor was refused this round."""
        round_log = self.round_log(server_round)
        seen = {self.sites.get(n) for n in round_log.accepted}
        seen |= {r.get("site") for r in round_log.refused}
        round_log.missing = sorted(set(self.sites.values()) - seen)
        for site in round_log.missing:
            log(WARNING, "round %d: site %d is missing (no reply)", server_round, site)

    def _agreed_fingerprint(self, updates: list[SiteReply], round_log: RoundLog) -> str | None:
        """The federation's key: kept if known, else the strict majority of this round."""
        if self.fingerprint is not None or not self.encrypted or not updates:
            return self.fingerprint
        agreed, counts = majority(updates)
        if agreed is None:
            for u in updates:
                round_log.refuse(
                    u.node,
                    f"no majority among key fingerprints {counts}: sites disagree on "
                    "the key, so no update can be trusted",
                    "train",
                )
            updates.clear()
        return agreed

    def aggregate_train(self, server_round: int, answers: Iterable[Answer]) -> Aggregate | None:
        """Validate every reply, then FedAvg the valid ones if there are ``min_sites``."""
        round_log = self.round_log(server_round)
        candidates: list[SiteReply] = []
        for update in self.read(answers, round_log, "train"):
            try:
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
                round_log.refuse(update.node, str(exc), "train")
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
            return None
        self.fingerprint = fingerprint
        valid = _by_site(valid)
        averaged = fedavg([(u.arrays, u.num_examples) for u in valid])
        return {k: averaged[k] for k in self.expected}, weighted_metrics(valid)

    def aggregate_secure(self, server_round: int, result: SecureResult) -> Aggregate | None:
        """Accept a SecAgg+ average only if every site in the sum was a valid update under
        the federation's key: one bad update cannot be taken out of a sum, so it spoils the
        round."""
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
                reply = secure_site_reply(r)
                self.learn(reply)
                # The key is compared below, over the whole sum.
                validate_identity(
                    reply.num_examples,
                    reply.fingerprint,
                    federation_fingerprint=None,
                    encrypted=self.encrypted,
                )
                replies.append(reply)
            except InvalidUpdate as exc:
                round_log.refuse(r.node, f"{exc}; it is in the secure sum", "train")
                return None
        if self.encrypted and replies and not self._same_key(replies, round_log):
            return None
        if result.average is None or len(replies) < self.min_sites:
            log(
                INFO, "aggregate_secure: %d sites in the sum, need %d", len(replies), self.min_sites
            )
            return None
        try:  # each reply's identity was checked above; the sum has only its arrays
            validate_arrays(result.average, expected=self.expected, counters=self.counters)
        except InvalidUpdate as exc:
            round_log.refuse(-1, f"the secure sum is malformed: {exc}", "train")
            return None
        round_log.accepted = [u.node for u in replies]
        log(INFO, "aggregate_secure: sum of %d updates (bound %.2e)", len(replies), result.bound)
        return {k: result.average[k] for k in self.expected}, weighted_metrics(replies)

    def _same_key(self, replies: list[SiteReply], round_log: RoundLog) -> bool:
        """Whether every site in a secure sum reported the federation's key (the known one,
        else this sum's majority, which a refused sum still fixes so that a retry can tell
        the stray sites to stand aside)."""
        agreed_now, _ = majority(replies)
        agreed = self.fingerprint or agreed_now
        strays = [u for u in replies if u.fingerprint != agreed]
        if agreed is None or strays:
            for u in strays or replies:
                round_log.refuse(
                    u.node,
                    f"key fingerprint {u.fingerprint} differs from the federation's "
                    f"{agreed}: the secure sum mixes keys and is refused",
                    "train",
                )
        self.fingerprint = agreed
        return agreed is not None and not strays

    def aggregate_evaluate(
        self, server_round: int, answers: Iterable[Answer]
    ) -> dict[str, float] | None:
        """Example-weighted test metrics of the sites that answered under the federation's
        key (metrics computed under another key are meaningless)."""
        round_log = self.round_log(server_round)
        results = []
        for result in self.read(answers, round_log, "evaluate"):
            if self.encrypted and result.fingerprint != self.fingerprint:
                round_log.refuse(
                    result.node,
                    f"key fingerprint {result.fingerprint} differs from the federation's "
                    f"{self.fingerprint}",
                    "evaluate",
                )
            else:
                results.append(result)
        return weighted_metrics(_by_site(results)) if results else None


class Transport(Protocol):
    """What the round loop needs of the messaging: each call addresses every site it picks
    and answers for each (a :class:`Refusal` for one that sent nothing readable)."""

    def send_train(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> list[Answer]:
        """Local training from ``arrays``: the sites' updates."""
        ...

    def send_evaluate(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> list[Answer]:
        """Test metrics of ``arrays`` (replies without arrays)."""
        ...

    def secure_train(
        self, server_round: int, arrays: Mapping[str, np.ndarray], settings: SecureAggregationConfig
    ) -> SecureResult:
        """Local training from ``arrays`` summed by secure aggregation (the sum only)."""
        ...


class StatisticsTransport(Protocol):
    """What the statistics round before round 1 needs of the messaging."""

    def query_statistics(self, config: Mapping[str, str], *, with_arrays: bool) -> list[Answer]:
        """The statistics query (with ``config`` in its settings) to every connected site."""
        ...

    def secure_pass(
        self,
        nodes: list[int],
        config: Mapping[str, str | int],
        template: Mapping[str, np.ndarray],
        settings: SecureAggregationConfig,
    ) -> SecureResult:
        """One secure statistics pass: ``template``-shaped vectors summed over ``nodes``."""
        ...


def run_rounds(
    aggregator: Aggregator,
    transport: Transport,
    store: RunStore,
    initial: Mapping[str, np.ndarray],
    *,
    num_rounds: int,
    resume: bool = True,
    secure: SecureAggregationConfig | None = None,
) -> list[dict]:
    """Run rounds until ``num_rounds``, checkpointing each; resumes after the last
    checkpointed round. Raises :class:`RoundFailedError` when a round cannot be aggregated
    (the checkpoint keeps every completed round). ``secure``: train rounds through SecAgg+
    when enabled."""
    checkpoint = store.load_latest() if resume else None
    if checkpoint is not None:
        if set(checkpoint.arrays) != set(aggregator.expected) or any(
            tuple(checkpoint.arrays[k].shape) != tuple(s) for k, s in aggregator.expected.items()
        ):
            raise ValueError(
                f"{store.directory}: the checkpoint holds another model than this experiment's; "
                "move it away or run with resume=false"
            )
        arrays, history = checkpoint.arrays, list(checkpoint.history)
        aggregator.fingerprint = checkpoint.fingerprint
        first = checkpoint.server_round + 1
        log(
            INFO,
            "resuming %s after round %d from %s",
            aggregator.mode,
            checkpoint.server_round,
            store.directory,
        )
    else:
        arrays, history, first = dict(initial), [], 1
    for server_round in range(first, num_rounds + 1):
        log(INFO, "[%s ROUND %d/%d]", aggregator.mode.upper(), server_round, num_rounds)
        start = time.perf_counter()
        if secure is not None and secure.enabled:
            aggregated = _train_secure(aggregator, transport, server_round, arrays, secure)
        else:
            answers = transport.send_train(server_round, arrays)
            aggregated = aggregator.aggregate_train(server_round, answers)
        round_log = aggregator.round_log(server_round)
        if aggregated is None:
            aggregator.note_missing(server_round)
            raise RoundFailedError(
                f"{len(round_log.accepted)} valid updates, {aggregator.min_sites} needed"
                + (f" ({_reasons(round_log.refused)})" if round_log.refused else ""),
                mode=aggregator.mode,
                server_round=server_round,
                refused=round_log.refused,
            )
        arrays, train_metrics = aggregated
        answers = transport.send_evaluate(server_round, arrays)
        evaluation = aggregator.aggregate_evaluate(server_round, answers)
        aggregator.note_missing(server_round)
        entry = {
            "round": server_round,
            "train": dict(train_metrics),
            "evaluate": dict(evaluation or {}),
            "sites": len(round_log.accepted),
            "refused": round_log.refused,
            "missing": round_log.missing,
            "seconds": time.perf_counter() - start,
        }
        if server_round in aggregator.secure:
            entry["secure"] = aggregator.secure[server_round]
        history.append(entry)
        store.save_round(server_round, arrays, aggregator.fingerprint, history)
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
    aggregator: Aggregator,
    transport: Transport,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    secure: SecureAggregationConfig,
) -> Aggregate | None:
    """One SecAgg+ train round; run again once if it failed only because sites disagreed
    on the key before the federation's was known (now it is, stray sites refuse at once)."""
    aggregated = None
    for _ in range(2):
        known = aggregator.fingerprint
        result = transport.secure_train(server_round, arrays, secure)
        aggregated = aggregator.aggregate_secure(server_round, result)
        if aggregated is not None or known is not None or aggregator.fingerprint is None:
            return aggregated
        log(INFO, "secure round %d: retrying with the federation's key announced", server_round)
        aggregator.rounds[server_round] = RoundLog(
            refused=aggregator.rounds[server_round].refused, sites=aggregator.sites
        )
    return aggregated


def gather_statistics(
    aggregator: Aggregator, transport: StatisticsTransport
) -> tuple[DataStats, int]:
    """The statistics round before round 1: every site sends the counts, sums, sums of
    squares, min and max of its raw features; their sum and how many sites sent one.
    Raises :class:`RoundFailedError` with fewer than ``min_sites`` valid."""
    round_log = RoundLog(sites=aggregator.sites)
    answers = transport.query_statistics({}, with_arrays=True)
    valid = _by_site(aggregator.read(answers, round_log, "statistics"))
    try:
        if len(valid) < aggregator.min_sites:
            raise InvalidUpdate(
                f"{len(valid)} sites sent statistics, {aggregator.min_sites} needed"
            )
        total = sum_statistics([u.arrays for u in valid])
    except InvalidUpdate as exc:
        raise _statistics_failed(aggregator, round_log, str(exc)) from None
    log(INFO, "statistics: %d sites, %d rows", len(valid), total.features.count)
    return total, len(valid)


def _statistics_failed(aggregator: Aggregator, round_log: RoundLog, reason: str) -> Exception:
    return RoundFailedError(
        f"the statistics round failed: {reason}",
        mode=aggregator.mode,
        server_round=0,
        refused=round_log.refused,
    )


def gather_secure_statistics(
    aggregator: Aggregator, transport: StatisticsTransport, secure: SecureAggregationConfig
) -> tuple[DataStats, int, dict[str, object]]:
    """The statistics round under secure aggregation: a clear query for each site's row
    count and data sizes only, then the passes of :mod:`federation.secure_stats`, each a
    SecAgg+ round, so the aggregator sees federation averages and never a site's own
    numbers. Returns the statistics, the site count and their accuracy. A site that
    drops out is left out and the passes start over; :class:`RoundFailedError` with
    fewer than ``min_sites``."""
    round_log = RoundLog(sites=aggregator.sites)
    shapes = _statistics_shapes(aggregator, transport, round_log)
    counts = Counter(shape for _, shape in shapes.values())
    if not counts:
        reason = f"0 sites sent their data sizes, {aggregator.min_sites} needed"
        raise _statistics_failed(aggregator, round_log, reason)
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
        if len(rows) < aggregator.min_sites:
            reason = f"{len(rows)} sites in the secure statistics, {aggregator.min_sites} needed"
            raise _statistics_failed(aggregator, round_log, reason)
        try:
            gathering = _secure_passes(aggregator, transport, rows, shape, secure)
        except PassDropout as exc:
            for node, reason in exc.dropped.items():
                round_log.refuse(node, f"left the secure statistics: {reason}", "statistics")
                rows.pop(node, None)
            continue
        except (InvalidUpdate, ValueError) as exc:
            raise _statistics_failed(aggregator, round_log, str(exc)) from None
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
    aggregator: Aggregator, transport: StatisticsTransport, round_log: RoundLog
) -> dict[int, tuple[int, StatisticsShape]]:
    """Each answering node's row count and data sizes (the clear part of the query)."""
    answers = transport.query_statistics(
        {protocol.STATISTICS_PASS: protocol.STATISTICS_SHAPE}, with_arrays=False
    )
    shapes = {}
    for reply in aggregator.read(answers, round_log, "statistics"):
        try:
            shapes[reply.node] = (reply.num_examples, StatisticsShape.from_metrics(reply.metrics))
        except ValueError as exc:
            round_log.refuse(reply.node, str(exc), "statistics")
    return shapes


def _secure_passes(
    aggregator: Aggregator,
    transport: StatisticsTransport,
    rows: Mapping[int, int],
    shape: StatisticsShape,
    secure: SecureAggregationConfig,
) -> SecureStatistics:
    """Every pass through SecAgg+ over the nodes in ``rows``; :class:`PassDropout` if one
    leaves (the averages of the passes must be over the same sites)."""
    nodes = sorted(rows)
    gathering = SecureStatistics(shape, [rows[n] for n in nodes])
    # Every entry lies in [-1, 1] and each site's weight is its rows over the largest
    # count: the tightest quantisation, whatever the training updates need.
    settings = replace(secure, clipping_range=1.0, max_weight=float(max(rows.values())))
    while (name := gathering.next_pass) is not None:
        config = {
            protocol.SERVER_ROUND: 0,
            protocol.STATISTICS_PASS: name,
            protocol.STATISTICS_PARAMETERS: json.dumps(gathering.parameters()),
        }
        result = transport.secure_pass(nodes, config, gathering.template(), settings)
        dropped = {node: result.errors.get(node, "left the protocol") for node in result.dropped}
        for r in result.replies:
            reply = secure_site_reply(r)  # InvalidUpdate for a malformed one: the sum is spoilt
            aggregator.learn(reply)
            if reply.num_examples != rows[r.node]:
                dropped[r.node] = (
                    f"it weighted pass {name!r} by {reply.num_examples} rows, "
                    f"not the {rows[r.node]} it reported"
                )
        if dropped:
            raise PassDropout(dropped)
        if result.average is None:
            raise InvalidUpdate(f"SecAgg+ halted in pass {name!r}")
        gathering.absorb(result.average, result.bound)
        log(INFO, "secure statistics: pass %s done", name)
    return gathering
