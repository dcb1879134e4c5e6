"""The suite's markdown: one table per section and the headline that sums them up."""

from __future__ import annotations

from collections.abc import Sequence

from federation.tools.bench.aggregation import AggregationRow
from federation.tools.bench.epochs import EpochRow
from federation.tools.bench.federated import FederationRow
from federation.tools.bench.logreg import LogRegRow
from federation.tools.bench.scaling import ScalingRow, scaling_spec
from federation.tools.bench.sizes import SuiteSizes


def _fmt(value: float | int | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def epoch_table(rows: list[EpochRow]) -> list[str]:
    out = [
        "| model | parameters | epoch | plaintext (s) | encrypted (s) | time ratio "
        "| plaintext step memory (MiB) | encrypted (MiB) | memory ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.model} | {r.params:,} | {r.batches} x {r.batch} | {r.plain_s:.3f} | "
        f"{r.encrypted_s:.3f} | {r.ratio:.2f} | {r.plain_mib:.2f} | {r.encrypted_mib:.2f} | "
        f"{r.memory_ratio:.2f} |"
        for r in rows
    ]
    return out


def aggregation_table(rows: list[AggregationRow], sites: int) -> list[str]:
    out = [
        "| scheme | upload per site (KiB) | broadcast (KiB) | round on the wire (MiB) "
        "| encrypt per site (ms) | aggregate (ms) | decrypt (ms) | max error vs plaintext |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.note:
            out.append(f"| {r.scheme} | {r.note} |  |  |  |  |  |  |")
            continue
        assert r.up_bytes is not None and r.down_bytes is not None
        wire = sites * (r.up_bytes + r.down_bytes) / 2**20
        out.append(
            f"| {r.scheme} | {r.up_bytes / 1024:,.0f} | {r.down_bytes / 1024:,.0f} | "
            f"{wire:.2f} | {_fmt(r.encrypt_ms, '.1f')} | {_fmt(r.aggregate_ms, '.1f')} | "
            f"{_fmt(r.decrypt_ms, '.1f')} | {_fmt(r.max_error, '.1e')} |"
        )
    return out


def logreg_table(rows: list[LogRegRow]) -> list[str]:
    out = [
        "| scheme | encrypt training set (s) | epoch (s) | test accuracy "
        "| max weight difference vs plaintext |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.note:
            out.append(f"| {r.scheme} | {r.note} |  |  |  |")
        else:
            out.append(
                f"| {r.scheme} | {_fmt(r.encrypt_s, '.3f')} | {_fmt(r.epoch_s, '.4g')} | "
                f"{_fmt(r.accuracy, '.3f')} | {_fmt(r.max_weight_error, '.1e')} |"
            )
    return out


def scaling_table(rows: list[ScalingRow], batches: Sequence[int]) -> list[str]:
    """One row per width, one cell per batch: whole-step ratio / Linear-layer ratio."""
    cells: dict[int, list[str]] = {}
    for r in rows:
        cells.setdefault(r.width, []).append(f"{r.step_ratio:.2f} / {r.linear_ratio:.2f}")
    out = [
        "| width \\ batch | " + " | ".join(str(b) for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    out += [f"| {scaling_spec(w).name} | {' | '.join(c)} |" for w, c in cells.items()]
    return out


def federation_table(rows: list[FederationRow]) -> list[str]:
    out = [
        "| sites | secure aggregation | encrypted round (s) | plaintext round (s) | ratio "
        "| encrypted per site (ms) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.sites} | {'SecAgg+' if r.secure else 'no'} | {r.encrypted_s:.2f} | "
        f"{r.plain_s:.2f} | {r.ratio:.2f} | {1e3 * r.encrypted_s / r.sites:.0f} |"
        for r in rows
    ]
    return out


def headline(
    epochs: list[EpochRow],
    aggregation: list[AggregationRow],
    logreg: list[LogRegRow],
    sizes: SuiteSizes,
    federation: list[FederationRow],
) -> list[str]:
    """One table of the suite's key figures, plaintext / MORE / CKKS side by side (the
    README's performance headline). Rows are in the order the benches return them."""
    schemes = ("plaintext", "MORE", "CKKS (TenSEAL, FLARE-style)")

    def row(what: str, cells: list[str]) -> str:
        return f"| {what} | " + " | ".join(cells) + " |"

    def wire(r: AggregationRow) -> str:
        if r.note:
            return r.note
        assert r.up_bytes is not None and r.down_bytes is not None
        return f"{sizes.sites * (r.up_bytes + r.down_bytes) / 2**20:.2f} MiB"

    def costs(r: AggregationRow, first: bool) -> str:
        if r.note:
            return "-"
        parts = [r.encrypt_ms, r.aggregate_ms, r.decrypt_ms]
        return " / ".join("-" if first and i != 1 else _fmt(v, ".1f") for i, v in enumerate(parts))

    def epoch(r: LogRegRow) -> str:
        if r.note or r.epoch_s is None:
            return "-"
        return f"{r.epoch_s * 1e3:.1f} ms" if r.epoch_s < 1 else f"{r.epoch_s:.1f} s"

    ratios = " / ".join(f"{r.ratio:.1f}" for r in epochs)
    memory = " / ".join(f"{r.memory_ratio:.1f}" for r in epochs)
    models = " / ".join(r.model for r in epochs)
    batches = f"{epochs[0].batches} x {epochs[0].batch}" if epochs else "-"
    return [
        "| what | " + " | ".join(schemes) + " |",
        "|---|---:|---:|---:|",
        row(
            f"one FedAvg round, {sizes.sites} sites, MNIST MLP update: bytes on the wire",
            [wire(r) for r in aggregation],
        ),
        row(
            "same round: encrypt per site / aggregate / decrypt (ms)",
            [costs(r, i == 0) for i, r in enumerate(aggregation)],
        ),
        row(
            f"logistic regression, {sizes.logreg_train} examples: one epoch",
            [epoch(r) for r in logreg],
        ),
        row(
            "same: max weight difference vs plaintext",
            ["-", *(_fmt(r.max_weight_error, ".1e") if not r.note else "-" for r in logreg[1:])],
        ),
        row(f"training epoch ({batches}), {models}: time ratio", ["1", ratios, "-"]),
        row("same: step memory ratio", ["1", memory, "-"]),
        *(
            row(
                f"simulated WBC round, {r.sites} sites"
                + (", SecAgg+" if r.secure else "")
                + " (s, later rounds)",
                [f"{r.plain_s:.2f}", f"{r.encrypted_s:.2f} ({r.ratio:.1f}x)", "-"],
            )
            for r in federation
        ),
    ]
