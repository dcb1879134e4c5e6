"""The more-fl command: keygen, verify and bench --quick as a user runs them, its arguments,
its help and its one-line errors."""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from federation import cli
from federation.cli import main
from federation.more.keys import generate_key, load_key
from tests.paths import ROOT


def _one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err
    return lines[0]


def test_keygen_writes_a_private_key_and_prints_its_fingerprint(tmp_path, capsys) -> None:
    out = tmp_path / "federation.key"
    assert main(["keygen", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"fingerprint: {load_key(out).fingerprint}" in printed


def test_keygen_refuses_to_overwrite_naming_the_file_and_the_flag(tmp_path, capsys) -> None:
    out = tmp_path / "federation.key"
    assert main(["keygen", "--out", str(out), "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["keygen", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "more-fl keygen")
    assert str(out) in line and "refusing to overwrite" in line and "--force" in line
    assert "overwrite=True" not in line
    assert main(["keygen", "--out", str(out), "--force", "--seed", "2"]) == 0
    assert load_key(out).fingerprint == generate_key(2).fingerprint


def test_keygen_creates_a_missing_directory_only_when_asked(tmp_path, capsys) -> None:
    out = tmp_path / "keys" / "federation.key"
    assert main(["keygen", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "more-fl keygen")
    assert str(out.parent) in line and "--parents" in line
    assert not out.parent.exists()
    assert main(["keygen", "--out", str(out), "--parents"]) == 0
    assert load_key(out)


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes: use /proc)."""
    if os.geteuid() == 0:
        if not Path("/proc/self").is_dir():
            pytest.skip("needs /proc to find a directory root cannot write")
        return Path("/proc")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


def test_keygen_into_an_unwritable_directory_names_the_key_file(tmp_path, capsys) -> None:
    out = _unwritable_dir(tmp_path) / "federation.key"
    assert main(["keygen", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "more-fl keygen")
    assert f"{out}: " in line and ".tmp" not in line


def test_a_corrupt_world_readable_key_file_gives_one_line_and_no_warning(tmp_path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("garbage\n")
    bad.chmod(0o644)
    config = yaml.safe_load((ROOT / "configs" / "wbc.yaml").read_text())
    config["encryption"]["key_file"] = str(bad)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _more_fl("train", "--config", str(path))
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr, "more-fl train")
    assert str(bad) in line and "not valid JSON" in line


def _more_fl(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("epochs", ["-1", "0", "two"])
def test_train_epochs_must_be_a_positive_integer(epochs: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(ROOT / "configs" / "wbc.yaml"), "--epochs", epochs])
    assert info.value.code == 2
    line = _one_error_line(capsys.readouterr().err, "more-fl train")
    assert "argument --epochs" in line and repr(epochs) in line


def test_usage_errors_are_one_line(capsys) -> None:
    cases = [
        ([], "more-fl"),
        (["keygen"], "more-fl keygen"),
        (["bench", "--threads", "0"], "more-fl bench"),
        (["keygen", "--out", "k", "-x"], "more-fl"),  # argparse reports leftovers at the top
    ]
    for argv, prog in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert _one_error_line(capsys.readouterr().err, prog).endswith(f"(see `{prog} --help`)")


def test_version_comes_from_the_package_metadata(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"more-fl {version('more-fl')}\n"


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return dict(_subcommands(parser).choices)


def test_every_subcommand_and_option_is_described() -> None:
    parser = cli.build_parser()
    commands = _subparsers(parser)
    listed = {a.dest: a.help for a in _subcommands(parser)._choices_actions}
    assert set(listed) == set(commands) and all(listed.values())
    for name, sub in commands.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"


def test_every_config_argument_is_the_config_option() -> None:
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            if "config" in action.dest and action.help != argparse.SUPPRESS:
                assert action.option_strings == ["--config"], name
                assert action.metavar == "FILE", name


def test_deploy_takes_config_and_notes_the_deprecated_positional(monkeypatch, capsys) -> None:
    import federation.tools.deploy.run

    seen: list[Path] = []
    monkeypatch.setattr(
        federation.tools.deploy.run, "cli_deploy", lambda path: seen.append(path) or 0
    )
    assert main(["deploy", "--config", "d.yaml"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["deploy", "old.yaml"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0] and "--config" in err[0]
    assert seen == [Path("d.yaml"), Path("old.yaml")]
    for argv in (["deploy"], ["deploy", "a.yaml", "--config", "b.yaml"]):
        with pytest.raises(SystemExit):
            main(argv)
        _one_error_line(capsys.readouterr().err, "more-fl deploy")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--config", "absent.yaml"], "absent.yaml: config file not found"),
        (["attack", "--config", "absent.yaml"], "absent.yaml: config file not found"),
        (["deploy", "--config", "absent.yaml"], "absent.yaml: config file not found"),
        (["site", "--config", "absent.yaml", "--site", "a"], "absent.yaml: config file not found"),
        (["data", "mnist", "--data-dir", "{tmp}"], "task.options.download"),
        (["data", "mnist", "--preview"], "--preview is only for angio"),
        (["data", "angio", "--data-dir", "x"], "--data-dir is only for mnist and wbc"),
    ],
)
def test_bad_input_ends_in_one_line(tmp_path, capsys, argv: list[str], message: str) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, f"more-fl {argv[0]}")
    assert message in line


def test_site_with_missing_certificates_is_one_line(tmp_path, capsys) -> None:
    deployment = {
        "experiment": str(ROOT / "configs" / "wbc.yaml"),
        "work_dir": str(tmp_path / "work"),
        "tls": {"enabled": True, "generate": False},
        "sites": [{"name": "a", "id": 0}],
    }
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(deployment))
    assert main(["site", "--config", str(path), "--site", "a", "--print"]) == 2
    assert "needs ca.crt" in _one_error_line(capsys.readouterr().err, "more-fl site")


def test_the_angio_preview_goes_under_runs_by_default(tmp_path, monkeypatch, capsys) -> None:
    from federation.tasks.angio import preview

    written: list[Path] = []
    monkeypatch.setattr(preview, "save_preview", lambda path, **_: written.append(path) or path)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "angio"]) == 0
    assert main(["data", "angio", "--preview"]) == 0
    assert main(["data", "angio", "--preview", "elsewhere.png"]) == 0
    assert written == [Path("runs/angio-preview.png")] * 2 + [Path("elsewhere.png")]
    assert capsys.readouterr().out.splitlines()[0] == "wrote runs/angio-preview.png"


def test_generated_files_are_ignored_by_git() -> None:
    paths = ["keys/federation.key", "runs/angio-preview.png", "angio.png"]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 128:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    assert proc.stdout.split() == paths
    assert (
        subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", "docs/angio_preview.png"], cwd=ROOT
        ).returncode
        == 1
    )


def test_data_wbc_prints_aligned_lines_with_units(tmp_path, monkeypatch, capsys) -> None:
    from federation.tasks import wbc

    real = wbc.load_task_data
    small = {"n_samples": 48, "cache_dir": tmp_path}
    monkeypatch.setattr(wbc, "load_task_data", lambda **kw: real(**{**kw, **small}))
    assert main(["data", "wbc"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line]  # rich's bar
    assert lines[0].startswith("wbc: regression task, ")
    body = lines[1:]
    assert "{" not in "\n".join(body)
    assert len({re.match(r"\s*[^:]+:\s+", line).end() for line in body}) == 1  # one column
    assert any(line.split(":")[0].strip() == "input hr" and "1/min" in line for line in body)
    assert any("output MAP" in line and "mmHg" in line for line in body)


def test_verify_passes_and_ends_with_the_float64_deviation() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "federation.cli", "verify"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max deviation float64: ")
    assert float(last.split(": ")[1]) <= 1e-9
    assert "FAIL" not in proc.stdout


def test_bench_quick_prints_the_table_and_the_worst_ratio(capsys) -> None:
    from federation.tools.bench import steps

    rows = steps.run(quick=True, steps=3)
    printed = capsys.readouterr().out
    assert len(rows) == len(steps.bench_models())
    assert all(r.plain_ms > 0 and r.encrypted_ms > 0 for r in rows)
    assert all(r.encrypted_mib > r.plain_mib for r in rows)
    assert printed.strip().splitlines()[-1].startswith("worst encrypted/plaintext step ratio: ")
