"""The more-fl command: keygen, verify and bench --quick as a user runs them."""

from __future__ import annotations

import stat
import subprocess
import sys

from federation.cli import main
from federation.more.keys import load_key


def test_keygen_writes_a_private_key_and_prints_its_fingerprint(tmp_path, capsys) -> None:
    out = tmp_path / "keys" / "federation.key"
    assert main(["keygen", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"fingerprint: {load_key(out).fingerprint}" in printed
    assert main(["keygen", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


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
    from federation import bench

    rows = bench.run(quick=True, steps=3)
    printed = capsys.readouterr().out
    assert len(rows) == 2 and all(r.plain_ms > 0 and r.encrypted_ms > 0 for r in rows)
    assert all(r.encrypted_mib > r.plain_mib for r in rows)
    assert printed.strip().splitlines()[-1].startswith("worst encrypted/plaintext step ratio: ")
