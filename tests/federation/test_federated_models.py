"""The task models a hospital would train (ReLU, batch norm, max-pooling, a residual block,
written as nn.Module subclasses) in a federation: encrypted FedAvg decrypts to plaintext
FedAvg in float64, batch-norm statistics averaged like the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from federation import protocol
from federation.aggregation import RunStore
from sites import client_app
from tests.flower.flower_grid import SIMULATED, LocalGrid, decrypt_arrays, serve, server_run_config
from tests.paths import SHARED_MNIST

CASES = {
    "angio-resnet": (
        {"name": "angio", "options": {"n_train": 48, "n_test": 24, "image_size": 32}},
        {"arch": "resnet", "options": {"image_size": 32}},
    ),
    "mnist-relu-cnn": (
        {
            "name": "mnist",
            "data_dir": str(SHARED_MNIST),
            "options": {"split": "carve", "n_train": 120, "n_test": 60},
        },
        {"arch": "relu-cnn"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_task_model_trains_encrypted_in_a_federation_equal_to_plaintext(
    tmp_path: Path, case: str
) -> None:
    task, model = CASES[case]
    if task["name"] == "mnist" and not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the shared MNIST test split is not at {SHARED_MNIST}")
    experiment = tmp_path / f"{case}.yaml"
    data = {
        "name": case,
        "task": task,
        "model": model,
        "sites": {"count": 3},
        "training": {"rounds": 2, "batch_size": 16, "lr": 0.05, "dtype": "float64"},
        "encryption": {"key_seed": 1234},
        "output_dir": "out",
    }
    experiment.write_text(yaml.safe_dump(data), encoding="utf-8")
    config = server_run_config(experiment, tmp_path / "out", **{protocol.RUN_BASELINE: True})
    serve(LocalGrid(client_app.app, SIMULATED, config), config)
    encrypted = RunStore(tmp_path / "out" / protocol.MODE_ENCRYPTED).load_latest()
    plaintext = RunStore(tmp_path / "out" / protocol.MODE_PLAINTEXT).load_latest()
    assert encrypted is not None and plaintext is not None
    assert encrypted.server_round == plaintext.server_round == 2
    assert any(k.endswith("running_var") for k in plaintext.arrays)
    decrypted = decrypt_arrays(encrypted.arrays, 1234)
    for name, value in plaintext.arrays.items():
        np.testing.assert_allclose(decrypted[name], value, rtol=0, atol=1e-9, err_msg=name)
    for enc, plain in zip(encrypted.history, plaintext.history, strict=True):
        assert enc["evaluate"]["accuracy"] == pytest.approx(plain["evaluate"]["accuracy"])
