"""The suite's PNG plots, each written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from federation.atomic import atomic_write_bytes
from federation.tools.bench.aggregation import AggregationRow
from federation.tools.bench.epochs import EpochRow
from federation.tools.bench.logreg import LogRegRow
from federation.tools.bench.scaling import GEMM_BOUND, ScalingRow


def _png(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_training(rows: list[EpochRow], path: Path) -> None:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    pos = np.arange(len(rows))
    ax.bar(pos - 0.2, [r.plain_s for r in rows], 0.4, label="plaintext")
    ax.bar(pos + 0.2, [r.encrypted_s for r in rows], 0.4, label="MORE encrypted")
    for i, r in enumerate(rows):
        ax.annotate(f"{r.ratio:.1f}x", (i + 0.2, r.encrypted_s), ha="center", va="bottom")
    ax.set_xticks(pos, [r.model for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel(f"epoch time (s), {rows[0].batches} batches of {rows[0].batch}")
    ax.set_title(f"Training epoch on {rows[0].device}")
    ax.margins(y=0.2)
    ax.legend()
    _png(fig, path)


def plot_aggregation(rows: list[AggregationRow], path: Path) -> None:
    shown = [r for r in rows if not r.note]
    fig = Figure(figsize=(10, 3.6))
    size_ax, time_ax = fig.subplots(1, 2)
    names = [r.scheme.split(" (")[0] for r in shown]
    size_ax.bar(names, [(r.up_bytes or 0) / 2**10 for r in shown])
    size_ax.set_ylabel("upload per site (KiB)")
    size_ax.set_yscale("log")
    pos = np.arange(len(shown))
    for i, (label, attr) in enumerate(
        (("encrypt / site", "encrypt_ms"), ("aggregate", "aggregate_ms"), ("decrypt", "decrypt_ms"))
    ):
        values = [getattr(r, attr) or np.nan for r in shown]  # plaintext: no bar
        time_ax.bar(pos + (i - 1) * 0.27, values, 0.27, label=label)
    time_ax.set_xticks(pos, names)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("time (ms)")
    time_ax.legend(fontsize="small")
    fig.suptitle("One FedAvg round, MNIST MLP update")
    _png(fig, path)


def plot_logreg(rows: list[LogRegRow], path: Path) -> None:
    shown = [r for r in rows if not r.note]
    fig = Figure(figsize=(9, 3.4))
    time_ax, acc_ax = fig.subplots(1, 2)
    names = [r.scheme.split(" (")[0] for r in shown]
    time_ax.bar(names, [r.epoch_s or np.nan for r in shown])
    time_ax.set_yscale("log")
    time_ax.set_ylabel("epoch time (s)")
    acc_ax.bar(names, [r.accuracy or 0.0 for r in shown])
    acc_ax.set_ylim(0.0, 1.0)
    acc_ax.set_ylabel("test accuracy")
    fig.suptitle("Logistic regression trained on encrypted data")
    _png(fig, path)


def plot_scaling(rows: list[ScalingRow], path: Path) -> None:
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, attr, title in (
        (axes[0], "step_ratio", "whole training step"),
        (axes[1], "linear_ratio", "one Linear layer, forward + backward"),
    ):
        for batch in sorted({r.batch for r in rows}):
            mine = [r for r in rows if r.batch == batch]
            ax.plot([r.width for r in mine], [getattr(r, attr) for r in mine], "o-")
            ax.lines[-1].set_label(f"batch {batch}")
        ax.axhline(GEMM_BOUND, color="grey", linestyle="--", label="8 multiply-adds (2x2)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("layer width")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("encrypted / plaintext time")
    axes[1].legend(fontsize="small")
    _png(fig, path)
