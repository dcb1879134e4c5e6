"""A labelled PNG montage of synthetic angiograms of every view (``more-fl data angio``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from federation.atomic import atomic_write
from federation.tasks.angio.render import generate
from federation.tasks.angio.views import VIEW_CLASSES, angle_name


def save_preview(
    path: str | Path, *, image_size: int = 64, seed: int = 0, per_class: int = 4
) -> Path:
    """Save a PNG montage with ``per_class`` synthetic examples of every view, labelled.

    One patient per example (stream 2, apart from training and test patients), so the
    montage shows the spread between patients and scanners. Written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    data = generate(
        per_class * len(VIEW_CLASSES), seed=seed, stream=2, image_size=image_size,
        images_per_patient=1,
    )  # fmt: skip
    fig = Figure(figsize=(1.5 * per_class + 1.2, 1.6 * len(VIEW_CLASSES)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(VIEW_CLASSES), per_class, squeeze=False)
    for view, name in enumerate(VIEW_CLASSES):
        for col, i in enumerate(np.flatnonzero(data.view == view)[:per_class]):
            ax = axes[view, col]
            ax.imshow(data.images[i], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(angle_name(data.primary[i], data.secondary[i]), fontsize=7)
        axes[view, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("Synthetic coronary angiograms by view", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
