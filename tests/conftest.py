"""Shared fixtures: deterministic keys and the real MNIST test split beside the checkout."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from federation.ciphercache import CACHE_ENV
from federation.more.keys import MoreKey, generate_key

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="session", autouse=True)
def cipher_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Deployed sites (and the SuperNodes tests start) keep their ciphertexts in a temporary
    folder, never in the user's real cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cipher-cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many hostile inputs ``test_hostile_inputs`` tried (counted by its ``_tried``),
    after the run, whatever order the tests ran in."""
    module = sys.modules.get("test_hostile_inputs")
    tried = getattr(module, "_TRIED", None)
    if tried:
        per_area = ", ".join(f"{area} {n}" for area, n in sorted(tried.items()))
        terminalreporter.write_line(
            f"hostile inputs: {sum(tried.values())} cases tried ({per_area})"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first: on two xdist workers they then start at once and the
    fast tests fill in around them, instead of one long test finishing alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
