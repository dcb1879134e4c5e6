"""The run report: a markdown summary and PNG plots of the per-round test metrics of
federated encrypted, federated plaintext (same seeds) and centralised plaintext training.

The ServerApp runs the encrypted federation and, when the run config asks for the baseline,
the plaintext one, each into its own run directory (``<output_dir>/encrypted``,
``<output_dir>/plaintext``, see :class:`federation.aggregation.RunStore`). This module reads
whichever of those exist, so a report can be rebuilt at any time from the run directories;
the centralised reference is passed in and kept as ``centralised.json``. Every file is
written atomically (a reader never sees half a report).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from federation.aggregation import RunStore
from federation.atomic import atomic_write_bytes
from federation.config import ExperimentConfig
from federation.protocol import MODE_ENCRYPTED, MODE_PLAINTEXT, MODES

REPORT = "report.md"
METRICS_PNG = "metrics.png"
ROUNDS_PNG = "rounds.png"
CENTRALISED = "centralised.json"
STATUS = "status.json"
"""``{"status": "completed" | "failed", "cause": ..., "report": ...}`` for tools that wait."""
HEADLINE = ("accuracy", "r2_mean", "r2_min", "loss")
LABELS = {MODE_ENCRYPTED: "federated, encrypted", MODE_PLAINTEXT: "federated, plaintext"}


@dataclass(frozen=True)
class Failure:
    """Why a run stopped: the cause, and for a failed round its mode, number and refusals."""

    cause: str
    mode: str | None = None
    server_round: int | None = None
    refused: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        if self.server_round is None:
            return self.cause
        return f"{self.mode} round {self.server_round}: {self.cause}"


def _who(item: dict) -> str:
    return f"site {item['site']}" if "site" in item else f"node {item['node']}"


def load_histories(output_dir: Path) -> dict[str, list[dict]]:
    """Per-round histories of the federated runs found under ``output_dir``, by mode."""
    found = {}
    for mode in MODES:
        path = output_dir / mode / RunStore.HISTORY
        if path.is_file():
            found[mode] = json.loads(path.read_text(encoding="utf-8"))
    return found


def _metric_names(histories: dict[str, list[dict]], centralised: list[dict]) -> list[str]:
    names: list[str] = []
    for history in histories.values():
        for entry in history:
            names += [n for n in entry.get("evaluate", {}) if n not in names]
    names += [n for e in centralised for n in e if n != "epoch" and n not in names]
    headline = [n for n in HEADLINE if n in names]
    return headline or names[:4]


def _series(history: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(e["round"], e["evaluate"][name]) for e in history if name in e.get("evaluate", {})]
    return [p[0] for p in points], [p[1] for p in points]


def _figure_bytes(fig: Figure) -> bytes:
    """PNG bytes rendered by Agg (a bare Figure: no pyplot state, no display needed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_metrics(
    histories: dict[str, list[dict]], centralised: list[dict], local_epochs: int
) -> bytes:
    """One panel per headline metric; centralised epochs are drawn at ``epoch/local_epochs``
    rounds (a round is ``local_epochs`` epochs at every site)."""
    names = _metric_names(histories, centralised) or ["loss"]
    fig = Figure(figsize=(4.2 * len(names), 3.4), layout="tight")
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for mode, history in histories.items():
            x, y = _series(history, name)
            style = "-o" if mode == MODE_ENCRYPTED else "--s"
            ax.plot(x, y, style, label=LABELS[mode], markersize=4, alpha=0.85)
        points = [(e["epoch"] / local_epochs, e[name]) for e in centralised if name in e]
        if points:
            ax.plot(*zip(*points, strict=True), ":", label="centralised, plaintext", color="gray")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _figure_bytes(fig)


def plot_rounds(histories: dict[str, list[dict]]) -> bytes:
    """Seconds per round in each mode, and the encrypted run's shadow-channel health."""
    fig = Figure(figsize=(9, 3.4), layout="tight")
    left, right = fig.subplots(1, 2)
    for mode, history in histories.items():
        rounds, seconds = [e["round"] for e in history], [e["seconds"] for e in history]
        left.plot(rounds, seconds, "-o", label=LABELS[mode], markersize=4)
    left.set_title("seconds per round")
    left.set_xlabel("round (round 1 includes loading and encrypting each site's data)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for name in ("shadow_max", "data_max"):
        x = [e["round"] for e in histories.get(MODE_ENCRYPTED, []) if name in e["train"]]
        y = [e["train"][name] for e in histories.get(MODE_ENCRYPTED, []) if name in e["train"]]
        if x:
            right.semilogy(x, y, "-o", label=name, markersize=4)
    right.set_title("encrypted: largest |value| per channel (site mean)")
    right.set_xlabel("round")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    return _figure_bytes(fig)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _final(history: list[dict] | None, name: str) -> float | None:
    if not history:
        return None
    return history[-1].get("evaluate", {}).get(name)


def _secure_lines(config: ExperimentConfig, histories: dict[str, list[dict]]) -> list[str]:
    """What secure aggregation cost in exactness (its bound is per round, entry-wise)."""
    sa = config.federation.secure_aggregation
    if not sa.enabled:
        return []
    bounds = [e["secure"]["error_bound"] for h in histories.values() for e in h if "secure" in e]
    worst = f"{max(bounds):.2e}" if bounds else "-"
    return [
        f"- secure aggregation (Flower SecAgg+): the aggregator saw only the sum; clipping "
        f"range +-{sa.clipping_range:g}, max weight {sa.max_weight:g}; each round's average "
        f"differs from exact FedAvg by at most {worst} per ciphertext entry (quantisation)"
    ]


def _normalisation_lines(statistics: dict | None) -> list[str]:
    """What the sites standardised with, when the federation gathered statistics."""
    if not statistics:
        return []
    mean = ", ".join(f"{v:.4g}" for v in statistics["mean"])
    std = ", ".join(f"{v:.4g}" for v in statistics["std"])
    how = "sent in the clear: per-feature counts, sums, squares and extremes"
    secure = statistics.get("secure")
    if isinstance(secure, dict):
        how = (
            f"securely summed: {secure.get('passes')} SecAgg+ passes, the aggregator saw only "
            f"federation averages, each within {float(secure.get('error_bound', 0.0)):.2e}"
        )
        features = secure.get("features")
        if isinstance(features, dict) and statistics["std"]:
            scale = statistics["std"]
            worst_mean = max(e / s for e, s in zip(features["mean_error"], scale, strict=False))
            worst_std = max(e / s for e, s in zip(features["std_error"], scale, strict=False))
            how += f"; means within {worst_mean:.1e} std, stds within {worst_std:.1e} relative"
    return [
        f"- normalisation: federation statistics of {statistics['rows']} rows from "
        f"{statistics['sites']} sites ({how}); mean [{mean}], std [{std}]"
    ]


def summary_markdown(
    config: ExperimentConfig,
    histories: dict[str, list[dict]],
    centralised: list[dict],
    *,
    fingerprint: str | None,
    failure: Failure | None = None,
    statistics: dict | None = None,
) -> str:
    enc, plain = histories.get(MODE_ENCRYPTED), histories.get(MODE_PLAINTEXT)
    t = config.training
    status = "completed" if failure is None else f"failed at {failure.describe()}"
    if failure is not None and failure.server_round is None:
        status = f"failed: {failure.cause}"
    lines = [
        f"# {config.name}: federated training on MORE-encrypted data",
        "",
        f"- status: **{status}**",
        f"- task `{config.task.name}`, model `{config.model.name}`, {config.sites.count} sites "
        f"({config.sites.partition}), {t.rounds} rounds x {t.local_epochs} local epochs, "
        f"batch {t.batch_size}, lr {t.lr}, {t.dtype}, seed {t.seed}",
        f"- at least {config.federation.min_sites} valid updates per round; key fingerprint "
        f"`{fingerprint or '-'}` (the aggregator never held the key)",
        f"- runs: {', '.join(f'{m} ({len(h)} rounds)' for m, h in histories.items()) or 'none'}"
        + (f"; centralised reference ({len(centralised)} epochs)" if centralised else ""),
        *_secure_lines(config, histories),
        *_normalisation_lines(statistics),
        "",
        "## Final test metrics",
        "",
        "| metric | federated, encrypted | federated, plaintext | abs. difference | "
        "centralised, plaintext |",
        "|---|---:|---:|---:|---:|",
    ]
    names: list[str] = []
    for history in (enc, plain):
        names += [n for n in (history or [{}])[-1].get("evaluate", {}) if n not in names]
    for name in names:
        e, p = _final(enc, name), _final(plain, name)
        diff = f"{abs(e - p):.2e}" if e is not None and p is not None else "-"
        c = centralised[-1].get(name) if centralised else None
        lines.append(f"| {name} | {_fmt(e)} | {_fmt(p)} | {diff} | {_fmt(c)} |")
    headline = _metric_names(histories, centralised)
    main = headline[0] if headline else None
    lines += ["", f"## Per round ({main or 'no metrics'})", ""]
    lines += [
        "| round | sites (enc) | encrypted | plaintext | seconds (enc) | seconds (plain) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    by_round: dict[int, dict[str, dict]] = {}
    for mode, history in histories.items():
        for entry in history:
            by_round.setdefault(entry["round"], {})[mode] = entry
    for r in sorted(by_round):
        e, p = by_round[r].get(MODE_ENCRYPTED, {}), by_round[r].get(MODE_PLAINTEXT, {})
        lines.append(
            f"| {r} | {e.get('sites', '-')} | {_fmt(e.get('evaluate', {}).get(main))} | "
            f"{_fmt(p.get('evaluate', {}).get(main))} | "
            f"{e.get('seconds', 0):.1f} | {p.get('seconds', 0):.1f} |"
        )
    rounds = [
        (mode, entry["round"], entry.get("refused", []), entry.get("missing", []))
        for mode, history in histories.items()
        for entry in history
    ]
    if failure is not None and failure.server_round is not None:
        rounds.append((failure.mode, failure.server_round, failure.refused, []))
    refused = [
        f"- {mode} round {r}, {_who(item)} ({item.get('stage', 'train')}): {item['reason']}"
        for mode, r, items, _ in rounds
        for item in items
    ]
    missing = [
        f"- {mode} round {r}: site {site} did not reply"
        for mode, r, _, sites in rounds
        for site in sites
    ]
    lines += ["", "## Refused replies", "", *(refused or ["none"])]
    if missing:
        lines += ["", "## Missing sites", "", *missing]
    if histories:
        lines += [
            "",
            "## Figures",
            "",
            f"![test metrics per round]({METRICS_PNG})",
            "",
            f"![time per round and shadow health]({ROUNDS_PNG})",
            "",
            "Round 1's time includes each site's one-off work: loading its data and, in the "
            "encrypted run, encrypting it (later rounds reuse the ciphertexts).",
        ]
    lines += [
        "",
        "Encrypted and plaintext federated runs use the same seeds, so their metrics agree to "
        "rounding error (with secure aggregation: to its quantisation error): decrypting the "
        "encrypted model gives the plaintext model.",
        "",
        "MORE hides data and models from casual exposure only: anyone who knows the scheme "
        "recovers values from ciphertext eigenvalues. Use TLS and SuperNode authentication.",
        "",
    ]
    return "\n".join(lines)


def clear_report(output_dir: Path) -> None:
    """Remove a previous run's report files (a new run must not show the old one's)."""
    for name in (REPORT, METRICS_PNG, ROUNDS_PNG, CENTRALISED, STATUS):
        (Path(output_dir) / name).unlink(missing_ok=True)


def write_report(
    output_dir: Path,
    config: ExperimentConfig,
    *,
    centralised: list[dict] | None = None,
    failure: Failure | None = None,
) -> Path:
    """Write ``report.md`` (and ``metrics.png`` / ``rounds.png`` when there are rounds to
    plot) and ``status.json`` into ``output_dir``.

    ``centralised`` (per-epoch metrics) is saved as ``centralised.json``; when ``None`` a
    previously saved one is used if present.
    """
    output_dir = Path(output_dir)
    saved = output_dir / CENTRALISED
    if centralised is not None:
        atomic_write_bytes(saved, json.dumps(centralised, indent=2).encode())
    elif saved.is_file():
        centralised = json.loads(saved.read_text(encoding="utf-8"))
    centralised = centralised or []
    histories = load_histories(output_dir)
    try:
        checkpoint = RunStore(output_dir / MODE_ENCRYPTED).load_latest()
    except ValueError:  # the failure already names an unreadable checkpoint
        checkpoint = None
    fingerprint = checkpoint.fingerprint if checkpoint is not None else None
    if histories:
        atomic_write_bytes(
            output_dir / METRICS_PNG,
            plot_metrics(histories, centralised, config.training.local_epochs),
        )
        atomic_write_bytes(output_dir / ROUNDS_PNG, plot_rounds(histories))
    else:
        for name in (METRICS_PNG, ROUNDS_PNG):
            (output_dir / name).unlink(missing_ok=True)
    text = summary_markdown(
        config,
        histories,
        centralised,
        fingerprint=fingerprint,
        failure=failure,
        statistics=RunStore(output_dir / MODE_ENCRYPTED).load_statistics(),
    )
    path = output_dir / REPORT
    atomic_write_bytes(path, text.encode())
    status = {
        "status": "completed" if failure is None else "failed",
        "cause": None if failure is None else failure.describe(),
        "report": str(path),
    }
    atomic_write_bytes(output_dir / STATUS, json.dumps(status, indent=2).encode())
    return path


def closing_summary(output_dir: Path, report: Path, failure: Failure | None) -> list[str]:
    """The lines a run ends with: final metrics per mode, how far the encrypted run is from
    the plaintext one, and where the report is."""
    histories = load_histories(Path(output_dir))
    lines = []
    names = _metric_names(histories, [])
    for mode, history in histories.items():
        final = history[-1].get("evaluate", {}) if history else {}
        shown = ", ".join(f"{n} {final[n]:.4f}" for n in names if n in final)
        lines.append(f"{LABELS[mode]}: {len(history)} rounds; {shown or 'no metrics'}")
    enc, plain = histories.get(MODE_ENCRYPTED), histories.get(MODE_PLAINTEXT)
    if enc and plain and len(enc) == len(plain):
        e, p = enc[-1].get("evaluate", {}), plain[-1].get("evaluate", {})
        common = [n for n in e if n in p]
        if common:
            worst = max(abs(e[n] - p[n]) for n in common)
            lines.append(
                f"encrypted vs plaintext: largest final metric difference {worst:.1e} "
                f"over {len(common)} metrics"
            )
    lines.append(f"report: {report}")
    return lines
