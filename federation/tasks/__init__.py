"""Tasks: plain torch/numpy modules that load a site's data and build its model.

Built in: three healthcare tasks with their own data (MNIST, WBC hemodynamics, angiography)
and four generic sources for a study's own files (``tabular``: CSV/TSV/Parquet columns;
``arrays``: an ``.npz`` of ``x`` and ``y``; ``images``: a folder per class of PNG/JPEG;
``dicom``: DICOM files of any modality with a labels CSV).

The task protocol, which the built-in tasks (MNIST, WBC hemodynamics, angiography) and a
study's own module (``task: {module: my_task.py}``) all follow:

- ``load_task_data(*, seed, data_dir=None, **options) -> TaskData`` (required): the whole
  task's data (a simulation partitions it) or, in a deployment, one site's own data;
- ``build_model(arch, **options) -> nn.Module`` (required unless every experiment names a
  ``model.factory``): the initial model, any module the encrypted engine accepts;
- ``model_io(options) -> dict`` (optional): what the model needs to know of the data, from
  the task options alone (the aggregator has no data): ``in_features`` or ``input_shape``,
  and ``num_outputs``; passed to ``build_model`` (and to a factory that takes them);
- ``site_partition(data, *, num_sites, scheme, seed, alpha) -> list[TaskData]`` (optional;
  default :func:`federation.tasks.base.default_site_partition`);
- ``split_sizes(options) -> (n_train, n_test) | None`` (optional: lets a config with more
  sites than examples fail when it loads); ``PRIVATE_DATA_DIR`` (optional, true for real
  patient data: the seeded simulation key then draws a warning).

Nothing here names a task outside :data:`BUILTIN_TASKS`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

BUILTIN_TASKS = {
    "mnist": "mnist",
    "wbc": "wbc",
    "angio": "angio",
    "tabular": "tabular",
    "arrays": "arrays",
    "images": "images",
    "dicom": "dicom",
}
"""Name in experiment configs -> module under ``federation.tasks``."""


class TaskLoadError(ValueError):
    """A task module or model factory cannot be loaded (the message says which and why)."""


def get_task(name: str) -> ModuleType:
    """A built-in task by its config name."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(BUILTIN_TASKS)}")
    return importlib.import_module(f"federation.tasks.{BUILTIN_TASKS[name]}")


@functools.cache
def load_module(reference: str) -> ModuleType:
    """A study's module: a ``.py`` file (absolute path) or an importable dotted name."""
    if reference.endswith(".py"):
        path = Path(reference)
        if not path.is_file():
            raise TaskLoadError(f"module file {path} not found")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        name = f"more_fl_study_{path.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TaskLoadError(f"{path}: not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise TaskLoadError(
                f"{path}: importing it failed: {type(exc).__name__}: {exc}"
            ) from exc
        return module
    try:
        return importlib.import_module(reference)
    except ImportError as exc:
        raise TaskLoadError(f"cannot import module {reference!r}: {exc}") from exc


def task_module(name: str, module: str | None) -> ModuleType:
    """The task an experiment names: its own module when given, else a built-in one."""
    if module is None:
        return get_task(name)
    loaded = load_module(module)
    missing = [f for f in ("load_task_data",) if not callable(getattr(loaded, f, None))]
    if missing:
        raise TaskLoadError(
            f"task module {module} lacks {', '.join(missing)} (see federation.tasks for the "
            "task protocol)"
        )
    return loaded


def model_factory(reference: str) -> Callable[..., Any]:
    """``"module:function"`` (module a ``.py`` path or a dotted name) -> the function."""
    module, _, function = reference.rpartition(":")
    factory = getattr(load_module(module), function, None)
    if not callable(factory):
        raise TaskLoadError(f"model factory {reference!r}: {module} has no function {function!r}")
    return factory
