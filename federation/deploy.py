"""A whole federation on real Flower processes: one SuperLink, one SuperNode per site.

:func:`deploy` starts ``flower-superlink`` and one ``flower-supernode`` per site (its node
config names the site and its own data directory and key file), generates TLS certificates
and SuperNode authentication keys on request, submits the app with ``flwr run`` against that
SuperLink (the connection lives in a private ``FLWR_HOME``), waits for the run, and stops
every process it started, on success, failure, timeout, Ctrl-C or SIGTERM alike: each is
started in its own process group, and its descendants (Flower's SuperExec, ServerApp and
ClientApp processes) are found through ``/proc`` and stopped with it.

:func:`site_command` is what a hospital runs on its own host to join the federation.

Flower 1.41 and 1.42 facts this relies on: the SuperLink serves its Fleet, Control and
Runtime APIs on one HTTP port; a SuperNode serves its ClientApps on a local port of its own; runtime
dependency installation must be off (the app runs in this virtualenv); SuperNode
authentication needs TLS and the nodes' public keys registered with ``flwr supernode
register`` before they connect.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import protocol
from federation.aggregation import RunStore
from federation.atomic import atomic_write_bytes
from federation.config import (
    DeploymentConfig,
    DeploySite,
    ExperimentConfig,
    load_deployment,
    load_experiment,
)
from federation.more.keys import generate_key, load_key, save_key

PROJECT_DIR = Path(__file__).resolve().parents[1]
"""The Flower app this package belongs to (its pyproject.toml names the apps)."""

CONNECTION = "more-fl"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    # The app runs in this virtualenv; Flower would otherwise `uv sync` a fresh one per run.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env() -> dict[str, str]:
    """This environment for Flower's processes, with this virtualenv's commands first."""
    env = {**os.environ, **FLOWER_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class DeployError(RuntimeError):
    """The federation could not be started or did not finish."""


# --- certificates and keys --------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _subject(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _san(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    unique: list[x509.GeneralName] = []
    for n in names:
        if n not in unique:
            unique.append(n)
    return unique


def ensure_certificates(cert_dir: Path, host: str, *, generate: bool) -> TlsFiles:
    """``ca.crt``, ``server.pem`` and ``server.key`` in ``cert_dir``, generated when missing
    and allowed: a private CA (its key is discarded) signs a server certificate valid for
    ``host``, localhost and 127.0.0.1 (the SuperLink's own SuperExec connects locally)."""
    files = TlsFiles(cert_dir / "ca.crt", cert_dir / "server.pem", cert_dir / "server.key")
    if all(p.is_file() for p in (files.ca, files.cert, files.key)):
        return files
    if not generate:
        raise DeployError(
            f"{cert_dir}: needs ca.crt, server.pem and server.key (or set tls.generate: true)"
        )
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_subject("more-fl federation CA"))
        .issuer_name(_subject("more-fl federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_subject(host))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(_san(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    atomic_write_bytes(files.ca, ca.public_bytes(pem))
    atomic_write_bytes(files.cert, server.public_bytes(pem))
    atomic_write_bytes(
        files.key,
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        mode=0o600,
    )
    return files


def ensure_node_key(key_dir: Path, site: str) -> tuple[Path, Path]:
    """The SuperNode authentication key pair of ``site`` (EC P-384, OpenSSH format), made
    when missing: the private key stays with the site, the public key is registered."""
    private, public = key_dir / f"{site}.key", key_dir / f"{site}.key.pub"
    if private.is_file() and public.is_file():
        return private, public
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write_bytes(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    atomic_write_bytes(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
    )
    return private, public


# --- commands ---------------------------------------------------------------------------


def _tls(dep: DeploymentConfig) -> TlsFiles | None:
    if not dep.tls.enabled:
        return None
    assert dep.tls.cert_dir is not None
    return ensure_certificates(dep.tls.cert_dir, dep.host, generate=dep.tls.generate)


def superlink_command(dep: DeploymentConfig, tls: TlsFiles | None) -> list[str]:
    argv = ["flower-superlink", "--host", dep.host, "--port", str(dep.port)]
    argv += ["--disable-runtime-dependency-installation"]
    if tls is None:
        argv += ["--insecure"]
    else:
        argv += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert)]
        argv += ["--ssl-keyfile", str(tls.key)]
    if dep.node_auth:
        argv += ["--enable-supernode-auth"]
    return argv


def _quoted(value: Path) -> str:
    text = str(value)
    if '"' in text or "'" in text:
        raise DeployError(f"paths in a node config cannot contain quotes: {text}")
    return f'"{text}"'


def node_config(site: DeploySite) -> str:
    """The SuperNode's ``--node-config``: which site it is, and its own data and key."""
    items = [f"{protocol.NODE_SITE_ID}={site.site_id}"]
    if site.data_dir is not None:
        items.append(f"{protocol.NODE_DATA_DIR}={_quoted(site.data_dir)}")
    if site.key_file is not None:
        items.append(f"{protocol.NODE_KEY_FILE}={_quoted(site.key_file)}")
    return " ".join(items)


def supernode_command(dep: DeploymentConfig, site: DeploySite, tls: TlsFiles | None) -> list[str]:
    argv = ["flower-supernode", "--superlink", f"{dep.host}:{dep.port}"]
    argv += ["--host", "127.0.0.1", "--port", str(site.port)]
    argv += ["--node-config", node_config(site)]
    argv += ["--insecure"] if tls is None else ["--root-certificates", str(tls.ca)]
    if dep.node_auth:
        private, _ = ensure_node_key(dep.auth_dir, site.name)
        argv += ["--auth-supernode-private-key", str(private)]
    return argv


def site_command(dep: DeploymentConfig, name: str) -> list[str]:
    """The command site ``name`` runs on its own host to join (``more-fl site``)."""
    return supernode_command(dep, dep.site(name), _tls(dep))


def _flwr_config(dep: DeploymentConfig, tls: TlsFiles | None) -> str:
    """A Flower CLI config whose default connection is this federation's SuperLink."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{dep.host}:{dep.port}"',
    ]
    if tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(tls.ca))}")
    return "\n".join(lines) + "\n"


def _toml_value(value: str | bool | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def write_run_config(path: Path, settings: dict[str, str | bool | float]) -> Path:
    """A run config as the TOML file ``flwr run --run-config`` reads."""
    path.write_text(
        "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()), encoding="utf-8"
    )
    return path


def run_config(dep: DeploymentConfig, project_dir: Path) -> dict[str, str | bool | float]:
    """The app's run config for this deployment. An experiment inside the project is named
    relative to it, so a site on another host finds it in the app Flower installed. No
    plaintext baseline (a deployed site refuses to send plaintext) and no centralised
    reference (the aggregator of a real federation does not hold the data)."""
    experiment = dep.experiment.resolve()
    with contextlib.suppress(ValueError):
        experiment = experiment.relative_to(project_dir.resolve())
    return {
        protocol.RUN_EXPERIMENT: str(experiment),
        protocol.RUN_PROJECT_DIR: str(project_dir.resolve()),
        protocol.RUN_OUTPUT_DIR: str(dep.output_dir.resolve()) if dep.output_dir else "",
        protocol.RUN_BASELINE: False,
        protocol.RUN_CENTRALISED: False,
        protocol.RUN_RESUME: True,
        protocol.RUN_ROUND_TIMEOUT: float(dep.round_timeout),
        protocol.RUN_JOIN_TIMEOUT: 60.0,
    }


# --- processes --------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process (Linux ``/proc``; empty elsewhere)."""
    tree: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return tree
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def session_members(sids: set[int]) -> list[int]:
    """Processes in any of the sessions ``sids``: also those re-parented to init when their
    parent exited (Linux ``/proc``; empty elsewhere)."""
    members = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in sids:
            members.append(int(entry.name))
    return members


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (not merely a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Processes:
    """Processes started here, each in its own process group; :meth:`stop` ends them and
    everything they started, politely first (SIGTERM), then SIGKILL after ``grace``."""

    env: dict[str, str]
    cwd: Path
    log_dir: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def start(self, name: str, argv: list[str], *, home: Path) -> subprocess.Popen[bytes]:
        home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A Ctrl-C or SIGTERM arriving between the fork and the bookkeeping would orphan the
        # child: hold those signals until it is registered (the child gets the old mask).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            with (self.log_dir / f"{name}.log").open("wb") as log:
                proc = subprocess.Popen(
                    argv,
                    cwd=self.cwd,
                    env={**self.env, "FLWR_HOME": str(home)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, mask),
                )
            self.started[name] = proc
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return proc

    def tree(self) -> set[int]:
        """Every live process started here or by them (remembered for :meth:`stop`)."""
        for proc in self.started.values():
            if proc.poll() is None:
                self.seen.add(proc.pid)
                self.seen.update(descendants(proc.pid))
        # Each was started in a session of its own: catch members whose parent exited.
        self.seen.update(session_members({proc.pid for proc in self.started.values()}))
        return {pid for pid in self.seen if alive(pid)}

    def check(self, names: list[str]) -> None:
        for name in names:
            code = self.started[name].poll()
            if code is not None:
                log = self.log_dir / f"{name}.log"
                raise DeployError(f"{name} exited with code {code}; see {log}")

    def stop(self, grace: float = 15.0) -> None:
        pids = self.tree()
        for proc in reversed(list(self.started.values())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            for proc in self.started.values():
                proc.poll()
            time.sleep(0.2)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # SIGKILL is delivered asynchronously: return only once nothing is running.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C does, so the processes are stopped either way."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while stopping: the stop they ask for is under way, and a
    second Ctrl-C (people press it twice) must not leave the processes half-stopped."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the deployment ---------------------------------------------------------------------


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


def started_run_id(line: str) -> int | None:
    """The run id in `flwr run`'s "Successfully started run <id>" line, if it is that line."""
    if line.startswith("Successfully started run "):
        return int(line.split()[3])
    return None


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
        try:
            save_key(generate_key(), dep.key_file, parents=True)
        except OSError as exc:
            raise DeployError(f"cannot write the federation key {dep.key_file}: {exc}") from None
        echo(f"made the federation key {dep.key_file} ({load_key(dep.key_file).fingerprint})")
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
    tls = _tls(dep)
    cli_home = dep.work_dir / "homes" / "cli"
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(_flwr_config(dep, tls), encoding="utf-8")
    fed = Federation(dep, Processes(flower_env(), project_dir, dep.work_dir / "logs"), output_dir)
    start = time.monotonic()
    with _sigterm_as_exit():
        try:
            _start_federation(fed, tls, echo)
            runner = _submit(fed, project_dir)
            status = _follow(
                fed, runner, deadline=start + dep.timeout, poll=poll, echo=echo, watch=watch
            )
        finally:
            with _uninterrupted():
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
