"""A site's ciphertexts cached at rest (federation/ciphercache.py): a fresh site process loads
them instead of re-encrypting, and anything that does not match exactly is re-encrypted and
replaced, never used."""

from __future__ import annotations

import dataclasses
import json
import logging
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import MessageType

from federation import ciphercache, experiment, protocol
from federation.aggregation import initial_arrays
from federation.config import ExperimentConfig, load_experiment
from federation.experiment import EncryptedSplit
from federation.more.cipher import decrypt
from federation.more.keys import MoreKey, save_key
from federation.site import EncryptedSite
from federation.tasks.stats import data_stats
from sites import client_app
from tests.flower.flower_grid import SIMULATED, site_context, site_message
from tests.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("experiment")
    tiny = {
        "name": "wbc-cache",
        "task": {
            "name": "wbc",
            "options": {
                "n_samples": 150,
                "test_fraction": 0.2,
                "cache_dir": str(folder / "wbc-data"),
            },
        },
        "sites": {"count": 3},
        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 16, "dtype": "float64"},
        "federation": {"min_sites": 2},
        "encryption": {"key_seed": 1234},
        "output_dir": "runs/default",
    }
    path = folder / "wbc-cache.yaml"
    path.write_text(yaml.safe_dump(tiny), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def config(experiment_file: Path) -> ExperimentConfig:
    return load_experiment(experiment_file)


@pytest.fixture
def encryptions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of encrypt_data (the cache calls it through the experiment module)."""
    calls: list[int] = []
    real = experiment.encrypt_data

    def counted(*args: object, **kwargs: object) -> EncryptedSplit:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "encrypt_data", counted)
    return calls


def _no_encryption(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> EncryptedSplit:
        raise AssertionError("encrypt_data called: the cached ciphertexts were not used")

    monkeypatch.setattr(experiment, "encrypt_data", refuse)


def _site(
    config: ExperimentConfig, key: MoreKey, cache: Path | None, **kw: object
) -> EncryptedSite:
    return EncryptedSite(config, 0, key, deployed=True, cache_dir=cache, **kw)  # type: ignore[arg-type]


def _same(a: EncryptedSplit, b: EncryptedSplit) -> bool:
    return a.fingerprint == b.fingerprint and all(
        getattr(a, p).dtype == getattr(b, p).dtype
        and torch.equal(getattr(a, p).entries, getattr(b, p).entries)
        for p in ciphercache.PARTS
    )


def _only_file(cache: Path) -> Path:
    files = sorted(cache.iterdir())
    assert len(files) == 1, files  # one entry, no temporary left behind
    return files[0]


def test_a_fresh_site_loads_the_same_ciphertexts_without_encrypting(
    config: ExperimentConfig, key: MoreKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = _site(config, key, cache)._encrypted()
    entry = _only_file(cache)
    assert entry.name == "wbc-cache-site0-os-random.npz"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    _no_encryption(monkeypatch)
    site = _site(config, key, cache)
    again = site._encrypted()
    assert _same(first, again)
    torch.testing.assert_close(decrypt(again.x_train, key), site.data.x_train.double())
    _only_file(cache)


def _statistics(sites: list[EncryptedSite]) -> str:
    """The federation statistics of ``sites`` as the aggregator sends them (JSON)."""
    total = sum((data_stats(s._raw_data) for s in sites[1:]), data_stats(sites[0]._raw_data))
    return json.dumps({k: np.asarray(v).tolist() for k, v in total.to_dict().items()})


CHANGES: dict[str, tuple[Callable[..., EncryptedSite], str]] = {
    "key": (lambda config, key, other_key, cache: _site(config, other_key, cache), "key"),
    "dtype": (
        lambda config, key, other_key, cache: _site(
            dataclasses.replace(
                config, training=dataclasses.replace(config.training, dtype="float32")
            ),
            key,
            cache,
        ),
        "dtype",
    ),
    "data": (lambda config, key, other_key, cache: _with_new_row(config, key, cache), "data"),
}


def _with_new_row(config: ExperimentConfig, key: MoreKey, cache: Path) -> EncryptedSite:
    site = _site(config, key, cache)
    x = site.data.x_train.clone()
    x[0, 0] += 0.5
    site.data = dataclasses.replace(site.data, x_train=x)
    return site


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_of_key_data_or_dtype_misses_and_replaces_the_entry(
    config: ExperimentConfig,
    key: MoreKey,
    other_key: MoreKey,
    tmp_path: Path,
    encryptions: list[int],
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    cache = tmp_path / "cache"
    original = _site(config, key, cache)._encrypted()
    build, reason = CHANGES[change]
    changed = build(config, key, other_key, cache)
    with caplog.at_level(logging.WARNING, logger="more-fl"):
        split = changed._encrypted()
    assert len(encryptions) == 2  # encrypted again, not loaded
    assert not _same(original, split)
    assert reason in caplog.text and "re-encrypting and replacing it" in caplog.text
    _only_file(cache)
    # the replaced entry now serves the changed site
    again = build(config, key, other_key, cache)._encrypted()
    assert len(encryptions) == 2 and _same(split, again)


def test_new_federation_statistics_miss(
    key: MoreKey, tmp_path: Path, encryptions: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """Other statistics normalise the same table differently: the digest of the normalised
    tensors changes, so the entry is re-encrypted."""
    tabular = load_experiment(EXAMPLES / "diabetes" / "experiment.yaml")
    cache = tmp_path / "cache"
    sites = [EncryptedSite(tabular, i, key, deployed=True, cache_dir=cache) for i in range(3)]
    sites[0].use_statistics(_statistics(sites))
    first = sites[0]._encrypted()
    again = EncryptedSite(tabular, 0, key, deployed=True, cache_dir=cache)
    again.use_statistics(_statistics(sites))
    assert _same(first, again._encrypted()) and len(encryptions) == 1
    other = EncryptedSite(tabular, 0, key, deployed=True, cache_dir=cache)
    other.use_statistics(_statistics(sites[:2]))
    with caplog.at_level(logging.WARNING, logger="more-fl"):
        other._encrypted()
    assert len(encryptions) == 2 and "data digest" in caplog.text
    _only_file(cache)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "readable-by-others", "wrong-shape"])
def test_a_damaged_or_exposed_entry_is_replaced_not_trusted(
    config: ExperimentConfig,
    key: MoreKey,
    tmp_path: Path,
    encryptions: list[int],
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    cache = tmp_path / "cache"
    _site(config, key, cache)._encrypted()
    entry = _only_file(cache)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(b"not an npz file")
    elif damage == "readable-by-others":
        entry.chmod(0o644)
    else:
        with np.load(entry, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["x_test"] = arrays["x_test"][:-1]
        with entry.open("wb") as fh:
            np.savez(fh, **arrays)
    with caplog.at_level(logging.WARNING, logger="more-fl"):
        split = _site(config, key, cache)._encrypted()
    assert len(encryptions) == 2
    assert str(entry) in caplog.text
    assert stat.S_IMODE(_only_file(cache).stat().st_mode) == 0o600
    assert _same(split, _site(config, key, cache)._encrypted()) and len(encryptions) == 2


def test_training_on_loaded_ciphertexts_equals_training_on_fresh_ones(
    config: ExperimentConfig, key: MoreKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    arrays = initial_arrays(config)
    fresh = _site(config, key, cache).train(arrays, 1)
    _no_encryption(monkeypatch)
    loaded = _site(config, key, cache).train(arrays, 1)
    assert fresh.arrays.keys() == loaded.arrays.keys()
    for name, value in fresh.arrays.items():
        np.testing.assert_array_equal(value, loaded.arrays[name])
    assert fresh.metrics == loaded.metrics and fresh.num_examples == loaded.num_examples


def test_without_a_cache_folder_nothing_is_written(
    config: ExperimentConfig, key: MoreKey, cipher_cache: Path, encryptions: list[int]
) -> None:
    before = set(cipher_cache.rglob("*"))
    _site(config, key, None)._encrypted()
    _site(config, key, None)._encrypted()
    assert len(encryptions) == 2 and set(cipher_cache.rglob("*")) == before


def test_an_unwritable_cache_folder_costs_the_cache_not_the_round(
    config: ExperimentConfig, key: MoreKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="more-fl"):
        split = _site(config, key, blocker / "cache")._encrypted()
    assert split.x_train.fingerprint == key.fingerprint
    assert "could not be written" in caplog.text


def test_the_cache_folder_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ciphercache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ciphercache.cache_dir() == tmp_path / "xdg" / "more-fl" / "ciphertexts"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ciphercache.cache_dir() == tmp_path / "home" / ".cache" / "more-fl" / "ciphertexts"
    monkeypatch.setenv(ciphercache.CACHE_ENV, str(tmp_path / "env"))
    assert ciphercache.cache_dir() == tmp_path / "env"
    assert ciphercache.cache_dir("") == tmp_path / "env"
    assert ciphercache.cache_dir(str(tmp_path / "node")) == tmp_path / "node"
    assert ciphercache.cache_dir("off") is None
    monkeypatch.setenv(ciphercache.CACHE_ENV, "off")
    assert ciphercache.cache_dir() is None
    assert ciphercache.cache_dir(str(tmp_path / "node")) == tmp_path / "node"


def test_a_deployed_clientapp_process_reuses_its_node_cache_and_a_simulated_one_writes_none(
    experiment_file: Path,
    key: MoreKey,
    tmp_path: Path,
    cipher_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = save_key(key, tmp_path / "federation.key")
    cache = tmp_path / "node-cache"
    node = {"site-id": 0, "key-file": str(key_file), "cache-dir": str(cache)}
    monkeypatch.setattr(client_app, "_SITES", {})
    before = set(cipher_cache.rglob("*"))
    reply = client_app.app(
        site_message(experiment_file, MessageType.EVALUATE), site_context(experiment_file, node)
    )
    assert not reply.has_error(), reply.error
    assert _only_file(cache).name == "wbc-cache-site0-os-random.npz"
    simulated = client_app.app(
        site_message(experiment_file, MessageType.EVALUATE),
        site_context(experiment_file, SIMULATED[0]),
    )
    assert not simulated.has_error() and set(cipher_cache.rglob("*")) == before
    monkeypatch.setattr(client_app, "_SITES", {})  # a fresh ClientApp process
    _no_encryption(monkeypatch)
    again = client_app.app(
        site_message(experiment_file, MessageType.EVALUATE), site_context(experiment_file, node)
    )
    assert not again.has_error(), again.error
    assert again.content[protocol.METRICS] == reply.content[protocol.METRICS]
