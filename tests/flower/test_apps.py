"""The ClientApp and the ServerApp called directly, over an in-process Grid.

Real sites (real data, real encryption, real keys) answer real Flower messages; the Grid
only replaces the network (see tests/flower/flower_grid.py). Covers the reply format, error replies,
exact equivalence of encrypted and plaintext FedAvg, and the faults: a site raising
mid-round, a corrupted update, a key mismatch, too few sites and an aggregator restart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import (
    Array,
    Context,
    Message,
    MessageType,
)
from flwr.clientapp import ClientApp

from aggregator.server_app import RunFailed
from federation import protocol
from federation.aggregation import RunStore, expected_shapes
from federation.config import load_experiment
from federation.more.keys import generate_key, save_key
from sites import client_app
from tests.flower.flower_grid import (
    SIMULATED,
    LocalGrid,
    decrypt_arrays,
    over_the_wire,
    serve,
    server_run_config,
    site_context,
    site_message,
)

TINY = {
    "name": "wbc-tiny",
    "task": {"name": "wbc", "options": {"n_samples": 300, "test_fraction": 0.2}},
    "sites": {"count": 3},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "dtype": "float64"},
    "federation": {"min_sites": 2},
    "encryption": {"key_seed": 1234},
    "output_dir": "runs/default",
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("experiment") / "wbc-tiny.yaml"
    path.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return path


# --- the ClientApp ----------------------------------------------------------------------


def test_train_reply_carries_the_update_its_size_and_the_key_fingerprint(experiment: Path) -> None:
    reply = client_app.app(site_message(experiment), site_context(experiment, SIMULATED[0]))
    assert not reply.has_error()
    reply = over_the_wire(reply)
    config = load_experiment(experiment)
    arrays = reply.content[protocol.ARRAYS]
    assert {k: tuple(a.shape) for k, a in arrays.items()} == expected_shapes(config)
    metrics = reply.content[protocol.METRICS]
    assert isinstance(metrics[protocol.NUM_EXAMPLES], int) and metrics[protocol.NUM_EXAMPLES] > 0
    assert {"shadow_max", "data_max"} <= set(metrics)
    site = reply.content[protocol.SITE]
    assert site[protocol.FINGERPRINT] == generate_key(1234).fingerprint
    assert site[protocol.SITE_ID] == 0


def test_evaluate_reply_carries_metrics_only(experiment: Path) -> None:
    msg = site_message(experiment, MessageType.EVALUATE)
    reply = over_the_wire(client_app.app(msg, site_context(experiment, SIMULATED[1])))
    assert not reply.has_error() and protocol.ARRAYS not in reply.content
    metrics = reply.content[protocol.METRICS]
    assert metrics[protocol.NUM_EXAMPLES] > 0 and {"loss", "r2_mean"} <= set(metrics)


@pytest.mark.parametrize(
    ("node_config", "config", "reason"),
    [
        ({}, {}, "--node-config 'site-id="),
        ({"partition-id": 0, "num-partitions": 2}, {}, "has 2 nodes but the aggregator runs 3"),
        ({"site-id": 5}, {}, "site id 5 is outside 0..2"),
        ({"site-id": 0}, {protocol.MODE: protocol.MODE_PLAINTEXT}, "refuses to send plaintext"),
        (
            {"site-id": 0, "key-file": "<own key>"},
            {protocol.FINGERPRINT: "0000-0000-0000-0000"},
            "check this site's key",
        ),
        ({"site-id": 0, "key-file": "/nonexistent/federation.key"}, {}, "federation.key"),
    ],
    ids=["no-site", "node-count", "bad-site", "plaintext-refused", "foreign-key", "no-key-file"],
)
def test_a_site_that_cannot_work_replies_with_an_error(
    experiment: Path, tmp_path: Path, node_config: dict, config: dict, reason: str
) -> None:
    if node_config.get("key-file") == "<own key>":  # a deployed site needs a key file
        node_config = {**node_config, "key-file": str(save_key(generate_key(5), tmp_path / "k"))}
    reply = client_app.app(
        site_message(experiment, **config), site_context(experiment, node_config)
    )
    assert reply.has_error() and not reply.has_content()
    assert reason in reply.error.reason


def test_a_site_error_in_training_is_an_error_reply_never_an_update(
    experiment: Path, tmp_path: Path
) -> None:
    """A shadow-health limit the update cannot meet: Site raises SiteError, the reply is an
    Error (no arrays leave the site)."""
    strict = dict(TINY, encryption={"key_seed": 1234, "health_limit": 1e-6})
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(strict), encoding="utf-8")
    reply = client_app.app(site_message(path), site_context(path, SIMULATED[2]))
    assert reply.has_error()
    assert reply.error.reason.startswith("site 2: ")


def test_a_deployed_site_uses_its_own_key_file(experiment: Path, tmp_path: Path) -> None:
    other = save_key(generate_key(7), tmp_path / "other.key")
    reply = client_app.app(
        site_message(experiment), site_context(experiment, {"site-id": 1, "key-file": str(other)})
    )
    assert reply.content[protocol.SITE][protocol.FINGERPRINT] == generate_key(7).fingerprint


# --- the ServerApp ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the plaintext baseline and the centralised reference."""
    out = tmp_path_factory.mktemp("full")
    run_config = server_run_config(
        experiment, out, **{protocol.RUN_BASELINE: True, protocol.RUN_CENTRALISED: True}
    )
    serve(LocalGrid(client_app.app, SIMULATED, run_config), run_config)
    return out


def test_encrypted_fedavg_decrypts_to_plaintext_fedavg_with_the_same_seeds(full_run: Path) -> None:
    encrypted = RunStore(full_run / protocol.MODE_ENCRYPTED).load_latest()
    plaintext = RunStore(full_run / protocol.MODE_PLAINTEXT).load_latest()
    assert encrypted is not None and plaintext is not None
    assert encrypted.server_round == plaintext.server_round == 2
    assert encrypted.fingerprint == generate_key(1234).fingerprint and plaintext.fingerprint is None
    decrypted = decrypt_arrays(encrypted.arrays, 1234)
    for name, value in plaintext.arrays.items():
        np.testing.assert_allclose(decrypted[name], value, rtol=0, atol=1e-12)
    for enc, plain in zip(encrypted.history, plaintext.history, strict=True):
        assert enc["sites"] == plain["sites"] == 3 and not enc["refused"]
        for name, value in plain["evaluate"].items():
            assert enc["evaluate"][name] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_the_report_shows_all_three_runs_side_by_side(full_run: Path) -> None:
    report = (full_run / "report.md").read_text(encoding="utf-8")
    assert "status: **completed**" in report
    assert "encrypted (2 rounds), plaintext (2 rounds); centralised reference (2 epochs)" in report
    assert "| r2_mean |" in report
    for png in ("metrics.png", "rounds.png"):
        assert (full_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (full_run / "centralised.json").is_file()


def _node(grid: LocalGrid, partition: int) -> int:
    return next(
        n for n, c in grid.contexts.items() if c.node_config.get("partition-id") == partition
    )


def test_a_site_raising_mid_round_is_dropped_from_that_round(
    experiment: Path, tmp_path: Path
) -> None:
    flaky = ClientApp()

    @flaky.train()
    def _train(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 2 and msg.content["config"]["server-round"] == 2:
            raise RuntimeError("site 2 lost its disk mid-round")
        return client_app.train(msg, context)

    flaky.evaluate()(client_app.evaluate)
    run_config = server_run_config(experiment, tmp_path)
    grid = LocalGrid(flaky, SIMULATED, run_config)
    serve(grid, run_config)
    history = RunStore(tmp_path / "encrypted").load_latest().history
    assert [h["sites"] for h in history] == [3, 2]
    (refused,) = history[1]["refused"]
    assert refused["node"] == _node(grid, 2) and "lost its disk" in refused["reason"]


def test_a_corrupted_update_is_refused_and_the_round_goes_on(
    experiment: Path, tmp_path: Path
) -> None:
    seen: dict[int, int] = {}

    def corrupt(node: int, reply: Message) -> Message:
        if reply.metadata.message_type == MessageType.TRAIN:
            seen[node] = seen.get(node, 0) + 1
            if seen[node] == 2 and node == min(seen):
                arrays = reply.content[protocol.ARRAYS]
                arrays["0.weight"] = Array(np.full(arrays["0.weight"].shape, np.inf))
        return reply

    run_config = server_run_config(experiment, tmp_path)
    serve(LocalGrid(client_app.app, SIMULATED, run_config, tamper=corrupt), run_config)
    history = RunStore(tmp_path / "encrypted").load_latest().history
    assert [h["sites"] for h in history] == [3, 2]
    assert "'0.weight' holds non-finite values" in history[1]["refused"][0]["reason"]


def test_a_site_under_another_key_is_refused_every_round(experiment: Path, tmp_path: Path) -> None:
    other = save_key(generate_key(7), tmp_path / "other.key")
    nodes = [dict(SIMULATED[0]), dict(SIMULATED[1]), {**SIMULATED[2], "key-file": str(other)}]
    run_config = server_run_config(experiment, tmp_path / "out")
    grid = LocalGrid(client_app.app, nodes, run_config)
    serve(grid, run_config)
    checkpoint = RunStore(tmp_path / "out" / "encrypted").load_latest()
    assert checkpoint.fingerprint == generate_key(1234).fingerprint
    stranger = _node(grid, 2)
    for entry in checkpoint.history:
        assert entry["sites"] == 2
        assert {r["node"] for r in entry["refused"]} == {stranger}
    assert "differs from the federation's" in checkpoint.history[0]["refused"][0]["reason"]
    assert "check this site's key" in checkpoint.history[1]["refused"][0]["reason"]


def test_too_few_sites_fail_the_run_and_the_report_says_so(
    experiment: Path, tmp_path: Path
) -> None:
    nodes = [SIMULATED[0], {}, {}]  # two SuperNodes that name no site
    run_config = server_run_config(experiment, tmp_path)
    with pytest.raises(RunFailed, match="encrypted round 1: 1 valid updates, 2 needed"):
        serve(LocalGrid(client_app.app, nodes, run_config), run_config)
    report = (tmp_path / "report.md").read_text()
    assert "status: **failed at encrypted round 1: 1 valid updates" in report
    # Every refused reply is listed, by node (these never named a site), with its reason.
    refused = report.split("## Refused replies")[1]
    assert refused.count("names no site") == 2 and "\nnone" not in refused
    assert not (tmp_path / "metrics.png").exists()  # nothing to plot: no empty figure
    assert RunStore(tmp_path / "encrypted").load_latest() is None


def test_a_restarted_aggregator_resumes_after_its_last_checkpoint(
    experiment: Path, full_run: Path, tmp_path: Path
) -> None:
    run_config = server_run_config(experiment, tmp_path)
    # Dies while sending round 2's training messages (3 train + 3 evaluate sent in round 1).
    crashing = LocalGrid(client_app.app, SIMULATED, run_config, crash_after=7)
    with pytest.raises(RunFailed, match="aggregator killed"):
        serve(crashing, run_config)
    store = RunStore(tmp_path / "encrypted")
    assert store.load_latest().server_round == 1
    round_one = store.load_latest().history[0]
    restarted = LocalGrid(client_app.app, SIMULATED, run_config)
    serve(restarted, run_config)
    assert restarted.delivered == 6  # only round 2 was run again
    resumed = store.load_latest()
    assert [h["round"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == round_one
    uninterrupted = RunStore(full_run / "encrypted").load_latest()
    for name, value in uninterrupted.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[name], value)
