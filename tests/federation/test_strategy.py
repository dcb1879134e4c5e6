"""The encrypted FedAvg strategy on hand-made replies: what it averages, what it refuses."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from aggregator.strategy import EncryptedFedAvg, FlowerTransport
from federation import protocol
from federation.aggregation import RunStore, expected_shapes, initial_arrays
from federation.config import experiment_from_dict
from federation.rounds import RoundFailedError, run_rounds
from tests.flower.flower_grid import LocalGrid, over_the_wire

CONFIG = experiment_from_dict(
    {
        "name": "strategy",
        "task": {"name": "wbc", "options": {"n_samples": 150}},
        "sites": {"count": 3},
        "federation": {"min_sites": 2},
    },
    base=Path("."),
)
EXPECTED = expected_shapes(CONFIG)
KEY_A, KEY_B = "aaaa-aaaa-aaaa-aaaa", "bbbb-bbbb-bbbb-bbbb"


def _strategy(**kwargs: object) -> EncryptedFedAvg:
    options = {"expected": EXPECTED, "encrypted": True, "num_sites": 3, "min_sites": 2}
    options.update(kwargs)
    options["join_timeout"] = 0.0
    return EncryptedFedAvg(**options)  # type: ignore[arg-type]


def _instructions(strategy: EncryptedFedAvg, nodes: int = 3) -> list[Message]:
    """Real train messages from the strategy, addressed as a SuperLink would."""
    grid = LocalGrid(ClientApp(), [{}] * nodes, {})
    record = ArrayRecord({k: Array(v) for k, v in initial_arrays(CONFIG).items()})
    messages = list(strategy.configure_train(1, record, ConfigRecord(), grid))
    for m in messages:
        m.metadata.__dict__["_message_id"] = uuid4().hex
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s) for k, s in EXPECTED.items()}


def _reply(
    to: Message,
    arrays: dict[str, np.ndarray] | None,
    num_examples: object = 10,
    fingerprint: str | None = KEY_A,
    **metrics: float,
) -> Message:
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: num_examples, **metrics}),
            protocol.SITE: ConfigRecord(
                {} if fingerprint is None else {"fingerprint": fingerprint}
            ),
        }
    )
    if arrays is not None:
        content[protocol.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return over_the_wire(Message(content, reply_to=to))


def _error(to: Message, reason: str) -> Message:
    return over_the_wire(Message(Error(2, reason), reply_to=to))


def test_train_messages_carry_the_model_round_and_mode() -> None:
    msgs = _instructions(_strategy())
    assert len(msgs) == 3
    cfg = msgs[0].content[protocol.CONFIG]
    assert cfg[protocol.SERVER_ROUND] == 1 and cfg[protocol.MODE] == protocol.MODE_ENCRYPTED
    assert protocol.FINGERPRINT not in cfg  # unknown before the first aggregation
    assert set(msgs[0].content[protocol.ARRAYS]) == set(EXPECTED)
    later = _instructions(_strategy(fingerprint=KEY_A))
    assert later[0].content[protocol.CONFIG][protocol.FINGERPRINT] == KEY_A


def test_valid_updates_are_averaged_exactly_by_example_count() -> None:
    strategy = _strategy()
    msgs = _instructions(strategy)
    updates = [_update(i) for i in range(3)]
    counts = [10, 30, 60]
    replies = [
        _reply(m, u, n, shadow_max=float(i))
        for i, (m, u, n) in enumerate(zip(msgs, updates, counts, strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    for name in EXPECTED:
        want = sum(n * u[name] for u, n in zip(updates, counts, strict=True)) / 100
        np.testing.assert_allclose(arrays[name].numpy(), want, rtol=0, atol=1e-15)
    assert metrics["shadow_max"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert strategy.fingerprint == KEY_A
    assert strategy.rounds[1].refused == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda m: _reply(m, {**_update(7), "0.weight": np.zeros((3, 9, 2, 2))}), "shape"),
        (lambda m: _reply(m, {**_update(7), "0.bias": np.full((64, 2, 2), np.nan)}), "non-finite"),
        (lambda m: _reply(m, {k: v for k, v in _update(7).items() if k != "0.bias"}), "missing"),
        (lambda m: _reply(m, _update(7), num_examples=0), "positive integer"),
        (lambda m: _reply(m, _update(7), fingerprint=None), "no key fingerprint"),
        (lambda m: _reply(m, None), "malformed"),
        (lambda m: _reply(m, _update(7), shadow_max=float("nan")), "finite numbers"),
        (lambda m: _error(m, "SiteError: shadow channel diverged"), "shadow channel diverged"),
    ],
    ids=[
        "wrong-shape",
        "nan",
        "missing-array",
        "zero-examples",
        "no-fingerprint",
        "no-arrays",
        "nan-metric",
        "error-reply",
    ],
)
def test_a_bad_reply_is_refused_with_its_reason_and_the_rest_averaged(make, reason) -> None:
    strategy = _strategy()
    msgs = _instructions(strategy)
    good = [_update(1), _update(2)]
    replies = [_reply(msgs[0], good[0]), _reply(msgs[1], good[1]), make(msgs[2])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(
        arrays["0.weight"].numpy(), (good[0]["0.weight"] + good[1]["0.weight"]) / 2
    )
    (refused,) = strategy.rounds[1].refused
    assert refused["node"] == msgs[2].metadata.dst_node_id
    assert reason in str(refused["reason"])


def test_the_majority_fixes_the_key_and_a_mismatch_is_refused() -> None:
    strategy = _strategy()
    msgs = _instructions(strategy)
    replies = [
        _reply(msgs[0], _update(1), fingerprint=KEY_A),
        _reply(msgs[1], _update(2), fingerprint=KEY_B),
        _reply(msgs[2], _update(3), fingerprint=KEY_A),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.fingerprint == KEY_A
    (refused,) = strategy.rounds[1].refused
    assert refused["node"] == msgs[1].metadata.dst_node_id
    assert "differs from the federation's" in str(refused["reason"])
    # Once fixed, the key stays: a later majority under another key cannot take over.
    msgs = _instructions(strategy)
    replies = [
        _reply(msgs[0], _update(4), fingerprint=KEY_B),
        _reply(msgs[1], _update(5), fingerprint=KEY_B),
        _reply(msgs[2], _update(6), fingerprint=KEY_A),
    ]
    assert strategy.aggregate_train(2, replies) == (None, None)
    assert len(strategy.rounds[2].refused) == 2 and strategy.fingerprint == KEY_A


def test_sites_that_disagree_evenly_on_the_key_are_all_refused() -> None:
    strategy = _strategy(num_sites=2)
    msgs = _instructions(strategy, nodes=2)
    replies = [
        _reply(msgs[0], _update(1), fingerprint=KEY_A),
        _reply(msgs[1], _update(2), fingerprint=KEY_B),
    ]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.fingerprint is None
    assert all("no majority" in str(r["reason"]) for r in strategy.rounds[1].refused)


def test_a_plaintext_federation_refuses_an_encrypted_update() -> None:
    plain = experiment_from_dict(
        {"name": "p", "task": {"name": "wbc"}, "federation": {"encrypted": False}}, base=Path(".")
    )
    expected = expected_shapes(plain)
    strategy = _strategy(expected=expected, encrypted=False)
    msgs = _instructions(strategy)
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(size=s) for k, s in expected.items()}
    replies = [_reply(m, arrays, fingerprint=None) for m in msgs[:2]]
    replies.append(_reply(msgs[2], arrays, fingerprint=KEY_A))
    assert strategy.aggregate_train(1, replies)[0] is not None
    assert "plaintext federation" in str(strategy.rounds[1].refused[0]["reason"])


def test_an_offline_node_and_a_silent_node_are_refused_under_their_own_ids() -> None:
    """The SuperLink, not the node, signs the error reply of a node that stopped sending
    heartbeats; a node that never answers is refused when the round times out."""
    strategy = _strategy()
    msgs = _instructions(strategy)
    offline = msgs[1]
    from_superlink = Metadata(
        run_id=1,
        message_id=uuid4().hex,
        src_node_id=1,
        dst_node_id=1,
        reply_to_message_id=offline.metadata.message_id,
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=offline.metadata.message_type,
    )
    unavailable = Message(error=Error(5, "Error: Node Unavailable"), metadata=from_superlink)
    replies = [_reply(msgs[0], _update(1)), unavailable]  # msgs[2] never answers
    assert strategy.aggregate_train(1, replies) == (None, None)
    refused = {r["node"]: r["reason"] for r in strategy.rounds[1].refused}
    assert "Node Unavailable" in str(refused[offline.metadata.dst_node_id])
    assert "no reply within the round timeout" in str(refused[msgs[2].metadata.dst_node_id])


def test_evaluation_is_weighted_and_skips_errors_and_foreign_keys() -> None:
    strategy = _strategy(fingerprint=KEY_A)
    msgs = _instructions(strategy)
    replies = [
        _reply(msgs[0], None, 10, loss=1.0, r2_mean=0.5),
        _reply(msgs[1], None, 30, loss=2.0, r2_mean=0.9),
        _reply(msgs[2], None, 60, fingerprint=KEY_B, loss=100.0, r2_mean=-5.0),
    ]
    metrics = strategy.aggregate_evaluate(1, [*replies, _error(msgs[2], "boom")])
    assert metrics is not None
    assert metrics["loss"] == pytest.approx(1.75) and metrics["r2_mean"] == pytest.approx(0.8)
    assert len(strategy.rounds[1].refused) == 2


def test_a_round_with_too_few_valid_updates_fails_and_keeps_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    """Every site errors: run_rounds stops with the reasons, nothing is checkpointed."""
    failing = ClientApp()

    @failing.train()
    def _train(msg: Message, context: object) -> Message:
        raise RuntimeError("disk full")

    grid = LocalGrid(failing, [{}] * 3, {})
    store = RunStore(tmp_path / "encrypted")
    with pytest.raises(RoundFailedError, match="0 valid updates, 2 needed.*disk full"):
        strategy = _strategy()
        run_rounds(
            strategy.policy,
            FlowerTransport(strategy, grid, timeout=5.0),
            store,
            initial_arrays(CONFIG),
            num_rounds=2,
        )
    assert store.load_latest() is None
