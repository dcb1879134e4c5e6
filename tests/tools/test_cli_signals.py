"""Ctrl-C in more-fl: one line on stderr, exit code 130, no traceback, nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from federation.tools.deploy import processes
from tests.paths import ROOT

INTERRUPTED = 128 + signal.SIGINT


def _start(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": str(ROOT)},
    )


def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = 120.0) -> str:
    """The first stdout line starting with ``prefix`` (the process is killed on timeout)."""
    assert proc.stdout is not None
    timer = subprocess.Popen(  # readline blocks: bound it from outside
        [sys.executable, "-c", f"import os, time; time.sleep({timeout}); os.kill({proc.pid}, 9)"]
    )
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                return line
    finally:
        timer.kill()
        timer.wait()
    pytest.fail(
        f"no line starting with {prefix!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


@pytest.mark.parametrize("command", ["keygen", "verify", "train", "data", "attack", "bench"])
def test_ctrl_c_in_any_subcommand_is_one_line_and_exit_130(tmp_path: Path, command: str) -> None:
    """The subcommand's work is replaced by a wait, so Ctrl-C lands inside it."""
    argv = {
        "keygen": ["keygen", "--out", "k.key"],
        "verify": ["verify"],
        "train": ["train", "--config", "x.yaml"],
        "data": ["data", "mnist"],
        "attack": ["attack", "--config", "x.yaml"],
        "bench": ["bench"],
    }[command]
    body = (
        "import sys, time\nfrom federation import cli\n"
        f"def wait(args):\n    print('ready', flush=True)\n    time.sleep(60)\n"
        f"cli._{command} = wait\nsys.exit(cli.main({argv!r}))\n"
    )
    proc = _start(_script(body), tmp_path)
    _read_until(proc, "ready", timeout=60)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == INTERRUPTED
    assert err == f"more-fl {command}: interrupted\n"


def test_ctrl_c_during_real_training_is_one_line_and_exit_130(tmp_path: Path) -> None:
    proc = _start([sys.executable, "-m", "federation.cli", "train", "--config",
                   str(ROOT / "configs" / "wbc.yaml")], tmp_path)  # fmt: skip
    # Wait for encrypted training itself: an interrupt during a lazy import (torch.fx pulls in
    # sympy) leaves CPython's own ResourceWarning for the half-read .pyc, which is not ours.
    _read_until(proc, "  encrypted epoch   1:")
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == INTERRUPTED, err
    assert err.splitlines()[-1] == "more-fl train: interrupted"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def _insecure_deployment(tmp_path: Path) -> Path:
    def free_port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    data = {
        "experiment": str(ROOT / "configs" / "wbc.yaml"),
        "work_dir": str(tmp_path / "work"),
        "superlink": {"host": "127.0.0.1", "port": free_port()},
        "tls": {"enabled": False},
        "node_auth": {"enabled": False},
        "sites": [{"name": "a", "id": 0, "port": free_port()}],
        "key": {"file": str(tmp_path / "federation.key"), "generate": True},
    }
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_ctrl_c_in_deploy_stops_the_federation_then_one_line_and_130(tmp_path: Path) -> None:
    path = _insecure_deployment(tmp_path)
    proc = _start(
        [sys.executable, "-m", "federation.cli", "deploy", "--config", str(path)], tmp_path
    )
    _read_until(proc, "started SuperNode a")
    started = [p for p in processes.descendants(proc.pid) if processes.alive(p)]
    assert len(started) >= 2  # the SuperLink and the SuperNode (and their helpers)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc, timeout=90)
    assert code == INTERRUPTED
    assert err == "more-fl deploy: interrupted; every process it started was stopped\n"
    assert not [p for p in started if processes.alive(p)]


STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_second_ctrl_c_while_stopping_does_not_abandon_the_processes(tmp_path: Path) -> None:
    """A child that ignores SIGTERM holds the stop in its grace period when Ctrl-C comes again:
    the stop still ends it (SIGKILL after the grace), and the exit is one line and 130."""
    path = _insecure_deployment(tmp_path)
    body = f"""
import sys, time
from pathlib import Path
from federation.tools.deploy import processes, run

processes.Processes.stop.__defaults__ = (2.0,)  # grace: keep the test short

def start(fed, tls, echo):
    proc = fed.processes.start(
        "stubborn", [sys.executable, "-c", {STUBBORN!r}], home=fed.config.work_dir / "home"
    )
    log = fed.processes.log_dir / "stubborn.log"
    while "ready" not in log.read_text():
        time.sleep(0.05)
    echo(f"started {{proc.pid}}")
    time.sleep(60)

run._start_federation = start
sys.exit(run.cli_deploy(Path({str(path)!r})))
"""
    proc = _start(_script(body), tmp_path)
    child = int(_read_until(proc, "started ").split()[1])
    try:
        proc.send_signal(signal.SIGINT)
        _read_until(proc, "stopping the SuperLink and SuperNodes", timeout=30)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        code, err = _finish(proc, timeout=30)
        assert code == INTERRUPTED
        assert err == "more-fl deploy: interrupted; every process it started was stopped\n"
        deadline = time.monotonic() + 5
        while processes.alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not processes.alive(child)
    finally:
        if processes.alive(child):
            os.kill(child, signal.SIGKILL)
