"""Section 6 of the suite: simulated federated rounds of ``configs/wbc.yaml`` against the
number of sites (a real Flower simulation), encrypted against the plaintext baseline."""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from federation.protocol import MODE_ENCRYPTED, MODE_PLAINTEXT

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
"""The shipped experiments (section 6 runs a copy of ``wbc.yaml``)."""


@dataclass(frozen=True)
class FederationRow:
    """Median seconds of a simulated round after the first (which also loads and encrypts
    each site's data), encrypted and plaintext, in one ``more-fl run``."""

    sites: int
    secure: bool
    encrypted_s: float
    plain_s: float

    @property
    def ratio(self) -> float:
        return self.encrypted_s / self.plain_s


def bench_federation(sites: int, rounds: int, *, secure: bool = False) -> FederationRow:
    """``configs/wbc.yaml`` with ``sites`` simulated sites (Flower's simulation on this
    machine, a SuperLink of its own), encrypted and the plaintext baseline."""
    from federation.report import load_histories
    from federation.tools.launch import run_federation  # starts Flower processes: tools only

    experiment = yaml.safe_load((CONFIGS / "wbc.yaml").read_text(encoding="utf-8"))
    experiment["training"]["rounds"] = rounds
    experiment["sites"]["count"] = sites
    experiment["federation"]["secure_aggregation"]["enabled"] = secure
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp:
        path = Path(tmp) / "wbc.yaml"
        path.write_text(yaml.safe_dump(experiment), encoding="utf-8")
        result = run_federation(
            path, sites=sites, output_dir=Path(tmp) / "run", resume=False,
            centralised=False, echo=lambda _: None,
        )  # fmt: skip
        if not result.ok:
            raise RuntimeError(f"the {sites}-site federation failed: {result.cause}")
        histories = load_histories(Path(tmp) / "run")
    later = {
        mode: statistics.median(e["seconds"] for e in history[1:])
        for mode, history in histories.items()
    }
    return FederationRow(sites, secure, later[MODE_ENCRYPTED], later[MODE_PLAINTEXT])
