"""The attack report's figures: plaintext against recovery, and recovered images."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from federation.tools.attacks.results import Attacked, TargetResult, pct


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_recovery(attacked: list[Attacked], results: tuple[TargetResult, ...]) -> bytes:
    """Plaintext against the ciphertext-only recovery, one panel per target."""
    fig = Figure(figsize=(4.0 * len(attacked), 3.6), layout="tight")
    axes = fig.subplots(1, len(attacked), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, t, result in zip(axes, attacked, results, strict=True):
        x, got = t.truth.ravel(), t.blind.ravel()
        shown = rng.choice(x.size, size=min(x.size, 4000), replace=False)
        ax.plot(x[shown], got[shown], ".", markersize=2, alpha=0.5)
        lo, hi = float(x.min()), float(x.max())
        ax.plot([lo, hi], [lo, hi], "-", color="gray", linewidth=0.8)
        ax.set_title(f"{t.name}: {pct(result.blind.rate)} recovered", fontsize=9)
        ax.set_xlabel("plaintext")
        ax.set_ylabel(f"recovered, ciphertext only ({t.blind_by})")
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_images(features: Attacked) -> bytes:
    """Per example: the original, one ciphertext entry ``C[..., 0, 1]``, the recovered image."""
    rows = min(4, len(features.truth))
    fig = Figure(figsize=(6.6, 2.2 * rows), layout="tight")
    axes = fig.subplots(rows, 3, squeeze=False)
    titles = ("original", "ciphertext entry C[0, 1]", "recovered (ciphertext only)")
    for i in range(rows):
        images = (features.truth[i], features.entries[i][..., 0, 1], features.blind[i])
        for j, (ax, image) in enumerate(zip(axes[i], images, strict=True)):
            ax.imshow(image.reshape(image.shape[-2:]), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    return _png(fig)
