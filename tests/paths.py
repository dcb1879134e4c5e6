"""Paths the tests share: the checkout's root and the real MNIST test split beside it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (pyproject.toml, configs/, examples/, scripts/)."""

SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
"""The real MNIST test split beside the checkout (never downloaded by the tests)."""
