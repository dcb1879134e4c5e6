"""``more-fl deploy`` and ``more-fl site``: start the federation, run the app once, follow its
rounds, stop everything (see the package's docstring)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from federation import protocol
from federation.aggregation import RunStore
from federation.config import (
    DeploymentConfig,
    ExperimentConfig,
    load_deployment,
    load_experiment,
)
from federation.more.keys import generate_key, save_key
from federation.tools.deploy import DeployError
from federation.tools.deploy.commands import (
    CONNECTION,
    PROJECT_DIR,
    flwr_config,
    run_config,
    site_command,
    started_run_id,
    superlink_command,
    supernode_command,
    tls_files,
    write_run_config,
)
from federation.tools.deploy.pki import TlsFiles, ensure_node_key
from federation.tools.deploy.processes import (
    FLOWER_ENV,
    Processes,
    flower_env,
    sigterm_as_exit,
    uninterrupted,
)


@dataclass
class Federation:
    """A running deployment, as :func:`deploy` hands it to its ``watch`` callback."""

    config: DeploymentConfig
    processes: Processes
    output_dir: Path
    run_id: int | None = None


@dataclass(frozen=True)
class DeploymentResult:
    run_id: int
    status: str
    output_dir: Path
    report: Path
    logs: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def _flwr(fed: Federation, *args: str, timeout: float = 120.0) -> str:
    """Run the ``flwr`` CLI against this federation; its stdout, or DeployError."""
    env = {**fed.processes.env, "FLWR_HOME": str(fed.config.work_dir / "homes" / "cli")}
    done = subprocess.run(
        ["flwr", *args],
        cwd=fed.processes.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise DeployError(f"flwr {' '.join(args)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


def _wait_healthy(fed: Federation, tls: TlsFiles | None, timeout: float = 60.0) -> None:
    """Until the SuperLink answers its health check (over TLS when on), or it died."""
    dep = fed.config
    scheme = "http" if tls is None else "https"
    context = None if tls is None else ssl.create_default_context(cafile=str(tls.ca))
    url = f"{scheme}://{dep.host}:{dep.port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fed.processes.check(["superlink"])
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise DeployError(f"the SuperLink did not answer at {url} within {timeout:g} s")


def _run_id(log: Path) -> int | None:
    """The run id `flwr run` printed, once it has."""
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if (run_id := started_run_id(line)) is not None:
                return run_id
    return None


def _status(fed: Federation) -> str:
    out = _flwr(fed, "ls", "--run-id", str(fed.run_id), "--format", "json")
    return str(json.loads(out)["runs"][0]["status"])


def _progress(fed: Federation, shown: dict[str, int], echo: Callable[[str], None]) -> None:
    for mode in protocol.MODES:
        path = fed.output_dir / mode / RunStore.HISTORY
        if not path.is_file():
            continue
        with contextlib.suppress(ValueError, OSError):
            history = json.loads(path.read_text(encoding="utf-8"))
            for entry in history[shown.get(mode, 0) :]:
                shown_metrics = list(entry["evaluate"].items())[:3]
                metrics = ", ".join(f"{k} {v:.4f}" for k, v in shown_metrics)
                echo(f"{mode} round {entry['round']}: {entry['sites']} sites, {metrics}")
            shown[mode] = len(history)


def _ensure_free(host: str, ports: list[int]) -> None:
    """Refuse to start when a port is taken (another federation might answer instead).

    The probe binds as a server does, with ``SO_REUSEADDR``: a port whose last connection
    lingers in TIME_WAIT (a federation that just ended) is free to serve again, while one a
    process listens on is still refused.
    """
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise DeployError(f"port {port} on {host} is not free: {exc}") from None


def _start_federation(fed: Federation, tls: TlsFiles | None, echo: Callable[[str], None]) -> None:
    """SuperLink, then (registered, if authentication is on) one SuperNode per site."""
    dep, homes = fed.config, fed.config.work_dir / "homes"
    _ensure_free(dep.host, [dep.port])
    _ensure_free("127.0.0.1", [s.port for s in dep.sites])
    echo(f"starting SuperLink on {dep.host}:{dep.port} (TLS {'on' if tls else 'off'})")
    fed.processes.start("superlink", superlink_command(dep, tls), home=homes / "superlink")
    _wait_healthy(fed, tls)
    for site in dep.sites:
        if dep.node_auth:
            _, public = ensure_node_key(dep.auth_dir, site.name)
            _flwr(fed, "supernode", "register", str(public), CONNECTION)
        argv = supernode_command(dep, site, tls)
        fed.processes.start(f"supernode-{site.name}", argv, home=homes / site.name)
        echo(f"started SuperNode {site.name} (site {site.site_id})")


def _submit(fed: Federation, project_dir: Path) -> subprocess.Popen[bytes]:
    """One streaming ``flwr run``: it ends when the run does, and its output is the log."""
    settings = run_config(fed.config, project_dir)
    config_file = write_run_config(fed.config.work_dir / "run-config.toml", settings)
    argv = ["flwr", "run", str(project_dir), CONNECTION, "--run-config", str(config_file)]
    return fed.processes.start(
        "run", [*argv, "--stream"], home=fed.config.work_dir / "homes" / "cli"
    )


def _follow(
    fed: Federation,
    runner: subprocess.Popen[bytes],
    *,
    deadline: float,
    poll: float,
    echo: Callable[[str], None],
    watch: Callable[[Federation], None] | None,
) -> str:
    """Wait for the run to finish, reporting rounds as they complete; its final status."""
    shown: dict[str, int] = {}
    log = fed.processes.log_dir / "run.log"
    while True:
        if time.monotonic() > deadline:
            raise DeployError(f"the run did not finish within {fed.config.timeout:g} s")
        fed.processes.check(["superlink"])
        fed.processes.tree()
        if fed.run_id is None and (run_id := _run_id(log)) is not None:
            fed.run_id = run_id
            echo(f"run {run_id} started; results go to {fed.output_dir}")
        if watch is not None:
            watch(fed)
        _progress(fed, shown, echo)
        if runner.poll() is not None:
            if fed.run_id is None:
                raise DeployError(f"flwr run failed; see {log}")
            status = _status(fed)
            if status.startswith("finished"):
                _progress(fed, shown, echo)
                return status
        time.sleep(poll)


def _ensure_keys(
    dep: DeploymentConfig, experiment: ExperimentConfig, echo: Callable[[str], None]
) -> None:
    """Every site's key file (its own, else the experiment's) exists before any process
    starts; the deployment's shared key is made here when it asks to be (``key.generate``)
    and is missing."""
    if dep.generate_key and dep.key_file is not None and not dep.key_file.exists():
        key = generate_key()
        try:
            save_key(key, dep.key_file, parents=True)
        except OSError as exc:
            raise DeployError(f"cannot write the federation key {dep.key_file}: {exc}") from None
        echo(f"made the federation key {dep.key_file} ({key.fingerprint})")
    if not experiment.federation.encrypted:
        return
    for site in dep.sites:
        key_file = site.key_file or experiment.encryption.key_file
        if key_file is None:
            raise DeployError(
                f"{dep.source}: site {site.name!r} has no key file (a deployed site refuses the "
                "simulation key): name one in its 'key_file' or in 'key.file', made with "
                "`more-fl keygen --out FILE --parents` (or 'key.generate: true' on one machine)"
            )
        if not key_file.is_file():
            raise DeployError(
                f"{dep.source}: site {site.name!r}: key file {key_file} not found; make "
                f"it with `more-fl keygen --out {key_file} --parents` and give it to every "
                "site over the hospitals' own channel (or set 'key.generate: true' on one machine)"
            )


def deploy(
    dep: DeploymentConfig,
    *,
    project_dir: Path = PROJECT_DIR,
    echo: Callable[[str], None] = print,
    watch: Callable[[Federation], None] | None = None,
    poll: float = 2.0,
) -> DeploymentResult:
    """Start the federation, run the app once, stop everything; the run's outcome.

    ``watch`` is called at every poll while the run is going (to follow or disturb it).
    Raises DeployError if the processes cannot start or the run exceeds ``dep.timeout``.
    A run directory that already holds checkpoints is resumed after its last round.
    """
    experiment = load_experiment(dep.experiment)
    for site in dep.sites:
        if not 0 <= site.site_id < experiment.sites.count:
            raise DeployError(
                f"{dep.source}: site {site.name!r} has id {site.site_id}, but experiment "
                f"{experiment.name!r} has sites 0..{experiment.sites.count - 1}"
            )
    output_dir = (dep.output_dir or experiment.output_dir).resolve()
    _ensure_keys(dep, experiment, echo)
    tls = tls_files(dep)
    cli_home = dep.work_dir / "homes" / "cli"
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(flwr_config(dep, tls), encoding="utf-8")
    fed = Federation(dep, Processes(flower_env(), project_dir, dep.work_dir / "logs"), output_dir)
    start = time.monotonic()
    with sigterm_as_exit():
        try:
            _start_federation(fed, tls, echo)
            runner = _submit(fed, project_dir)
            status = _follow(
                fed, runner, deadline=start + dep.timeout, poll=poll, echo=echo, watch=watch
            )
        finally:
            with uninterrupted():
                echo("stopping the SuperLink and SuperNodes")
                fed.processes.stop()
    assert fed.run_id is not None
    return DeploymentResult(
        run_id=fed.run_id,
        status=status,
        output_dir=output_dir,
        report=output_dir / "report.md",
        logs=fed.processes.log_dir,
        seconds=time.monotonic() - start,
    )


# --- CLI hooks (``more-fl deploy`` / ``more-fl site``) ----------------------------------


def cli_deploy(config_path: Path) -> int:
    """``more-fl deploy --config CONFIG``: run the federation; 0 when the run completed."""
    try:
        result = deploy(load_deployment(config_path))
    except DeployError as exc:
        print(f"more-fl deploy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("more-fl deploy: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    print(f"run {result.run_id}: {result.status} in {result.seconds:.0f} s")
    print(f"report: {result.report}\nlogs: {result.logs}")
    return 0 if result.ok else 1


def cli_site(config_path: Path, site: str, *, print_only: bool) -> int:
    """``more-fl site --config CONFIG --site NAME [--print]``: print, or become, the
    SuperNode command of one site (Ctrl-C stops it)."""
    try:
        argv = site_command(load_deployment(config_path), site)
    except DeployError as exc:
        print(f"more-fl site: error: {exc}", file=sys.stderr)
        return 2
    env_prefix = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())
    if print_only:
        print(f"{env_prefix} {shlex.join(argv)}")
        return 0
    os.execvpe(argv[0], argv, flower_env())
