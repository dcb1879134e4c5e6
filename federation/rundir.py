"""A run directory's guards: one writer at a time, and no resume under a changed experiment.

``<output_dir>/run.lock`` names the process that writes the directory (host, PID, start
time); a second run is refused with that name, and a lock whose process is gone (same host)
is recognised as stale and taken over. ``<output_dir>/experiment.json`` records every setting
that shapes training (:func:`federation.config.experiment_fields`) and its digest; resuming
with different settings is refused, naming the changed keys, so a report never mixes runs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from federation.atomic import atomic_write_bytes
from federation.config import changed_fields, fields_digest

LOCK = "run.lock"
RECORD = "experiment.json"


class RunDirError(RuntimeError):
    """The run directory is busy, or holds another experiment's run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, held for the life of a run (a context manager)."""

    def __init__(self, directory: Path, what: str) -> None:
        self.path = Path(directory) / LOCK
        self.what = what
        self._held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "run": self.what,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile: try again
                stale = (
                    owner.get("host") == me["host"]
                    and isinstance(owner.get("pid"), int)
                    and not _alive(owner["pid"])
                )
                if not stale:
                    raise RunDirError(
                        f"{self.path.parent} is in use by {owner.get('run', 'another run')} "
                        f"(process {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
                        f"{owner.get('started', '?')}); stop it (flwr stop <run-id>) or choose "
                        "another output-dir"
                    ) from None
                self.path.unlink(missing_ok=True)  # its process is gone: a stale lock
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self._held = True
            return
        raise RunDirError(f"{self.path}: could not take the run lock")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_resume(directory: Path, fields: Mapping[str, Any], *, resume: bool) -> bool:
    """Record the experiment's settings in ``directory``; ``True`` when a resume may
    continue what is there. Refuses (naming the changed keys) to resume a run of other
    settings."""
    path = Path(directory) / RECORD
    record = {"digest": fields_digest(fields), "fields": dict(fields)}
    previous = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
            old_fields = previous["fields"]
        except (OSError, ValueError, KeyError, TypeError):
            raise RunDirError(
                f"{path}: unreadable run record; move {directory} away or choose another output-dir"
            ) from None
        changed = changed_fields(old_fields, fields)
        if changed and resume:
            shown = ", ".join(
                f"{k} ({old_fields.get(k, '-')!r} -> {fields.get(k, '-')!r})" for k in changed
            )
            raise RunDirError(
                f"{directory} holds a run of other settings: {shown}. Resuming would mix two "
                "runs: choose a new output_dir, or rerun with --run-config 'resume=false' "
                "to start over there"
            )
    atomic_write_bytes(path, json.dumps(record, indent=2, sort_keys=True).encode())
    return resume and previous is not None
