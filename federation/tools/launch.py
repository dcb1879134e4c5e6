"""``more-fl run``: one simulated federation on a local SuperLink of its own, waited for.

``flwr run .`` attaches to whatever SuperLink listens on 127.0.0.1:39091 (started by whoever
ran first, with whatever environment they had), exits 0 whatever the run's outcome, and
keeps that SuperLink running. This command instead starts a private ``flower-superlink``
(free ports, a temporary ``FLWR_HOME``, runtime dependency installation off) in simulation
mode, submits this app with as many simulated SuperNodes as the experiment has sites, streams
the log, reads the run's final status, stops every process it started (also on Ctrl-C) and
returns 0 only for a completed run.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from federation import protocol
from federation.config import load_experiment, with_site_count
from federation.report import STATUS
from federation.tools.deploy.commands import PROJECT_DIR, started_run_id, write_run_config
from federation.tools.deploy.processes import Processes, flower_env


class LaunchError(RuntimeError):
    """The local SuperLink or the run could not be started."""


@dataclass(frozen=True)
class RunResult:
    run_id: int | None
    status: str
    cause: str | None
    report: Path

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalFederation:
    """A private simulation SuperLink and the ``flwr`` CLI pointed at it."""

    def __init__(self, home: Path, project_dir: Path) -> None:
        self.home = home
        self.http_port, self.control_port = _free_port(), _free_port()
        env = flower_env()
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(self.http_port)
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(self.control_port)
        self.processes = Processes(env, project_dir, home / "logs")

    def start(self, timeout: float = 60.0) -> None:
        argv = [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
        ]
        self.processes.start("superlink", argv, home=self.home / "flwr")
        url = f"http://127.0.0.1:{self.http_port}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes.started["superlink"].poll() is not None:
                raise LaunchError(
                    f"flower-superlink exited; see {self.processes.log_dir / 'superlink.log'}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise LaunchError(f"the local SuperLink did not answer at {url} within {timeout:g} s")

    def submit(self, project_dir: Path, sites: int, run_config: dict) -> Path:
        """Start a streaming ``flwr run``; returns the file its output goes to."""
        config_file = write_run_config(self.home / "run-config.toml", run_config)
        argv = [
            "flwr",
            "run",
            str(project_dir),
            "local",
            "--stream",
            "--federation-config",
            f"num-supernodes={sites}",
            "--run-config",
            str(config_file),
        ]
        self.processes.start("run", argv, home=self.home / "flwr")
        return self.processes.log_dir / "run.log"

    def flwr(self, *args: str, timeout: float = 60.0) -> str:
        done = subprocess.run(
            ["flwr", *args],
            cwd=self.processes.cwd,
            env={**self.processes.env, "FLWR_HOME": str(self.home / "flwr")},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return done.stdout if done.returncode == 0 else ""

    def status(self, run_id: int) -> str:
        out = self.flwr("ls", "local", "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(out)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "unknown"


def _stream(log: Path, offset: int, echo: Callable[[str], None]) -> int:
    """Echo what was appended to ``log`` since ``offset``; the new offset."""
    if not log.is_file():
        return offset
    with log.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    complete = data.rfind(b"\n") + 1
    for line in data[:complete].decode("utf-8", errors="replace").splitlines():
        echo(line)
    return offset + complete


def run_federation(
    experiment: Path,
    *,
    sites: int | None = None,
    output_dir: Path | None = None,
    resume: bool = True,
    baseline: bool = True,
    centralised: bool = True,
    project_dir: Path = PROJECT_DIR,
    echo: Callable[[str], None] = print,
) -> RunResult:
    """Simulate the experiment's federation and wait for it; the run's outcome.

    Config errors surface before anything starts. On Ctrl-C the run is stopped, every
    process started here is ended, and KeyboardInterrupt propagates.
    """
    experiment = experiment.resolve()
    config = load_experiment(experiment)
    count = sites or config.sites.count
    with_site_count(config, count)  # refuse impossible counts before starting anything
    output = (output_dir or config.output_dir).resolve()
    run_config: dict[str, str | bool | float] = {
        protocol.RUN_EXPERIMENT: str(experiment),
        protocol.RUN_PROJECT_DIR: str(project_dir.resolve()),
        protocol.RUN_OUTPUT_DIR: str(output),
        protocol.RUN_BASELINE: baseline,
        protocol.RUN_CENTRALISED: centralised,
        protocol.RUN_RESUME: resume,
    }
    home = Path(tempfile.mkdtemp(prefix="more-fl-run-"))
    federation = LocalFederation(home, project_dir)
    run_id: int | None = None
    started = time.time()
    try:
        echo(f"more-fl run: {config.name}, {count} simulated sites -> {output}")
        federation.start()
        log = federation.submit(project_dir, count, run_config)
        runner = federation.processes.started["run"]
        offset = 0

        def show(line: str) -> None:
            nonlocal run_id
            run_id = run_id or started_run_id(line)
            echo(line)

        while runner.poll() is None:
            offset = _stream(log, offset, show)
            time.sleep(0.2)
        _stream(log, offset, show)
        if run_id is None:
            raise LaunchError(f"flwr run did not start a run; see {log}")
        status = federation.status(run_id)
    except KeyboardInterrupt:
        if run_id is not None:
            federation.flwr("stop", str(run_id), "local")
        raise
    finally:
        federation.processes.stop()
        shutil.rmtree(home, ignore_errors=True)
    cause = None
    status_file = output / STATUS
    if status_file.is_file() and status_file.stat().st_mtime >= started:
        outcome = json.loads(status_file.read_text(encoding="utf-8"))
        cause = outcome.get("cause")
    elif status != "finished:completed":
        cause = f"the run ended {status} before its report was written"
    return RunResult(run_id, status, cause, output / "report.md")


def app_of(experiment: Path) -> Path:
    """The Flower app an experiment belongs to: the nearest folder above it whose
    pyproject.toml declares ``[tool.flwr.app]`` (a study made with ``more-fl new``), else
    more-fl's own app."""
    for folder in experiment.resolve().parents:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError):
                continue
            if "app" in declared.get("tool", {}).get("flwr", {}):
                return folder
    return PROJECT_DIR


def cli_run(experiment: Path, *, sites: int | None, output_dir: Path | None, resume: bool) -> int:
    """``more-fl run``: 0 for a completed run, 1 for a failed one (its cause the last line)."""
    result = run_federation(
        experiment,
        sites=sites,
        output_dir=output_dir,
        resume=resume,
        project_dir=app_of(experiment),
    )
    if result.ok:
        print(f"more-fl run: run {result.run_id} completed; report: {result.report}")
        return 0
    print(f"more-fl run: run {result.run_id} failed: {result.cause}", file=sys.stderr)
    return 1
