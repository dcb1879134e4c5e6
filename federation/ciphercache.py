"""A site's encrypted data kept at rest between processes, in the site's own cache folder.

A Flower SuperNode starts a fresh ClientApp process for every message, so without this a
deployed site would re-encrypt its whole data set every round, each time with fresh shadow
values: slow, and every round would show an observer another encryption of the same records.
Instead a site encrypts once and keeps the ciphertexts in one ``.npz`` file per site slot
(experiment name, site id, seeded or OS-random shadows), written atomically with mode 0600.

An entry is used only if everything its ciphertexts depend on matches: the digest of the
plain tensors that were encrypted (data, and the federation statistics that normalised it),
the key's fingerprint, and the encryption settings (dtype, shadow policies, seed or
OS-random). Anything else, or a damaged file, is logged, re-encrypted and replaced; it is
never used silently.

Where: ``MORE_FL_CIPHER_CACHE``, else ``$XDG_CACHE_HOME/more-fl/ciphertexts``, else
``~/.cache/more-fl/ciphertexts``; a SuperNode's node config ``cache-dir`` overrides both,
and ``off`` (in either) turns the cache off. No Flower here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from federation import experiment
from federation.atomic import atomic_write
from federation.config import ExperimentConfig
from federation.experiment import EncryptedSplit
from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor
from federation.tasks.base import TaskData

FORMAT = 1
"""Bumped when the file layout changes: an entry of another format is re-encrypted."""
CACHE_ENV = "MORE_FL_CIPHER_CACHE"
OFF = frozenset({"off", "none", "false", "no", "0"})
PARTS = ("x_train", "y_train", "x_test")
MODE = 0o600  # ciphertexts of patient data: the site's user only

log = logging.getLogger("more-fl")


def cache_dir(setting: object = None) -> Path | None:
    """The cache folder a site uses: ``setting`` (a node config's ``cache-dir``) if given,
    else the environment's, else the per-user default; ``None`` when turned ``off``."""
    for value in (setting, os.environ.get(CACHE_ENV)):
        text = "" if value is None else str(value).strip()
        if text:
            return None if text.lower() in OFF else Path(text).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "more-fl" / "ciphertexts"


def slot(config: ExperimentConfig, site_id: int, seed: int | None) -> str:
    """The file name of a site's entry: one per experiment, site and shadow source, so a
    changed key or data set replaces the old ciphertexts instead of piling up beside them."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.name).strip("._") or "experiment"
    return f"{name}-site{site_id}-{'seeded' if seed is not None else 'os-random'}.npz"


def identity(
    config: ExperimentConfig, data: TaskData, key: MoreKey, seed: int | None
) -> dict[str, Any]:
    """What the ciphertexts depend on: the plain tensors' digest (and shapes), the key's
    fingerprint, the encryption settings."""
    plain = experiment.encryption_inputs(config, data)
    digest, shapes = hashlib.sha256(), {}
    for part, t in zip(PARTS, (plain.x_train, plain.targets, plain.x_test), strict=True):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        digest.update(f"{part}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.tobytes())
        shapes[part] = [*a.shape, 2, 2]
    settings = {
        "dtype": config.training.dtype,
        "features": repr(plain.features),
        "targets": repr(plain.target),
        "shadows": "os-random" if seed is None else f"seed {seed}",
    }
    return {
        "format": FORMAT,
        "data": digest.hexdigest(),
        "fingerprint": key.fingerprint,
        "settings": settings,
        "shapes": shapes,
    }


def _differences(stored: object, wanted: dict[str, Any]) -> list[str]:
    if not isinstance(stored, dict) or stored.get("format") != wanted["format"]:
        return ["file format"]
    labels = {"data": "data digest", "fingerprint": "key fingerprint", "shapes": "shapes"}
    out = [labels[k] for k in labels if stored.get(k) != wanted[k]]
    settings = stored.get("settings")
    if not isinstance(settings, dict):
        return [*out, "settings"]
    return out + [
        f"{k} ({settings.get(k)} -> {v})"
        for k, v in wanted["settings"].items()
        if settings.get(k) != v
    ]


def _load(path: Path, wanted: dict[str, Any], dtype: torch.dtype) -> EncryptedSplit | None:
    """The cached split if the file holds exactly ``wanted``'s ciphertexts; else a log line
    saying why it is not used, and None."""
    try:
        if path.stat().st_mode & 0o077:
            log.warning("cipher cache %s is readable by others; not using it, re-encrypting", path)
            return None
        with np.load(path, allow_pickle=False) as npz:
            stored = json.loads(str(npz["identity"]))
            differ = _differences(stored, wanted)
            if differ:
                log.warning(
                    "cipher cache %s was made for another %s; re-encrypting and replacing it",
                    path,
                    ", ".join(differ),
                )
                return None
            arrays = {p: npz[p] for p in PARTS}
    except FileNotFoundError:
        return None
    except Exception as exc:  # damaged or foreign file: never trusted
        log.warning("cipher cache %s is unreadable (%s); re-encrypting and replacing it", path, exc)
        return None
    want = torch.empty(0, dtype=dtype).numpy().dtype
    for part, a in arrays.items():
        shape = tuple(wanted["shapes"][part])
        if a.dtype != want or a.shape != shape:
            log.warning(
                "cipher cache %s: %s is %s %s, not %s %s; re-encrypting and replacing it",
                path,
                part,
                a.dtype,
                a.shape,
                want,
                shape,
            )
            return None
    fingerprint = wanted["fingerprint"]
    tensors = {p: EncryptedTensor(torch.from_numpy(a), fingerprint) for p, a in arrays.items()}
    return EncryptedSplit(**tensors, fingerprint=fingerprint)


def _store(path: Path, wanted: dict[str, Any], split: EncryptedSplit) -> None:
    arrays = {p: getattr(split, p).entries.detach().cpu().numpy() for p in PARTS}

    def write(fh: BinaryIO) -> None:
        np.savez(fh, identity=np.array(json.dumps(wanted, sort_keys=True)), **arrays)

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, write, mode=MODE)


def cached_encrypt(
    directory: Path | None,
    config: ExperimentConfig,
    site_id: int,
    data: TaskData,
    key: MoreKey,
    seed: int | None,
) -> EncryptedSplit:
    """The site's data under ``key`` as :func:`federation.experiment.encrypt_data` makes it,
    from ``directory``'s entry when it matches, else encrypted now and stored there (a
    failed store is logged: the round goes on with the fresh ciphertexts)."""
    if directory is None:
        return experiment.encrypt_data(config, data, key, seed)
    path = directory / slot(config, site_id, seed)
    wanted = identity(config, data, key, seed)
    split = _load(path, wanted, experiment.dtype_of(config))
    if split is not None:
        log.info("site %d: encrypted data loaded from %s", site_id, path)
        return split
    split = experiment.encrypt_data(config, data, key, seed)
    try:
        _store(path, wanted, split)
    except OSError as exc:
        log.warning("cipher cache %s could not be written (%s); not cached", path, exc)
    else:
        log.info("site %d: encrypted data cached in %s", site_id, path)
    return split
