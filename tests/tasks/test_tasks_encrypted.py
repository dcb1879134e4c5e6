"""Per task: a small encrypted training run equals its plaintext twin (same seeds)."""

from __future__ import annotations

import pytest
import torch

from federation.config import experiment_from_dict
from federation.experiment import compare_centralised, federation_key, site_data

SMALL = {
    "mnist": ({"split": "carve", "n_train": 240, "n_test": 60}, "mlp", {"hidden": 16}),
    "wbc": ({"n_samples": 300}, "mlp", {"hidden": 16}),
    "angio": ({"n_train": 48, "n_test": 16}, "cnn", {}),
}


def _config(task: str, mnist_dir, tmp_path, dtype: str = "float64"):
    options, arch, model_options = SMALL[task]
    data = {
        "name": f"small-{task}",
        "task": {"name": task, "options": options},
        "model": {"arch": arch, "options": model_options},
        "training": {"rounds": 1, "local_epochs": 2, "batch_size": 32, "lr": 0.1, "dtype": dtype},
        "output_dir": str(tmp_path / "runs"),
    }
    if task == "mnist":
        data["task"]["data_dir"] = str(mnist_dir)
    if task == "wbc":
        data["task"]["options"]["cache_dir"] = str(tmp_path / "wbc-cache")
    return experiment_from_dict(data)


@pytest.mark.parametrize("task", sorted(SMALL))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_small_encrypted_run_equals_plaintext(task, dtype, mnist_dir, tmp_path) -> None:
    cfg = _config(task, mnist_dir, tmp_path, dtype)
    result = compare_centralised(cfg, federation_key(cfg))
    assert len(result.plaintext.history) == len(result.encrypted.history) == 2
    if dtype == "float64":
        assert result.param_abs <= 1e-9
    else:
        assert result.param_rel <= 1e-4
    tol = 1e-9 if dtype == "float64" else 1e-3
    for p, e in zip(result.plaintext.history, result.encrypted.history, strict=True):
        for name, value in p.items():
            assert abs(value - e[name]) <= tol * max(1, abs(value))


def test_sites_get_disjoint_deterministic_shares(mnist_dir, tmp_path) -> None:
    cfg = _config("mnist", mnist_dir, tmp_path)
    shares = [site_data(cfg, i) for i in range(cfg.sites.count)]
    again = [site_data(cfg, i) for i in range(cfg.sites.count)]
    assert sum(len(s.x_train) for s in shares) == 240
    for a, b in zip(shares, again, strict=True):
        assert torch.equal(a.x_train, b.x_train)
    with pytest.raises(ValueError, match="site id"):
        site_data(cfg, cfg.sites.count)
