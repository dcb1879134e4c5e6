"""The healthcare tasks (MNIST, WBC hemodynamics, angiography views): plain torch/numpy.

Each task module exposes ``DEFAULTS``, ``load_task_data(**options)``,
``build_model(arch, **options)`` and ``site_partition(data, num_sites=, scheme=, seed=,
alpha=)``; :func:`get_task` picks one by the name used in experiment configs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASK_MODULES = {"mnist": "mnist", "wbc": "wbc", "angio": "angio"}


def get_task(name: str) -> ModuleType:
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_MODULES)}")
    return importlib.import_module(f"federation.tasks.{TASK_MODULES[name]}")
