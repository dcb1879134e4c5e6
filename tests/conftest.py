"""Shared fixtures (deterministic keys, the real MNIST test split beside the checkout, a private
cipher cache, torch's generator seeded per test) and the run's hooks: slow tests first, the
hostile-input count at the end.

The tests are a package (``tests/__init__.py`` and one per folder), so pytest's default
``prepend`` import mode puts the checkout on ``sys.path`` and every module, helpers included,
imports by its full name: ``from tests.flower.flower_grid import LocalGrid``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from federation.ciphercache import CACHE_ENV
from federation.more.keys import MoreKey, generate_key
from tests import hostile
from tests.paths import SHARED_MNIST

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def cipher_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Deployed sites (and the SuperNodes tests start) keep their ciphertexts in a temporary
    folder, never in the user's real cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cipher-cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(autouse=True)
def torch_seed(request: pytest.FixtureRequest) -> None:
    """torch's global generator starts every test from a state of the test's own, as
    pytest-randomly does for ``random`` and numpy (with its ``--randomly-seed`` when it runs):
    no test draws what the tests before it left, in any order and on any xdist worker."""
    seed = zlib.crc32(request.node.nodeid.encode())
    randomly = request.config.getoption("randomly_seed", default=None)
    torch.manual_seed((seed + randomly) % 2**63 if isinstance(randomly, int) else seed)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """For tests of tiny tensors, where torch's intra-op threads only contend (several
    times slower): ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def key() -> MoreKey:
    return generate_key(2024)


@pytest.fixture(scope="session")
def other_key() -> MoreKey:
    return generate_key(7)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the shared MNIST test split is not at {SHARED_MNIST}")
    return SHARED_MNIST


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its hostile-input count to the controller (``workeroutput``)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["hostile_tried"] = dict(hostile.TRIED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The controller adds up the hostile-input counts of its xdist workers."""
    hostile.TRIED.update(getattr(node, "workeroutput", {}).get("hostile_tried", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many hostile inputs the tests tried (counted by ``tests.hostile.tried``), after the
    run, whatever order the tests ran in and however many workers ran them."""
    tried = hostile.TRIED
    if tried:
        per_area = ", ".join(f"{area} {n}" for area, n in sorted(tried.items()))
        terminalreporter.write_line(
            f"hostile inputs: {sum(tried.values())} cases tried ({per_area})"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first: on two xdist workers they then start at once and the
    fast tests fill in around them, instead of one long test finishing alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
