"""The aggregator's Flower ServerApp: load the experiment, run the rounds, write the report.

It never reads a key. Run config (``[tool.flwr.app.config]``, ``flwr run --run-config``):

- ``experiment``: the experiment YAML (absolute, or relative to ``project-dir`` when set,
  else to the app that ``flwr run`` submitted; never the working directory);
- ``output-dir``: where the run directories go (empty: the experiment's ``output_dir``);
- ``baseline``: also run the plaintext federation with the same seeds (simulation only: a
  deployed site refuses to send plaintext);
- ``centralised``: also train centrally on the whole task as the report's reference;
- ``resume``: continue from the last checkpoint of each run directory;
- ``round-timeout`` / ``join-timeout``: seconds to wait for replies / for late sites.

Each mode writes ``<output_dir>/<mode>/`` (checkpoint and history after every round), and
the report (``report.md``, ``metrics.png``, ``rounds.png``) goes into ``<output_dir>``. The
directory is locked for the run, and a resume under changed settings is refused.

In simulation the site count is Flower's node count (``--federation-config
"num-supernodes=N"``; Flower's default is 2), whatever ``sites.count`` says; deployed, it is
``sites.count``. A run that cannot complete ends with one line naming the cause, a report
that says so, and a failed Flower run status.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from aggregator.strategy import EncryptedFedAvg, FlowerTransport
from federation import protocol
from federation.aggregation import (
    RunStore,
    centralised_history,
    counter_names,
    initial_arrays,
    statistics_json,
)
from federation.config import (
    ExperimentConfig,
    experiment_digest,
    experiment_fields,
    find_experiment,
    load_experiment,
    with_site_count,
)
from federation.experiment import takes_statistics
from federation.report import Failure, clear_report, closing_summary, write_report
from federation.rounds import (
    RoundFailedError,
    gather_secure_statistics,
    gather_statistics,
    run_rounds,
)
from federation.rundir import RunDirError, RunLock, check_resume
from federation.runtime import check_app_environment

APP_DIR = Path(__file__).resolve().parents[1]
"""more-fl's own app root: the project checkout, or the copy Flower installed from the FAB."""


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
    def from_run_config(cls, run_config: dict, app_dir: Path = APP_DIR) -> RunSettings:
        run = {**protocol.RUN_DEFAULTS, **run_config}
        output = str(run[protocol.RUN_OUTPUT_DIR])
        return cls(
            experiment=find_experiment(
                str(run[protocol.RUN_EXPERIMENT]),
                project_dir=str(run[protocol.RUN_PROJECT_DIR]),
                app_dir=app_dir,
            ),
            output_dir=Path(output).expanduser().resolve() if output else None,
            baseline=bool(run[protocol.RUN_BASELINE]),
            centralised=bool(run[protocol.RUN_CENTRALISED]),
            resume=bool(run[protocol.RUN_RESUME]),
            round_timeout=float(run[protocol.RUN_ROUND_TIMEOUT]),
            join_timeout=float(run[protocol.RUN_JOIN_TIMEOUT]),
        )


class RunFailed(RuntimeError):
    """The run could not complete; the message is the one line that says why."""


def modes(config: ExperimentConfig, baseline: bool) -> list[protocol.Mode]:
    """The federated runs to do: the configured mode, plus the plaintext baseline."""
    if not config.federation.encrypted:
        return [protocol.MODE_PLAINTEXT]
    return [protocol.MODE_ENCRYPTED] + ([protocol.MODE_PLAINTEXT] if baseline else [])


def site_count(grid: Grid, config: ExperimentConfig) -> int:
    """In a Flower simulation, the node count (so the default federation always fits);
    deployed, the experiment's ``sites.count``."""
    if isinstance(grid, InMemoryGrid):
        return len(list(grid.get_node_ids()))
    return config.sites.count


def run_mode(
    grid: Grid,
    config: ExperimentConfig,
    mode: protocol.Mode,
    output_dir: Path,
    settings: RunSettings,
    digest: str,
    *,
    resume: bool,
) -> list[dict]:
    """One federated run (encrypted or plaintext) into ``<output_dir>/<mode>``."""
    initial = initial_arrays(config, mode)
    strategy = EncryptedFedAvg(
        expected={k: tuple(v.shape) for k, v in initial.items()},
        counters=counter_names(initial),
        encrypted=mode is protocol.Mode.ENCRYPTED,
        num_sites=config.sites.count,
        min_sites=config.federation.min_sites,
        join_timeout=settings.join_timeout,
    )
    strategy.settings = {
        protocol.EXPERIMENT_DIGEST: digest,
        protocol.NUM_SITES: config.sites.count,
    }
    store = RunStore(output_dir / mode)
    if not resume:
        store.clear()
    transport = FlowerTransport(strategy, grid, settings.round_timeout)
    secure = config.federation.secure_aggregation
    if takes_statistics(config):
        accuracy = None
        if secure.enabled:  # summed by SecAgg+ too: the aggregator sees federation averages
            statistics, sites, accuracy = gather_secure_statistics(
                strategy.policy, transport, secure
            )
        else:
            statistics, sites = gather_statistics(strategy.policy, transport)
        strategy.settings[protocol.STATISTICS] = statistics_json(statistics)
        store.save_statistics(statistics, sites, secure=accuracy)
    return run_rounds(
        strategy.policy,
        transport,
        store,
        initial,
        num_rounds=config.training.rounds,
        resume=resume,
        secure=secure,
    )


def _failure(exc: Exception) -> Failure:
    if isinstance(exc, RoundFailedError):
        return Failure(str(exc), mode=exc.mode, server_round=exc.server_round, refused=exc.refused)
    return Failure(str(exc) or type(exc).__name__)


def main(grid: Grid, context: Context, app_dir: Path = APP_DIR) -> None:
    """Run the experiment's federated rounds, then write the report (also on failure)."""
    try:
        check_app_environment()
        settings = RunSettings.from_run_config(context.run_config, app_dir)
        declared = load_experiment(settings.experiment)
        digest = experiment_digest(declared)
        count = site_count(grid, declared)
        config = with_site_count(declared, count)
    except Exception as exc:  # nothing ran yet: one line, a failed run status
        log(ERROR, "run failed before round 1: %s", exc)
        raise RunFailed(str(exc)) from None
    if count != declared.sites.count:
        log(
            WARNING,
            "the simulation has %d SuperNodes: running %d sites (%s says sites.count %d)",
            count,
            count,
            settings.experiment.name,
            declared.sites.count,
        )
    output_dir = settings.output_dir or config.output_dir.resolve()
    log(INFO, "experiment %s (%s) -> %s", config.name, settings.experiment, output_dir)
    try:
        lock = RunLock(output_dir, f"run {context.run_id} of {settings.experiment}")
        lock.acquire()
    except Exception as exc:
        log(ERROR, "run failed before round 1: %s", exc)
        raise RunFailed(str(exc)) from None
    failure: Failure | None = None
    try:
        try:
            resume = check_resume(output_dir, experiment_fields(config), resume=settings.resume)
        except RunDirError as exc:  # the directory holds another run: leave it untouched
            log(ERROR, "run failed before round 1: %s", exc)
            raise RunFailed(str(exc)) from None
        if not resume:
            clear_report(output_dir)
        try:
            for mode in modes(config, settings.baseline):
                run_mode(grid, config, mode, output_dir, settings, digest, resume=resume)
        except Exception as exc:  # reported below as one line; the traceback at DEBUG only
            log(DEBUG, "run failed", exc_info=exc)
            failure = _failure(exc)
        centralised = None
        if settings.centralised and failure is None:
            centralised = centralised_history(config)
        report = write_report(output_dir, config, centralised=centralised, failure=failure)
    finally:
        lock.release()
    for line in closing_summary(output_dir, report, failure):
        log(INFO, "%s", line)
    if failure is not None:
        log(ERROR, "run failed: %s", failure.describe())
        raise RunFailed(failure.describe()) from None


def create_app(app_dir: Path) -> ServerApp:
    """The aggregator of the Flower app rooted at ``app_dir`` (where its experiment files
    are): more-fl's own app below, or a study made with ``more-fl new``."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, context, app_dir)

    return server


app = create_app(APP_DIR)
