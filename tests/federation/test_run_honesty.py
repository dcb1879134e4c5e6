"""Issue 9: a run fails loudly, resumes only itself, owns its directory and uses what was
submitted. The real ClientApp and ServerApp through the in-process Grid (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aggregator.server_app import RunFailed
from federation import protocol
from federation.aggregation import CheckpointError, RunStore
from federation.config import (
    ConfigError,
    experiment_digest,
    experiment_from_dict,
    find_experiment,
    load_experiment,
    with_site_count,
)
from federation.rundir import RunDirError, RunLock, check_resume
from federation.runtime import ForeignEnvironmentError, check_app_environment
from sites import client_app
from tests.flower.flower_grid import SIMULATED, LocalGrid, serve, server_run_config
from tests.paths import ROOT

TINY = {
    "name": "wbc-tiny",
    "task": {"name": "wbc", "options": {"n_samples": 300, "test_fraction": 0.2}},
    "sites": {"count": 3},
    "training": {"rounds": 1, "local_epochs": 1, "batch_size": 32, "dtype": "float64"},
    "federation": {"min_sites": 2},
    "encryption": {"key_seed": 1234},
    "output_dir": "runs/default",
}


def _write(directory: Path, data: dict, name: str = "wbc-tiny.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _serve(config: dict, nodes: list[dict] = SIMULATED) -> None:
    serve(LocalGrid(client_app.app, nodes, config), config)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A completed one-round run: (experiment, output dir)."""
    root = tmp_path_factory.mktemp("finished")
    experiment = _write(root, TINY)
    _serve(server_run_config(experiment, root / "out"))
    return experiment, root / "out"


def test_a_completed_run_reports_completed_with_its_status_file(
    finished: tuple[Path, Path],
) -> None:
    _, out = finished
    assert "status: **completed**" in (out / "report.md").read_text()
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed" and status["cause"] is None
    assert not (out / "run.lock").exists()  # released


def test_resuming_under_a_changed_lr_is_refused_naming_the_key(
    finished: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = finished
    changed = _write(tmp_path, {**TINY, "training": {**TINY["training"], "lr": 0.01}})
    before = (out / "encrypted" / "history.json").read_bytes()
    with pytest.raises(RunFailed, match=r"training\.lr \(0\.05 -> 0\.01\).*resume=false"):
        _serve(server_run_config(changed, out))
    # Nothing of the finished run was touched, and no report claims the new settings.
    assert (out / "encrypted" / "history.json").read_bytes() == before
    assert "lr 0.05" in (out / "report.md").read_text()


def test_resume_false_starts_over_and_the_report_never_mixes_runs(
    finished: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = finished
    fresh = tmp_path / "out"
    subprocess.run(["cp", "-r", str(out), str(fresh)], check=True)
    changed = _write(tmp_path, {**TINY, "training": {**TINY["training"], "lr": 0.01}})
    _serve(server_run_config(changed, fresh, **{protocol.RUN_RESUME: False}))
    record = json.loads((fresh / "experiment.json").read_text())
    assert record["fields"]["training.lr"] == 0.01
    assert "lr 0.01" in (fresh / "report.md").read_text()
    history = json.loads((fresh / "encrypted" / "history.json").read_text())
    assert [h["round"] for h in history] == [1]


def test_a_second_run_on_a_busy_directory_is_refused_naming_the_first(tmp_path: Path) -> None:
    experiment = _write(tmp_path, TINY)
    out = tmp_path / "out"
    # A live process (not this one) holds the directory.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / "run.lock").write_text(
            json.dumps(
                {
                    "host": os.uname().nodename,
                    "pid": holder.pid,
                    "started": "now",
                    "run": "run 42 of x.yaml",
                }
            )
        )
        with pytest.raises(RunFailed, match=rf"in use by run 42 of x.yaml \(process {holder.pid}"):
            _serve(server_run_config(experiment, out))
        assert not (out / "encrypted").exists()  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone its lock is stale and a run takes the directory over.
    _serve(server_run_config(experiment, out))
    assert "status: **completed**" in (out / "report.md").read_text()


def test_two_locks_on_one_directory_cannot_both_be_held(tmp_path: Path) -> None:
    with RunLock(tmp_path, "first"):
        with pytest.raises(RunDirError, match="in use by first"):
            RunLock(tmp_path, "second").acquire()
    with RunLock(tmp_path, "third"):  # released on exit
        pass


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 truncated", None], ids=["empty", "garbage", "truncated"]
)
def test_an_unreadable_checkpoint_stops_the_run_with_its_path(
    finished: tuple[Path, Path], tmp_path: Path, content: bytes | None
) -> None:
    experiment, out = finished
    broken = tmp_path / "out"
    subprocess.run(["cp", "-r", str(out), str(broken)], check=True)
    checkpoint = broken / "encrypted" / RunStore.CHECKPOINT
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: unreadable checkpoint"):
        RunStore(broken / "encrypted").load_latest()
    with pytest.raises(RunFailed, match="unreadable checkpoint.*resume=false"):
        _serve(server_run_config(experiment, broken))
    report = (broken / "report.md").read_text()
    assert "status: **failed: " in report and "completed" not in report.split("\n")[2]
    assert json.loads((broken / "status.json").read_text())["status"] == "failed"


def test_every_refusal_of_a_failed_round_is_in_the_report(tmp_path: Path) -> None:
    """All sites refuse (no data for them): the run fails at round 1 with the cause once,
    the report lists each refusal by site, and there is no empty plot."""
    experiment = _write(tmp_path, TINY)
    nodes = [{"site-id": i, "key-file": str(tmp_path / "missing.key")} for i in range(3)]
    with pytest.raises(RunFailed, match="encrypted round 1: 0 valid updates, 2 needed"):
        _serve(server_run_config(experiment, tmp_path / "out"), nodes)
    report = (tmp_path / "out" / "report.md").read_text()
    refused = report.split("## Refused replies")[1].split("##")[0]
    lines = [line for line in refused.splitlines() if line.startswith("- encrypted round 1")]
    assert len(lines) == 3 and all("missing.key not found" in line for line in lines)
    assert {f"site {i}: key file" in refused for i in range(3)} == {True}
    assert not (tmp_path / "out" / "metrics.png").exists()


def test_a_site_with_another_experiment_refuses_with_one_line(tmp_path: Path) -> None:
    """The aggregator runs B's experiment; a site that loaded other settings (A's file)
    refuses by digest instead of training on them."""
    a = _write(tmp_path / "a", TINY)
    b = _write(tmp_path / "b", {**TINY, "training": {**TINY["training"], "lr": 0.01}})
    assert experiment_digest(load_experiment(a)) != experiment_digest(load_experiment(b))
    grid = LocalGrid(client_app.app, SIMULATED, server_run_config(a, tmp_path / "out"))
    with pytest.raises(RunFailed, match="another copy of the app or experiment"):
        serve(grid, server_run_config(b, tmp_path / "out"))


def test_the_experiment_resolves_from_the_submitted_app_never_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout_a, app_b = tmp_path / "a", tmp_path / "b"
    _write(checkout_a / "configs", TINY, "x.yaml")
    _write(app_b / "configs", {**TINY, "name": "from-b"}, "x.yaml")
    monkeypatch.chdir(checkout_a)  # the long-lived local SuperLink's directory
    found = find_experiment("configs/x.yaml", project_dir="", app_dir=app_b)
    assert found == (app_b / "configs" / "x.yaml").resolve()
    only_in_a = _write(checkout_a / "configs", TINY, "only-a.yaml")
    with pytest.raises(ConfigError, match="not found in the submitted app"):
        find_experiment("configs/only-a.yaml", project_dir="", app_dir=app_b)
    assert find_experiment(str(only_in_a), project_dir="", app_dir=app_b) == only_in_a


def test_the_site_count_follows_the_simulated_nodes_and_refuses_too_few() -> None:
    config = experiment_from_dict(TINY)
    assert with_site_count(config, 2).sites.count == 2
    with pytest.raises(ConfigError, match="needs at least 2"):
        with_site_count(config, 1)


def test_a_run_on_fewer_simulated_nodes_than_sites_still_completes(tmp_path: Path) -> None:
    """Flower's default simulation has 2 SuperNodes; the 3-site experiment runs as 2 sites
    (the Flower simulation Grid is what tells; the in-process Grid stands in by type)."""
    from flwr.superlink.grid import InMemoryGrid

    experiment = _write(tmp_path, TINY)
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]

    class SimulationGrid(LocalGrid, InMemoryGrid):  # the type the ServerApp checks
        pass

    run_config = server_run_config(experiment, tmp_path / "out")
    grid = SimulationGrid(client_app.app, nodes, run_config)
    serve(grid, run_config)
    history = json.loads((tmp_path / "out" / "encrypted" / "history.json").read_text())
    assert history[0]["sites"] == 2
    assert "2 sites" in (tmp_path / "out" / "report.md").read_text()


def test_check_resume_names_every_changed_key(tmp_path: Path) -> None:
    check_resume(tmp_path, {"training.lr": 0.05, "sites.count": 3}, resume=True)
    with pytest.raises(RunDirError, match=r"sites\.count \(3 -> 4\), training\.lr"):
        check_resume(tmp_path, {"training.lr": 0.1, "sites.count": 4}, resume=True)


def test_torch_from_a_flower_runtime_environment_is_refused(tmp_path: Path) -> None:
    import torch

    site_packages = Path(torch.__file__).resolve().parents[1]
    venv = site_packages.parents[2]
    assert check_app_environment({"VIRTUAL_ENV": str(venv)}) is None  # an ordinary venv
    runtime = tmp_path / "runtime-envs" / "123"
    runtime.parent.mkdir()
    runtime.symlink_to(venv)
    with pytest.raises(ForeignEnvironmentError, match="FLWR_DISABLE_RUNTIME_DEPENDENCY"):
        check_app_environment({"VIRTUAL_ENV": str(runtime)})


def test_the_app_excludes_every_dependency_from_flowers_uv_sync() -> None:
    """Flower's per-run `uv sync` installs what pyproject lists minus these: nothing."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [
        dep.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        for dep in project["project"]["dependencies"]
        + [d for extra in project["project"]["optional-dependencies"].values() for d in extra]
    ]
    assert set(names) <= set(project["tool"]["uv"]["exclude-dependencies"])


def test_a_lost_site_is_named_by_site_in_the_log_and_the_report(tmp_path: Path) -> None:
    """Site 2 dies after round 1: round 2 goes on with the others, and the history and the
    report name site 2 (not a node id) as missing."""
    experiment = _write(tmp_path, {**TINY, "training": {**TINY["training"], "rounds": 2}})
    run_config = server_run_config(experiment, tmp_path / "out")
    dead: set[int] = set()
    replies: dict[int, int] = {}

    def die_after_round_one(node: int, reply: object) -> object:
        replies[node] = replies.get(node, 0) + 1
        if node == max(grid.contexts) and replies[node] >= 2:  # its round-1 evaluate
            dead.add(node)
        return reply

    class Grid(LocalGrid):
        def get_node_ids(self) -> list[int]:
            return [n for n in self.contexts if n not in dead]

    grid = Grid(client_app.app, SIMULATED, run_config, tamper=die_after_round_one)
    serve(grid, run_config)
    history = json.loads((tmp_path / "out" / "encrypted" / "history.json").read_text())
    assert [h["missing"] for h in history] == [[], [2]] and history[1]["sites"] == 2
    assert "encrypted round 2: site 2 did not reply" in (tmp_path / "out" / "report.md").read_text()


def test_an_impossible_site_count_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    data = {**TINY, "sites": {"count": 100}}  # 300 patients: 60 test rows
    with pytest.raises(ConfigError, match=r"'sites.count' is 100.*at most 60 sites"):
        load_experiment(_write(tmp_path, data))
