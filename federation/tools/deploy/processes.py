"""Flower's processes on this machine: their environment, starting each in a process group
of its own, finding their descendants through ``/proc``, stopping them all; and the signal
handling that lets Ctrl-C and SIGTERM stop them too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from federation.tools.deploy import DeployError

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
def sigterm_as_exit() -> Iterator[None]:
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
def uninterrupted() -> Iterator[None]:
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
