"""Deployment pieces: the schema, certificates, SuperNode keys, commands, process cleanup.

The loopback deployment itself (real SuperLink and SuperNodes) is in tests/e2e/test_flwr_run.py.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from federation.config import (
    ConfigError,
    deployment_from_dict,
    load_deployment,
    load_experiment,
)
from federation.tools.deploy import DeployError, commands, pki, processes, run
from tests.paths import ROOT

SHIPPED = sorted((ROOT / "configs" / "deployments").glob("*.yaml"))


def _deployment(tmp_path: Path, **changes: object) -> dict:
    data: dict = {
        "experiment": str(ROOT / "configs" / "wbc.yaml"),
        "work_dir": str(tmp_path / "work"),
        "superlink": {"host": "127.0.0.1", "port": 39900},
        "tls": {"enabled": True, "generate": True},
        "node_auth": {"enabled": True},
        "sites": [{"name": "a", "id": 0}, {"name": "b", "id": 1, "data_dir": "/data/b"}],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_deployments_load_and_name_an_existing_experiment(path: Path) -> None:
    dep = load_deployment(path)
    assert dep.experiment.is_file()
    assert len({s.port for s in dep.sites} | {dep.port}) == len(dep.sites) + 1
    if path.name == "local-tls.yaml":
        assert dep.tls.enabled and dep.node_auth


def test_defaults_fill_ports_and_work_directories(tmp_path: Path) -> None:
    dep = deployment_from_dict(_deployment(tmp_path), source="d.yaml", base=tmp_path)
    assert [s.port for s in dep.sites] == [39901, 39902]
    assert dep.tls.cert_dir == tmp_path / "work" / "certs"
    assert dep.auth_dir == tmp_path / "work" / "node-keys"
    assert dep.site("b").data_dir == Path("/data/b")
    with pytest.raises(ConfigError, match="no site named 'c'"):
        dep.site("c")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls": {"enabled": False}}, "'node_auth.enabled' needs 'tls.enabled: true'"),
        ({"superlink": {"port": 70000}}, "'superlink.port' must be a port number"),
        ({"sites": []}, "'sites' must be a non-empty list"),
        ({"sites": [{"name": "a"}, {"name": "a"}]}, "must not repeat a name"),
        ({"sites": [{"name": "a", "port": 39900}]}, "equals 'superlink.port'"),
        ({"sites": [{"name": "a", "colour": "red"}]}, "unknown key 'sites[0].colour'"),
        ({"run": {"timeout": 0}}, "'run.timeout' must be a number > 0"),
        ({"experiment": None}, "'experiment' must be a path, got None"),
        ({"work_dir": None}, "'work_dir' must be a path, got None"),
        ({"superlink": {"host": None}}, "'superlink.host' must be a non-empty string"),
        ({"sites": [{"name": None}]}, "'sites[0].name' must be a non-empty string"),
        ({"key": {"generate": True}}, "'key.generate' needs 'key.file'"),
        ({"key": {"file": "k.key", "make": True}}, "unknown key 'key.make'"),
    ],
)
def test_bad_deployments_name_file_key_and_expectation(
    tmp_path: Path, changes: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"^d\.yaml: .*" + re.escape(message)):
        deployment_from_dict(_deployment(tmp_path, **changes), source="d.yaml", base=tmp_path)


def test_generated_certificates_form_a_chain_for_the_superlink_host(tmp_path: Path) -> None:
    files = pki.ensure_certificates(tmp_path / "certs", "10.1.2.3", generate=True)
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server = x509.load_pem_x509_certificate(files.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    again = pki.ensure_certificates(tmp_path / "certs", "10.1.2.3", generate=True)
    assert again.cert.read_bytes() == files.cert.read_bytes()  # kept, not regenerated
    with pytest.raises(DeployError, match="needs ca.crt"):
        pki.ensure_certificates(tmp_path / "none", "127.0.0.1", generate=False)


def test_node_keys_are_what_flower_accepts(tmp_path: Path) -> None:
    private, public = pki.ensure_node_key(tmp_path, "hospital-a")
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert try_load_public_key(public)  # as `flwr supernode register` validates it


def test_commands_carry_tls_authentication_and_the_site(tmp_path: Path) -> None:
    dep = deployment_from_dict(_deployment(tmp_path), source="d.yaml", base=tmp_path)
    tls = pki.ensure_certificates(tmp_path / "certs", dep.host, generate=True)
    link = commands.superlink_command(dep, tls)
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert "--disable-runtime-dependency-installation" in link
    node = commands.supernode_command(dep, dep.site("b"), tls)
    assert node[node.index("--superlink") + 1] == "127.0.0.1:39900"
    assert node[node.index("--root-certificates") + 1] == str(tls.ca)
    assert node[node.index("--node-config") + 1] == 'site-id=1 data-dir="/data/b"'
    assert Path(node[node.index("--auth-supernode-private-key") + 1]).is_file()
    plain = deployment_from_dict(
        _deployment(tmp_path, tls={"enabled": False}, node_auth={"enabled": False}),
        source="d.yaml",
        base=tmp_path,
    )
    assert "--insecure" in commands.superlink_command(plain, None)
    assert "--insecure" in commands.supernode_command(plain, plain.site("a"), None)


def test_a_quote_in_a_site_path_is_refused(tmp_path: Path) -> None:
    data = _deployment(tmp_path, sites=[{"name": "a", "key_file": '/keys/"x".key'}])
    dep = deployment_from_dict(data, source="d.yaml", base=tmp_path)
    with pytest.raises(DeployError, match="cannot contain quotes"):
        commands.node_config(dep.site("a"))


def test_an_experiment_inside_the_project_is_named_relative_to_it(tmp_path: Path) -> None:
    dep = deployment_from_dict(_deployment(tmp_path), source="d.yaml", base=tmp_path)
    config = commands.run_config(dep, ROOT)
    assert config["experiment"] == "configs/wbc.yaml"
    assert config["project-dir"] == str(ROOT)
    assert config["baseline"] is False and config["centralised"] is False


def test_more_fl_site_prints_the_supernode_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(_deployment(tmp_path)), encoding="utf-8")
    assert run.cli_site(path, "b", print_only=True) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("FLWR_TELEMETRY_ENABLED=0 ")
    assert "flower-supernode --superlink 127.0.0.1:39900" in line
    assert "'site-id=1 data-dir=\"/data/b\"'" in line


def test_stopping_ends_every_process_started_including_detached_grandchildren(
    tmp_path: Path,
) -> None:
    spawn = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True);"
        "time.sleep(60)"
    )
    procs = processes.Processes(dict(os.environ), tmp_path, tmp_path / "logs")
    procs.start("tree", [sys.executable, "-c", spawn], home=tmp_path / "home")
    deadline = time.monotonic() + 20
    while len(procs.tree()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = procs.tree()
    assert len(pids) == 2
    procs.stop(grace=5)
    assert not any(processes.alive(p) for p in pids)


def _insecure_one_site(tmp_path: Path) -> Path:
    data = _deployment(
        tmp_path,
        tls={"enabled": False},
        node_auth={"enabled": False},
        superlink={"host": "127.0.0.1", "port": _free_port()},
        sites=[{"name": "a", "id": 0, "port": _free_port()}],
        key={"file": str(tmp_path / "keys" / "federation.key"), "generate": True},
    )
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    dep = load_deployment(_insecure_one_site(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", dep.port))
        taken.listen()
        with pytest.raises(DeployError, match=f"port {dep.port} on 127.0.0.1 is not free"):
            run.deploy(dep, echo=lambda _: None)
    assert not (tmp_path / "work" / "logs").exists()


def test_sigterm_stops_the_superlink_and_supernodes_it_started(tmp_path: Path) -> None:
    path = _insecure_one_site(tmp_path)
    script = (
        "import sys; from federation.config import load_deployment; "
        "from federation.tools.deploy.run import deploy; "
        f"deploy(load_deployment({str(path)!r}), echo=lambda s: print(s, flush=True))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("started SuperNode a"):
            break
    started = [p for p in processes.descendants(proc.pid) if processes.alive(p)]
    assert len(started) >= 2  # the SuperLink and the SuperNode (and their helpers)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "stopping the SuperLink and SuperNodes" in proc.stdout.read()
    assert not [p for p in started if processes.alive(p)]


def _time_wait_port() -> int:
    """A 127.0.0.1 port whose only socket lingers in TIME_WAIT: the server side closed first,
    as a SuperLink does when a finished federation is stopped. The server binds with
    SO_REUSEADDR, as servers (gRPC's among them) do: Linux lets a port be bound again while
    its connections linger only when both binds ask for it."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        conn, _ = server.accept()
        conn.close()  # the active close: this end enters TIME_WAIT after the client's FIN
        client.settimeout(2)
        assert client.recv(1) == b""
        client.close()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        with socket.socket() as plain:  # no SO_REUSEADDR: refused while TIME_WAIT lasts
            try:
                plain.bind(("127.0.0.1", port))
            except OSError:
                return port
        time.sleep(0.05)
    pytest.skip("this system let a TIME_WAIT port be bound without SO_REUSEADDR")


def test_a_port_in_time_wait_counts_as_free() -> None:
    port = _time_wait_port()
    run._ensure_free("127.0.0.1", [port])


@pytest.mark.parametrize("reuse", [False, True])
def test_a_listening_port_counts_as_taken(reuse: bool) -> None:
    with socket.socket() as taken:
        if reuse:  # as servers (gRPC among them) bind
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with pytest.raises(DeployError, match=f"port {port} on 127.0.0.1 is not free"):
            run._ensure_free("127.0.0.1", [port])


def test_key_generate_makes_the_shared_key_once_and_every_site_without_one_uses_it(
    tmp_path: Path,
) -> None:
    data = _deployment(tmp_path, key={"file": "keys/federation.key", "generate": True})
    data["sites"][1]["key_file"] = "/keys/own.key"
    dep = deployment_from_dict(data, source="d.yaml", base=tmp_path)
    shared = tmp_path / "keys" / "federation.key"
    assert dep.site("a").key_file == shared and dep.site("b").key_file == Path("/keys/own.key")
    experiment = load_experiment(dep.experiment)
    lines: list[str] = []
    dep = deployment_from_dict(_deployment(tmp_path, key=data["key"]), source="d", base=tmp_path)
    run._ensure_keys(dep, experiment, lines.append)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600
    made = shared.read_bytes()
    assert len(lines) == 1 and lines[0].startswith(f"made the federation key {shared}")
    run._ensure_keys(dep, experiment, lines.append)  # there already: kept as it is
    assert shared.read_bytes() == made and len(lines) == 1


@pytest.mark.parametrize("key", [None, {"file": "missing.key"}], ids=["none", "missing"])
def test_a_site_without_a_key_file_stops_the_deployment_before_anything_starts(
    tmp_path: Path, key: dict | None
) -> None:
    data = _deployment(tmp_path, **({"key": key} if key else {}))
    dep = deployment_from_dict(data, source="d.yaml", base=tmp_path)
    want = "has no key file" if key is None else "missing.key not found; make it with"
    with pytest.raises(DeployError, match=want) as raised:
        run.deploy(dep, echo=lambda _: None)
    assert "more-fl keygen --out" in str(raised.value)
    assert not (tmp_path / "work").exists()  # no certificate, log or process
