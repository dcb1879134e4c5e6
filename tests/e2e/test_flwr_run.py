"""End to end on real Flower processes (slow): `flwr run .` simulations (MNIST with a batch-norm
CNN, SecAgg+, Flower's bare defaults, a study made with `more-fl new`), the README's first
command in a fresh clone, and a loopback deployment over TLS with SuperNode authentication
and SecAgg+ in which one site is killed.

Each test uses its own FLWR_HOME and free ports, and stops every process it caused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from federation.aggregation import RunStore
from federation.config import load_deployment
from federation.more.keys import generate_key, save_key
from federation.tools.deploy.processes import alive, descendants, flower_env
from federation.tools.deploy.run import Federation, deploy
from tests.paths import ROOT, SHARED_MNIST

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _experiment(tmp: Path, name: str, task: dict, sites: int, rounds: int, **extra: object) -> Path:
    data = {
        "name": name,
        "task": task,
        "sites": {"count": sites},
        "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, **extra},
        "federation": {"min_sites": 2},
        "output_dir": f"runs/{name}",
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (our temporary directories)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME and local SuperLink ports; the SuperLink `flwr run` starts (and
    everything under it) is stopped at the end."""
    home = tmp_path_factory.mktemp("flwr-home")
    env = {
        **flower_env(),
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    yield env
    for pid in _pids_mentioning(str(home)):
        tree = [pid, *descendants(pid)]
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
    assert not _pids_wait_gone(str(home))


def _pids_wait_gone(text: str, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in _pids_mentioning(text) if alive(p)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.3)
    return left


def _flwr_run(env: dict[str, str], sites: int, settings: dict[str, object], tmp: Path) -> dict:
    """`flwr run .` in simulation with ``sites`` SuperNodes; the run's `flwr ls` entry."""
    config = tmp / "run-config.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    done = subprocess.run(
        [
            "flwr",
            "run",
            ".",
            "--stream",
            "--run-config",
            str(config),
            "--federation-config",
            f"num-supernodes={sites}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = next(
        line.split()[3] for line in done.stdout.splitlines() if line.startswith("Successfully")
    )
    listed = subprocess.run(
        ["flwr", "ls", "--run-id", run_id, "--format", "json"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (tmp / "run.log").write_text(done.stdout + done.stderr)
    return json.loads(listed.stdout)["runs"][0]


def _encrypted_only(experiment: Path, output: Path) -> dict[str, object]:
    """Run config for the encrypted federation alone (no baseline, no reference)."""
    return {
        "experiment": str(experiment),
        "output-dir": str(output),
        "baseline": False,
        "centralised": False,
        "resume": False,
    }


def test_flwr_run_trains_mnist_with_a_batch_norm_cnn_encrypted(
    flwr_env: dict[str, str], tmp_path: Path
) -> None:
    """MNIST from the shared files through real Flower, with the ReLU/BatchNorm/MaxPool CNN
    (batch-norm statistics and their integer counter travel and average like weights); the
    other task models run the same federation in-process
    (tests/federation/test_federated_models.py)."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the shared MNIST test split is not at {SHARED_MNIST}")
    spec = {
        "name": "mnist",
        "data_dir": str(SHARED_MNIST),
        "options": {"split": "carve", "n_train": 300, "n_test": 100},
    }
    experiment = _experiment(tmp_path, "mnist-e2e", spec, 2, 1, dtype="float32")
    data = yaml.safe_load(experiment.read_text())
    data["model"] = {"arch": "relu-cnn"}
    experiment.write_text(yaml.safe_dump(data))
    settings = _encrypted_only(experiment, tmp_path / "out")
    run = _flwr_run(flwr_env, 2, settings, tmp_path)
    assert run["status"] == "finished:completed", (tmp_path / "run.log").read_text()
    (entry,) = json.loads((tmp_path / "out" / "encrypted" / RunStore.HISTORY).read_text())
    assert entry["sites"] == 2 and 0.0 <= entry["evaluate"]["accuracy"] <= 1.0


def test_loopback_deployment_over_tls_survives_a_killed_site_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """TLS, SuperNode authentication and SecAgg+ on real SuperNodes (a ClientApp process per
    message): the killed site dies after sharing its keys, its masks are rebuilt from the
    other sites' shares. (An unmasked round losing a site is tested in-process, in
    tests/flower/test_apps.py; the deployment machinery is the same.)"""
    experiment = _experiment(
        tmp_path, "wbc-deploy", {"name": "wbc", "options": {"n_samples": 300}}, 3, 1
    )
    data = yaml.safe_load(experiment.read_text())
    data["federation"]["secure_aggregation"] = {"enabled": True, "max_weight": 1000}
    experiment.write_text(yaml.safe_dump(data))
    key = save_key(generate_key(99), tmp_path / "federation.key")
    port = _free_port()
    spec = {
        "experiment": str(experiment),
        "work_dir": str(tmp_path / "work"),
        "superlink": {"host": "127.0.0.1", "port": port},
        "tls": {"enabled": True, "generate": True},
        "node_auth": {"enabled": True},
        "sites": [
            {"name": name, "id": i, "port": _free_port(), "key_file": str(key)}
            for i, name in enumerate(["a", "b", "c"])
        ],
        "run": {"output_dir": str(tmp_path / "out"), "round_timeout": 90, "timeout": 400},
    }
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    seen: set[int] = set()
    killed: list[int] = []

    def kill_site_c_while_it_trains(fed: Federation) -> None:
        """SIGTERM site c's SuperNode and its ClientApp as soon as c starts training."""
        seen.update(fed.processes.tree())
        site = fed.processes.started["supernode-c"]
        tree = descendants(site.pid)
        if not killed and any(p in _pids_mentioning("flwr-clientapp") for p in tree):
            killed.extend([site.pid, *tree])
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    result = deploy(load_deployment(path), watch=kill_site_c_while_it_trains, poll=0.5)
    assert result.ok, (result.logs / "run.log").read_text()
    assert killed
    (entry,) = json.loads((tmp_path / "out" / "encrypted" / RunStore.HISTORY).read_text())
    assert entry["sites"] == 2
    assert [r["stage"] for r in entry["refused"]] == ["train"]
    assert "Node Unavailable" in entry["refused"][0]["reason"]
    assert "secure" in entry
    checkpoint = RunStore(tmp_path / "out" / "encrypted").load_latest()
    assert checkpoint is not None and checkpoint.fingerprint == generate_key(99).fingerprint
    assert "status: **completed**" in result.report.read_text()
    assert (result.logs / "superlink.log").read_text().count("Activated node_id") >= 3
    assert not [p for p in seen if alive(p)]
    assert not _pids_wait_gone(str(tmp_path))


def test_flwr_run_with_secure_aggregation_sums_masked_updates(
    flwr_env: dict[str, str], tmp_path: Path
) -> None:
    """SecAgg+ in Flower's own simulation runtime (node state kept between its stages)."""
    experiment = _experiment(
        tmp_path, "wbc-secagg", {"name": "wbc", "options": {"n_samples": 300}}, 3, 2
    )
    data = yaml.safe_load(experiment.read_text())
    data["federation"]["secure_aggregation"] = {"enabled": True, "max_weight": 1000}
    experiment.write_text(yaml.safe_dump(data))
    settings = _encrypted_only(experiment, tmp_path / "out")
    run = _flwr_run(flwr_env, 3, settings, tmp_path)
    assert run["status"] == "finished:completed", (tmp_path / "run.log").read_text()
    history = json.loads((tmp_path / "out" / "encrypted" / RunStore.HISTORY).read_text())
    assert [h["sites"] for h in history] == [3, 3]
    assert all(h["secure"]["levels"] == 2**30 and not h["refused"] for h in history)
    assert history[1]["evaluate"]["loss"] < history[0]["evaluate"]["loss"]


def _readme_block(heading: str) -> list[str]:
    """The command lines of the first bash block under ``heading`` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readmes_first_main_command_works_as_pasted(tmp_path: Path) -> None:
    """A fresh clone with ../shared beside it, a fresh FLWR_HOME and no Flower variables:
    the README's first main command completes the default federation and exits 0, ending
    with the summary and the report's path, and leaves no process behind."""
    command = _readme_block("## Main commands")[0]
    assert command.startswith("more-fl run")
    clone = tmp_path / "clone" / "more-fl"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    shutil.copytree(ROOT.parent / "shared", clone.parent / "shared", symlinks=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "MORE_FL_"))}
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    report = clone / "runs" / "wbc" / "report.md"
    assert f"completed; report: {report}" in done.stdout.strip().splitlines()[-1]
    assert "encrypted vs plaintext: largest final metric difference" in out
    assert "status: **completed**" in report.read_text()
    assert "runtime-envs" not in out  # Flower installed nothing
    runs = clone / "runs" / "wbc"
    encrypted = json.loads((runs / "encrypted" / RunStore.HISTORY).read_text())
    plaintext = json.loads((runs / "plaintext" / RunStore.HISTORY).read_text())
    assert [h["sites"] for h in encrypted] == [3] * 10
    for e, p in zip(encrypted, plaintext, strict=True):  # decrypt(encrypted) == plaintext
        assert e["evaluate"]["r2_mean"] == pytest.approx(p["evaluate"]["r2_mean"], abs=1e-10)
    assert not _pids_wait_gone(str(clone))


def test_a_failed_run_exits_non_zero_with_its_cause_last(tmp_path: Path) -> None:
    """MNIST with no data: `more-fl run` ends with one line naming the cause, exit 1."""
    experiment = _experiment(
        tmp_path,
        "mnist-missing",
        {"name": "mnist", "data_dir": str(tmp_path / "no-mnist-here")},
        2,
        1,
    )
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli", "run", "--config", str(experiment)],
        cwd=ROOT,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("more-fl run: run ") and " failed: " in last and "mnist" in last.lower()
    report = (tmp_path / "runs" / "mnist-missing" / "report.md").read_text()
    assert "status: **failed at encrypted round 1" in report


def _bare_flwr_run(app: Path, home: Path, settings: str) -> str:
    """`flwr run . --stream` in ``app`` with Flower's defaults (runtime dependency
    installation on, 2 SuperNodes) in a private FLWR_HOME and free local ports; its output.
    Every process under ``home`` is stopped afterwards."""
    env = flower_env()
    del env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]
    env.update(
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
    )
    try:
        done = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config", settings],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        for pid in _pids_mentioning(str(home)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return done.stdout + done.stderr


def test_bare_flwr_run_installs_nothing_and_fits_flowers_default_node_count(
    tmp_path: Path,
) -> None:
    """`flwr run . --stream` with Flower's defaults: runtime dependency installation on and
    2 simulated SuperNodes for a 3-site experiment. uv installs nothing, the run uses 2 sites
    and completes."""
    experiment = _experiment(
        tmp_path, "wbc-bare", {"name": "wbc", "options": {"n_samples": 300}}, 3, 1
    )
    home = tmp_path / "flwr-home"
    settings = f'experiment="{experiment}" output-dir="{tmp_path / "out"}" centralised=false'
    out = _bare_flwr_run(ROOT, home, settings)
    assert "No additional application dependencies needed installation." in out, out
    assert "running 2 sites" in out
    (entry,) = json.loads((tmp_path / "out" / "encrypted" / RunStore.HISTORY).read_text())
    assert entry["sites"] == 2
    assert "status: **completed**" in (tmp_path / "out" / "report.md").read_text()
    assert not _pids_wait_gone(str(home))


def test_a_new_study_with_its_own_task_and_model_runs_with_bare_flwr_run(tmp_path: Path) -> None:
    """`more-fl new --task-module`, a model factory beside it, then `cd DIR && flwr run .
    --stream` with Flower's defaults (runtime dependency installation on, 2 SuperNodes): a
    task module and a model outside the package train encrypted through real Flower."""
    study = tmp_path / "study"
    subprocess.run(
        [sys.executable, "-m", "federation.cli", "new", str(study), "--task-module"],
        check=True,
        timeout=120,
    )
    (study / "models.py").write_text(
        "from torch import nn\n\n\n"
        "def build(in_features, num_outputs, hidden=8):\n"
        "    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden),\n"
        "                         nn.ReLU(), nn.Linear(hidden, num_outputs))\n",
        encoding="utf-8",
    )
    data = yaml.safe_load((study / "experiment.yaml").read_text())
    data["model"] = {"factory": "models.py:build", "options": {"hidden": 8}}
    data["training"]["rounds"] = 2
    (study / "experiment.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    home = tmp_path / "flwr-home"
    settings = f'output-dir="{tmp_path / "out"}"'
    out = _bare_flwr_run(study, home, settings)
    assert "No additional application dependencies needed installation." in out, out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "status: **completed**" in report, out
    encrypted = json.loads((tmp_path / "out" / "encrypted" / RunStore.HISTORY).read_text())
    plaintext = json.loads((tmp_path / "out" / "plaintext" / RunStore.HISTORY).read_text())
    assert [h["sites"] for h in encrypted] == [2, 2]
    for e, p in zip(encrypted, plaintext, strict=True):  # decrypt(encrypted) == plaintext
        assert e["evaluate"]["accuracy"] == pytest.approx(p["evaluate"]["accuracy"], abs=1e-12)
    assert not _pids_wait_gone(str(home))
