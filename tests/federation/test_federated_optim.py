"""The experiment's optimiser in a federation: Adam state kept across rounds, checkpointed,
resumed, and still the exact twin of the plaintext federation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from aggregator.server_app import RunFailed
from federation import protocol
from federation.aggregation import RunStore
from federation.config import ConfigError, experiment_from_dict
from federation.nn.optim import STATE_PREFIX
from sites import client_app
from tests.flower.flower_grid import SIMULATED, LocalGrid, decrypt_arrays, serve, server_run_config

ADAM = {
    "name": "wbc-adam",
    "task": {"name": "wbc", "options": {"n_samples": 300, "test_fraction": 0.2}},
    "sites": {"count": 3},
    "training": {
        "rounds": 3,
        "local_epochs": 1,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 0.01,
        "keep_optimizer_state": True,
        "dtype": "float64",
    },
    "federation": {"min_sites": 2},
    "encryption": {"key_seed": 1234},
    "output_dir": "runs/default",
}


def _experiment(directory: Path, **training: object) -> Path:
    data = {**ADAM, "training": {**ADAM["training"], **training}}
    path = directory / "wbc-adam.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(experiment, output) of a 3-round Adam run with its plaintext baseline."""
    directory = tmp_path_factory.mktemp("adam")
    experiment, out = _experiment(directory), directory / "out"
    config = server_run_config(experiment, out, **{protocol.RUN_BASELINE: True})
    serve(LocalGrid(client_app.app, SIMULATED, config), config)
    return experiment, out


def _latest(out: Path, mode: str) -> dict[str, np.ndarray]:
    checkpoint = RunStore(out / mode).load_latest()
    assert checkpoint is not None and checkpoint.server_round == 3
    return checkpoint.arrays


def test_kept_adam_state_travels_and_decrypts_to_the_plaintext_federation(
    uninterrupted: tuple[Path, Path],
) -> None:
    _, out = uninterrupted
    encrypted = _latest(out, protocol.MODE_ENCRYPTED)
    plaintext = _latest(out, protocol.MODE_PLAINTEXT)
    state = sorted(k for k in plaintext if k.startswith(STATE_PREFIX))
    assert {k.rsplit("/", 1)[1] for k in state} == {"step", "exp_avg", "exp_avg_sq"}
    assert set(encrypted) == set(plaintext)
    # Three rounds of about 80 examples in batches of 32 per site: 9 steps, averaged.
    assert float(plaintext[state[0].rsplit("/", 1)[0] + "/step"]) == pytest.approx(9.0)
    decrypted = decrypt_arrays(encrypted, 1234)
    for name, value in plaintext.items():
        got = decrypted[name].reshape(value.shape)
        np.testing.assert_allclose(got, value, rtol=0, atol=1e-9, err_msg=name)


def test_a_resumed_adam_run_equals_the_uninterrupted_one_bit_for_bit(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    experiment, out = uninterrupted
    config = server_run_config(experiment, tmp_path)
    # Dies while sending round 2's training messages (3 train + 3 evaluate sent in round 1).
    with pytest.raises(RunFailed, match="aggregator killed"):
        serve(LocalGrid(client_app.app, SIMULATED, config, crash_after=7), config)
    store = RunStore(tmp_path / protocol.MODE_ENCRYPTED)
    checkpoint = store.load_latest()
    assert checkpoint is not None and checkpoint.server_round == 1
    assert any(k.startswith(STATE_PREFIX) for k in checkpoint.arrays)
    serve(LocalGrid(client_app.app, SIMULATED, config), config)
    resumed, reference = _latest(tmp_path, "encrypted"), _latest(out, "encrypted")
    assert set(resumed) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_dropping_the_state_each_round_gives_another_model(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    """The kept state is used: without it the same run ends elsewhere (so the tests above
    would see a resume that lost the state)."""
    _, out = uninterrupted
    experiment = _experiment(tmp_path, keep_optimizer_state=False)
    config = server_run_config(experiment, tmp_path / "out")
    serve(LocalGrid(client_app.app, SIMULATED, config), config)
    fresh = _latest(tmp_path / "out", "encrypted")
    kept = _latest(out, "encrypted")
    assert not any(k.startswith(STATE_PREFIX) for k in fresh)
    assert max(float(np.abs(fresh[k] - kept[k]).max()) for k in fresh) > 1e-4


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"optimizer": "adam", "momentum": 0.9}, "'training.momentum' is not used by optimizer"),
        ({"optimizer": "sgd", "betas": [0.9, 0.99]}, "'training.betas' is not used by optimizer"),
        ({"optimizer": "adam", "betas": [0.9, 1.0]}, "'training.betas' must be two numbers"),
        ({"optimizer": "adam", "betas": [0.9]}, "'training.betas' must be two numbers"),
        ({"optimizer": "adam", "eps": 0}, "'training.eps' must be a number > 0"),
        ({"optimizer": "rmsprop"}, "'training.optimizer' must be one of sgd, adam, adamw"),
        ({"keep_optimizer_state": "yes"}, "'training.keep_optimizer_state' must be true or"),
    ],
)
def test_optimiser_settings_are_validated_naming_the_key(training: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(
            {"name": "x", "task": {"name": "wbc"}, "training": training}, source="x.yaml"
        )
