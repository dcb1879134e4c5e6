"""The round policy and loop of federation.rounds without Flower: a fake transport stands in
for the sites, so key agreement, refusals, the secure sum and resume are checked directly."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from federation import protocol
from federation.aggregation import RunStore, fedavg
from federation.config import SecureAggregationConfig
from federation.rounds import (
    Aggregator,
    Answer,
    Refusal,
    RoundFailedError,
    SecureReply,
    SecureResult,
    SiteReply,
    run_rounds,
)

EXPECTED = {"w": (3,), "b": (1,)}
INITIAL = {"w": np.zeros(3), "b": np.zeros(1)}
KEY_A, KEY_B = "aaaa-aaaa-aaaa-aaaa", "bbbb-bbbb-bbbb-bbbb"
SECURE = SecureAggregationConfig(enabled=True)


@dataclass
class FakeSite:
    """A site whose update depends on the model, the round and its id (so runs compare)."""

    node: int
    site: int
    fingerprint: str | None = KEY_A
    rows: int = 10

    def update(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        step = 0.1 * (self.site + 1) / server_round
        return {k: np.asarray(v) * 0.5 + step for k, v in arrays.items()}

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.site)}


@dataclass
class FakeTransport:
    """The sites of a federation as :class:`federation.rounds.Transport` sees them: a site
    under another key than the one announced refuses, as a real site does."""

    aggregator: Aggregator
    sites: list[FakeSite]
    crash_at: int | None = None
    silent: set[int] = field(default_factory=set)
    calls: list[tuple[str, int]] = field(default_factory=list)

    def _refuses(self, site: FakeSite) -> bool:
        announced = self.aggregator.fingerprint
        return announced is not None and site.fingerprint != announced

    def _answers(self, arrays: dict[str, np.ndarray] | None, server_round: int) -> list[Answer]:
        answers: list[Answer] = [
            Refusal(n, "no reply within the round timeout") for n in self.silent
        ]
        for s in self.sites:
            if s.node in self.silent:
                continue
            if self._refuses(s):
                answers.append(Refusal(s.node, "the site replied with an error: other key"))
                continue
            update = {} if arrays is None else s.update(server_round, arrays)
            answers.append(SiteReply(s.node, s.site, update, s.rows, s.fingerprint, s.metrics()))
        return answers

    def send_train(self, server_round: int, arrays: dict[str, np.ndarray]) -> list[Answer]:
        self.calls.append(("train", server_round))
        if server_round == self.crash_at:
            raise ConnectionError("the aggregator's host went down")
        return self._answers(arrays, server_round)

    def send_evaluate(self, server_round: int, arrays: dict[str, np.ndarray]) -> list[Answer]:
        self.calls.append(("evaluate", server_round))
        return self._answers(None, server_round)

    def secure_train(
        self, server_round: int, arrays: dict[str, np.ndarray], settings: SecureAggregationConfig
    ) -> SecureResult:
        self.calls.append(("secure", server_round))
        taking = [s for s in self.sites if not self._refuses(s)]
        average = fedavg([(s.update(server_round, arrays), s.rows) for s in taking])
        replies = [secure_reply(s) for s in taking]
        dropped = sorted(s.node for s in self.sites if s not in taking)
        errors = {n: "site refuses: other key" for n in dropped}
        return SecureResult(average, replies, dropped, errors, levels=2**30, bound=1e-9)


def secure_reply(site: FakeSite, **clear: object) -> SecureReply:
    """What a site sends in clear beside its masked update (as SecAgg+'s fit metrics)."""
    metrics: dict[str, object] = {protocol.SITE_ID: site.site, **site.metrics()}
    if site.fingerprint is not None:
        metrics[protocol.FINGERPRINT] = site.fingerprint
    return SecureReply(site.node, site.rows, {**metrics, **clear})


def _sites(*keys: str | None) -> list[FakeSite]:
    return [FakeSite(100 + i, i, key, rows=10 * (i + 1)) for i, key in enumerate(keys)]


def _aggregator(encrypted: bool = True, **kwargs: object) -> Aggregator:
    return Aggregator(expected=EXPECTED, encrypted=encrypted, min_sites=2, **kwargs)  # type: ignore[arg-type]


def _reasons(aggregator: Aggregator, server_round: int) -> dict[int, str]:
    return {int(r["node"]): str(r["reason"]) for r in aggregator.rounds[server_round].refused}


# --- the loop ----------------------------------------------------------------------------


def test_the_loop_averages_by_example_count_and_checkpoints_every_round(tmp_path: Path) -> None:
    aggregator = _aggregator()
    sites = _sites(KEY_A, KEY_A, KEY_A)
    transport = FakeTransport(aggregator, sites)
    store = RunStore(tmp_path)
    history = run_rounds(aggregator, transport, store, INITIAL, num_rounds=2)
    assert transport.calls == [("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)]
    want = dict(INITIAL)
    for server_round in (1, 2):
        want = fedavg([(s.update(server_round, want), s.rows) for s in sites])
    checkpoint = store.load_latest()
    assert checkpoint is not None and checkpoint.server_round == 2
    assert checkpoint.fingerprint == KEY_A
    for name in EXPECTED:
        np.testing.assert_array_equal(checkpoint.arrays[name], want[name])
    assert [e["round"] for e in history] == [1, 2]
    first = history[0]
    assert first["sites"] == 3 and first["refused"] == [] and first["missing"] == []
    assert first["train"] == {"loss": pytest.approx((0 * 10 + 1 * 20 + 2 * 30) / 60)}
    assert first["evaluate"] == first["train"] and "secure" not in first
    assert json.loads((tmp_path / RunStore.HISTORY).read_text()) == checkpoint.history == history


def test_a_crashed_run_resumes_after_its_last_round_and_ends_where_an_unbroken_one_does(
    tmp_path: Path,
) -> None:
    sites = _sites(KEY_A, KEY_A, KEY_A)
    unbroken = RunStore(tmp_path / "unbroken")
    aggregator = _aggregator()
    run_rounds(aggregator, FakeTransport(aggregator, sites), unbroken, INITIAL, num_rounds=3)

    store = RunStore(tmp_path / "crashed")
    aggregator = _aggregator()
    with pytest.raises(ConnectionError):
        run_rounds(
            aggregator, FakeTransport(aggregator, sites, crash_at=2), store, INITIAL, num_rounds=3
        )
    assert store.load_latest().server_round == 1  # type: ignore[union-attr]
    # A new aggregator, knowing nothing, takes the key and the model from the checkpoint.
    aggregator = _aggregator()
    transport = FakeTransport(aggregator, sites)
    history = run_rounds(aggregator, transport, store, INITIAL, num_rounds=3)
    assert transport.calls[0] == ("train", 2) and aggregator.fingerprint == KEY_A
    assert [e["round"] for e in history] == [1, 2, 3]
    resumed, reference = store.load_latest(), unbroken.load_latest()
    assert resumed is not None and reference is not None
    for name in EXPECTED:
        np.testing.assert_array_equal(resumed.arrays[name], reference.arrays[name])
    # resume=False starts over from the initial model.
    aggregator = _aggregator()
    transport = FakeTransport(aggregator, sites)
    run_rounds(aggregator, transport, store, INITIAL, num_rounds=1, resume=False)
    assert transport.calls[0] == ("train", 1)


def test_a_checkpoint_of_another_model_is_not_resumed(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save_round(1, {"w": np.zeros(4), "b": np.zeros(1)}, KEY_A, [])
    aggregator = _aggregator()
    with pytest.raises(ValueError, match="the checkpoint holds another model"):
        run_rounds(aggregator, FakeTransport(aggregator, []), store, INITIAL, num_rounds=2)


def test_a_round_with_too_few_valid_updates_fails_naming_every_reason(tmp_path: Path) -> None:
    aggregator = _aggregator()
    transport = FakeTransport(aggregator, _sites(KEY_A, KEY_A, KEY_A), silent={100, 101})
    store = RunStore(tmp_path)
    with pytest.raises(RoundFailedError) as caught:
        run_rounds(aggregator, transport, store, INITIAL, num_rounds=2)
    assert str(caught.value) == (
        "1 valid updates, 2 needed (node 100, node 101: no reply within the round timeout)"
    )
    assert caught.value.server_round == 1 and caught.value.mode == protocol.MODE_ENCRYPTED
    assert store.load_latest() is None


# --- the key ------------------------------------------------------------------------------


def test_the_majority_fixes_the_key_and_a_minority_key_site_is_refused(tmp_path: Path) -> None:
    aggregator = _aggregator()
    sites = _sites(KEY_A, KEY_B, KEY_A)
    store = RunStore(tmp_path)
    history = run_rounds(aggregator, FakeTransport(aggregator, sites), store, INITIAL, num_rounds=2)
    assert aggregator.fingerprint == KEY_A
    first, second = history
    refused, evaluation = first["refused"]  # the site refuses evaluation once it is announced
    assert evaluation["stage"] == "evaluate" and evaluation["site"] == 1
    assert refused == {
        "node": 101,
        "stage": "train",
        "reason": f"key fingerprint {KEY_B} differs from the federation's {KEY_A}: "
        "updates under different keys average to garbage",
        "site": 1,
    }
    assert first["sites"] == 2 and first["train"]["loss"] == pytest.approx(2 * 30 / 40)
    # From round 2 the key is announced: the stray site refuses before training.
    assert second["sites"] == 2 and len(second["refused"]) == 2
    assert all("other key" in str(r["reason"]) for r in second["refused"])
    want = fedavg([(s.update(1, INITIAL), s.rows) for s in (sites[0], sites[2])])
    np.testing.assert_array_equal(
        fedavg([(s.update(2, want), s.rows) for s in (sites[0], sites[2])])["w"],
        store.load_latest().arrays["w"],  # type: ignore[union-attr]
    )


def test_a_fixed_key_outlives_a_later_majority_and_sites_that_tie_are_all_refused() -> None:
    aggregator = _aggregator(fingerprint=KEY_A)
    sites = _sites(KEY_B, KEY_B, KEY_A)
    answers = [
        SiteReply(s.node, s.site, s.update(1, INITIAL), s.rows, s.fingerprint, {}) for s in sites
    ]
    assert aggregator.aggregate_train(1, answers) is None
    assert set(_reasons(aggregator, 1)) == {100, 101} and aggregator.fingerprint == KEY_A

    tied = _aggregator()
    sites = _sites(KEY_A, KEY_B)
    answers = [
        SiteReply(s.node, s.site, s.update(1, INITIAL), s.rows, s.fingerprint, {}) for s in sites
    ]
    assert tied.aggregate_train(1, answers) is None and tied.fingerprint is None
    assert all("no majority among key fingerprints" in r for r in _reasons(tied, 1).values())


def test_refusals_keep_the_order_the_replies_came_in() -> None:
    """history.json lists the refusals as they happened: unread and invalid interleaved."""
    aggregator = _aggregator(fingerprint=KEY_A)
    sites = _sites(KEY_A, KEY_B, KEY_A, KEY_A)
    good = [
        SiteReply(s.node, s.site, s.update(1, INITIAL), s.rows, s.fingerprint, {}) for s in sites
    ]
    answers = [
        Refusal(7, "no reply within the round timeout"),
        good[1],
        Refusal(8, "boom"),
        good[0],
        good[2],
    ]
    assert aggregator.aggregate_train(1, answers) is not None
    assert [r["node"] for r in aggregator.rounds[1].refused] == [7, 101, 8]
    evaluations = [
        SiteReply(100, 0, {}, 10, KEY_A, {"loss": 1.0}),
        SiteReply(101, 1, {}, 30, KEY_B, {"loss": 100.0}),
        Refusal(8, "boom"),
        SiteReply(102, 2, {}, 30, KEY_A, {"loss": 2.0}),
    ]
    assert aggregator.aggregate_evaluate(1, evaluations) == {"loss": pytest.approx(1.75)}
    assert [r["node"] for r in aggregator.rounds[1].refused][3:] == [101, 8]


# --- the secure sum -----------------------------------------------------------------------


def test_a_secure_sum_of_same_key_sites_is_accepted_with_its_bound(tmp_path: Path) -> None:
    aggregator = _aggregator()
    sites = _sites(KEY_A, KEY_A, KEY_A)
    transport = FakeTransport(aggregator, sites)
    history = run_rounds(
        aggregator, transport, RunStore(tmp_path), INITIAL, num_rounds=1, secure=SECURE
    )
    assert transport.calls == [("secure", 1), ("evaluate", 1)]
    (entry,) = history
    assert entry["sites"] == 3 and entry["secure"] == {"levels": 2**30, "error_bound": 1e-9}
    assert aggregator.fingerprint == KEY_A


def test_a_secure_sum_that_mixes_keys_is_refused_and_retried_without_the_stray_site(
    tmp_path: Path,
) -> None:
    aggregator = _aggregator()
    transport = FakeTransport(aggregator, _sites(KEY_A, KEY_B, KEY_A))
    history = run_rounds(
        aggregator, transport, RunStore(tmp_path), INITIAL, num_rounds=1, secure=SECURE
    )
    assert transport.calls == [("secure", 1), ("secure", 1), ("evaluate", 1)]
    (entry,) = history
    assert entry["sites"] == 2 and aggregator.fingerprint == KEY_A
    reasons = [str(r["reason"]) for r in entry["refused"]]
    assert reasons[0] == (
        f"key fingerprint {KEY_B} differs from the federation's {KEY_A}: "
        "the secure sum mixes keys and is refused"
    )
    assert "dropped out of the secure round: site refuses: other key" in reasons[1]


def test_a_secure_sum_under_another_key_than_the_federations_is_refused() -> None:
    """The sites in the sum are compared with the federation's key, not with themselves: a
    resumed federation under KEY_A refuses a sum that every site made under KEY_B."""
    aggregator = _aggregator(fingerprint=KEY_A)
    sites = _sites(KEY_B, KEY_B, KEY_B)
    average = fedavg([(s.update(1, INITIAL), s.rows) for s in sites])
    result = SecureResult(average, [secure_reply(s) for s in sites], levels=2**30)
    assert aggregator.aggregate_secure(1, result) is None
    assert aggregator.fingerprint == KEY_A and aggregator.rounds[1].accepted == []
    assert all(
        r.startswith(f"key fingerprint {KEY_B} differs from the federation's {KEY_A}")
        for r in _reasons(aggregator, 1).values()
    )
    assert len(aggregator.rounds[1].refused) == 3


def test_a_plaintext_federation_refuses_a_secure_sum_with_an_encrypted_site() -> None:
    """Each site's reported fingerprint is checked against the federation's (none, here):
    the sum cannot mix a ciphertext into plaintext weights."""
    aggregator = _aggregator(encrypted=False)
    sites = _sites(None, None, KEY_A)
    average = fedavg([(s.update(1, INITIAL), s.rows) for s in sites])
    result = SecureResult(average, [secure_reply(s) for s in sites], levels=2**30)
    assert aggregator.aggregate_secure(1, result) is None
    assert _reasons(aggregator, 1) == {
        102: "a plaintext federation received an encrypted update; it is in the secure sum"
    }
    honest = _aggregator(encrypted=False)
    result = SecureResult(average, [secure_reply(s) for s in sites[:2]], levels=2**30)
    assert honest.aggregate_secure(1, result) is not None


@pytest.mark.parametrize(
    ("clear", "reason"),
    [
        ({protocol.SITE_ID: "one"}, "malformed site id 'one'"),
        ({protocol.FINGERPRINT: 5}, "malformed key fingerprint 5"),
        ({"loss": float("nan")}, "metrics must be finite numbers"),
    ],
)
def test_one_malformed_site_spoils_the_secure_sum(clear: dict, reason: str) -> None:
    aggregator = _aggregator()
    sites = _sites(KEY_A, KEY_A, KEY_A)
    average = fedavg([(s.update(1, INITIAL), s.rows) for s in sites])
    replies = [secure_reply(s) for s in sites[:2]] + [secure_reply(sites[2], **clear)]
    assert aggregator.aggregate_secure(1, SecureResult(average, replies)) is None
    assert reason in _reasons(aggregator, 1)[102]


def test_a_malformed_secure_sum_is_refused_whole() -> None:
    aggregator = _aggregator()
    sites = _sites(KEY_A, KEY_A)
    average = {"w": np.full(3, np.inf), "b": np.zeros(1)}
    assert (
        aggregator.aggregate_secure(1, SecureResult(average, [secure_reply(s) for s in sites]))
        is None
    )
    assert _reasons(aggregator, 1) == {
        -1: "the secure sum is malformed: 'w' holds non-finite values"
    }
