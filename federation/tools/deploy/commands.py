"""The command lines of a deployment: SuperLink, SuperNodes (with their node config), the
Flower CLI's connection and the app's run config."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from federation import protocol
from federation.config import DeploymentConfig, DeploySite
from federation.tools.deploy import DeployError
from federation.tools.deploy.pki import TlsFiles, ensure_certificates, ensure_node_key

PROJECT_DIR = Path(__file__).resolve().parents[3]
"""The Flower app this package belongs to (its pyproject.toml names the apps)."""

CONNECTION = "more-fl"


def tls_files(dep: DeploymentConfig) -> TlsFiles | None:
    """The SuperLink's TLS files (generated when missing and allowed), or None without TLS."""
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
    return supernode_command(dep, dep.site(name), tls_files(dep))


def flwr_config(dep: DeploymentConfig, tls: TlsFiles | None) -> str:
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


def started_run_id(line: str) -> int | None:
    """The run id in `flwr run`'s "Successfully started run <id>" line, if it is that line."""
    if line.startswith("Successfully started run "):
        return int(line.split()[3])
    return None
