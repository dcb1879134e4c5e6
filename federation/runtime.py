"""Guard against Flower's per-run dependency installation running the app on a second torch.

Flower's SuperLink (1.41, 1.42), unless started with
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, runs ``uv sync`` for every run into
``$FLWR_HOME/runtime-envs/<run>`` and puts that environment first on ``sys.path``.
``[tool.uv] exclude-dependencies`` in this app's pyproject keeps that environment empty, so
the app runs on the packages more-fl was installed with; this check refuses to train if
another torch got in anyway (e.g. an older ``uv`` that ignores the setting).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

RUNTIME_ENVS = "runtime-envs"


class ForeignEnvironmentError(RuntimeError):
    """torch was imported from an environment Flower installed for this run."""


def check_app_environment(environ: dict[str, str] | None = None) -> None:
    environ = dict(os.environ) if environ is None else environ
    venv = environ.get("VIRTUAL_ENV", "")
    if not venv or Path(venv).parent.name != RUNTIME_ENVS:
        return
    if Path(venv).resolve() in Path(torch.__file__).resolve().parents:
        raise ForeignEnvironmentError(
            f"Flower installed this app's dependencies into {venv} and torch "
            f"{torch.__version__} came from there, not from the environment more-fl was "
            "installed in: stop the local SuperLink (by its PID, see the README's "
            "troubleshooting), then run `more-fl run`, or export "
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 before `flwr run`"
        )
