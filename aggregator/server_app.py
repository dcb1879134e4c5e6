"""The aggregator's Flower ServerApp: load the experiment, run the rounds, write the report.

It never reads a key. Run config (``[tool.flwr.app.config]``, ``flwr run --run-config``):

- ``experiment``: the experiment YAML (absolute, or relative to ``project-dir``, the working
  directory or the installed app; the first that holds it);
- ``output-dir``: where the run directories go (empty: the experiment's ``output_dir``);
- ``baseline``: also run the plaintext federation with the same seeds (simulation only: a
  deployed site refuses to send plaintext);
- ``centralised``: also train centrally on the whole task as the report's reference;
- ``resume``: continue from the last checkpoint of each run directory;
- ``round-timeout`` / ``join-timeout``: seconds to wait for replies / for late sites.

Each mode writes ``<output_dir>/<mode>/`` (checkpoint and history after every round), and
the report (``report.md``, ``metrics.png``, ``rounds.png``) goes into ``<output_dir>``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from aggregator.strategy import EncryptedFedAvg, run_rounds
from federation import protocol
from federation.aggregation import RunStore, centralised_history, expected_shapes, initial_arrays
from federation.config import ExperimentConfig, find_experiment, load_experiment
from federation.report import write_report

APP_DIR = Path(__file__).resolve().parents[1]
"""The app's root: the project checkout, or the copy Flower installed from the FAB."""

app = ServerApp()


@dataclass(frozen=True)
class RunSettings:
    """The run config, typed."""

    experiment: Path
    output_dir: Path | None
    baseline: bool
    centralised: bool
    resume: bool
    round_timeout: float
    join_timeout: float

    @classmethod
    def from_run_config(cls, run_config: dict) -> RunSettings:
        output = str(run_config.get(protocol.RUN_OUTPUT_DIR, ""))
        return cls(
            experiment=find_experiment(
                str(run_config[protocol.RUN_EXPERIMENT]),
                project_dir=str(run_config.get(protocol.RUN_PROJECT_DIR, "")),
                app_dir=APP_DIR,
            ),
            output_dir=Path(output).expanduser().resolve() if output else None,
            baseline=bool(run_config.get(protocol.RUN_BASELINE, True)),
            centralised=bool(run_config.get(protocol.RUN_CENTRALISED, True)),
            resume=bool(run_config.get(protocol.RUN_RESUME, True)),
            round_timeout=float(run_config.get(protocol.RUN_ROUND_TIMEOUT, 3600.0)),
            join_timeout=float(run_config.get(protocol.RUN_JOIN_TIMEOUT, 30.0)),
        )


def modes(config: ExperimentConfig, baseline: bool) -> list[str]:
    """The federated runs to do: the configured mode, plus the plaintext baseline."""
    if not config.federation.encrypted:
        return [protocol.MODE_PLAINTEXT]
    return [protocol.MODE_ENCRYPTED] + ([protocol.MODE_PLAINTEXT] if baseline else [])


def run_mode(
    grid: Grid, config: ExperimentConfig, mode: str, output_dir: Path, settings: RunSettings
) -> list[dict]:
    """One federated run (encrypted or plaintext) into ``<output_dir>/<mode>``."""
    encrypted = mode == protocol.MODE_ENCRYPTED
    mode_config = replace(config, federation=replace(config.federation, encrypted=encrypted))
    strategy = EncryptedFedAvg(
        expected=expected_shapes(mode_config),
        encrypted=encrypted,
        num_sites=config.sites.count,
        min_sites=config.federation.min_sites,
        join_timeout=settings.join_timeout,
    )
    return run_rounds(
        strategy,
        grid,
        RunStore(output_dir / mode),
        initial=initial_arrays(mode_config),
        num_rounds=config.training.rounds,
        round_timeout=settings.round_timeout,
        resume=settings.resume,
        secure=config.federation.secure_aggregation,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment's federated rounds, then write the report (also on failure)."""
    settings = RunSettings.from_run_config(context.run_config)
    config = load_experiment(settings.experiment)
    output_dir = settings.output_dir or config.output_dir.resolve()
    log(INFO, "experiment %s (%s) -> %s", config.name, settings.experiment, output_dir)
    status = "completed"
    try:
        for mode in modes(config, settings.baseline):
            run_mode(grid, config, mode, output_dir, settings)
    except Exception as exc:
        status = f"failed: {exc}"
        log(ERROR, "run failed: %s", exc)
        raise
    finally:
        completed = status == "completed"
        centralised = centralised_history(config) if settings.centralised and completed else None
        report = write_report(output_dir, config, centralised=centralised, status=status)
        log(INFO, "report: %s", report)
