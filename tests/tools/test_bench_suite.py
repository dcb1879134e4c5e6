"""``more-fl bench --suite full`` in its quick mode: every section runs, writes its table and
plot atomically, and measures positive numbers; CKKS rows need TenSEAL."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from federation.tools.bench import markdown
from federation.tools.bench.aggregation import bench_aggregation
from federation.tools.bench.logreg import bench_logreg
from federation.tools.bench.sizes import QUICK, TENSEAL_PIP
from federation.tools.bench.suite import REPORT, run_suite

HAS_TENSEAL = importlib.util.find_spec("tenseal") is not None
PLOTS = ("training.png", "aggregation.png", "logreg.png", "scaling.png")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, str, list[str]]:
    """One quick run for the whole module (it is the slow part): folder, markdown, printout."""
    out = tmp_path_factory.mktemp("suite") / "bench"
    printed: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MORE_FL_MNIST_DIR", str(mnist_dir))
        threads = torch.get_num_threads()
        report = run_suite(out, quick=True, print_fn=printed.append, threads=1)
        assert torch.get_num_threads() == threads  # restored
    return out, report.read_text(), printed


def _rows(markdown: str, title: str) -> list[list[str]]:
    """The body cells of the first table after the heading that starts with ``title``."""
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_report_and_plots_are_written_atomically(suite: tuple[Path, str, list[str]]) -> None:
    out, markdown, printed = suite
    assert sorted(p.name for p in out.iterdir()) == sorted([REPORT, *PLOTS])  # no temporaries
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown
    assert markdown.startswith("# more-fl benchmark suite (quick)")
    assert ", 1 thread(s)," in markdown
    assert "## 5. Training epoch per task model on GPU" in markdown
    assert printed[-1] == f"\nwrote {out / REPORT}"


def test_training_rows_are_positive_and_encryption_costs_memory(
    suite: tuple[Path, str, list[str]],
) -> None:
    rows = _rows(suite[1], "1. Training epoch")
    models = [r[0] for r in rows]
    assert models == [
        "mnist mlp", "mnist cnn", "mnist relu-cnn", "wbc mlp", "wbc bn-mlp", "angio cnn",
        "angio resnet",
    ]  # fmt: skip
    for row in rows:
        plain_s, enc_s, ratio, plain_mib, enc_mib, memory = map(_number, row[3:9])
        assert min(plain_s, enc_s, ratio, plain_mib, enc_mib) > 0
        assert memory > 3.0  # 4 floats per value, plus the 2x2 activations autograd saves
    headline = {r[0].split(":")[0]: r for r in _rows(suite[1], "Headline")}
    ratios = headline[f"training epoch ({QUICK.batches} x {QUICK.batch}), {' / '.join(models)}"]
    assert [float(v) for v in ratios[2].split(" / ")] == [
        pytest.approx(_number(r[5]), abs=0.06) for r in rows
    ]  # the headline repeats section 1's ratios, one decimal


def test_headline_sums_up_the_sections(suite: tuple[Path, str, list[str]]) -> None:
    markdown = suite[1]
    assert markdown.index("## Headline") < markdown.index("## 1. Training epoch")
    rows = {r[0]: r[1:] for r in _rows(markdown, "Headline")}
    wire = rows[f"one FedAvg round, {QUICK.sites} sites, MNIST MLP update: bytes on the wire"]
    plain, more = (float(c.removesuffix(" MiB")) for c in wire[:2])
    assert more == pytest.approx(4 * plain, rel=0.02)  # 4 floats per value
    logreg = rows["same: max weight difference vs plaintext"]
    assert float(logreg[1]) < 1e-9  # the decrypted MORE model is the plaintext one
    if HAS_TENSEAL:
        assert float(logreg[2]) > 1e-3  # CKKS is approximate


def test_aggregation_rows(suite: tuple[Path, str, list[str]]) -> None:
    rows = {r[0].split(" (")[0]: r for r in _rows(suite[1], "2. One FedAvg round")}
    plain, more = rows["plaintext FedAvg"], rows["MORE FedAvg"]
    assert _number(more[1]) == pytest.approx(4 * _number(plain[1]), rel=0.01)  # 4x bytes
    assert min(_number(c) for c in more[1:7]) > 0
    assert _number(more[7]) < 1e-5  # the decrypted MORE average is the plaintext average
    values = int(re.search(r"update \(([\d,]+) values\)", suite[1])[1].replace(",", ""))
    assert values == 784 * QUICK.mlp_hidden + QUICK.mlp_hidden + QUICK.mlp_hidden * 10 + 10


def test_logistic_regression_rows(suite: tuple[Path, str, list[str]]) -> None:
    rows = {r[0].split(" (")[0]: r for r in _rows(suite[1], "3. Logistic regression")}
    assert "MNIST 3 vs 8" in suite[1]
    for scheme in ("plaintext", "MORE"):
        assert _number(rows[scheme][2]) > 0 and 0 < _number(rows[scheme][3]) <= 1
    assert rows["MORE"][3] == rows["plaintext"][3]  # MORE trains exactly the plaintext model
    assert _number(rows["MORE"][4]) < 1e-9


def test_scaling_grid_covers_every_width_and_batch(suite: tuple[Path, str, list[str]]) -> None:
    rows = _rows(suite[1], "4. Encrypted / plaintext")
    assert [r[0] for r in rows] == [f"mlp {w}-{w}-10" for w in QUICK.widths]
    assert all(len(r) == 1 + len(QUICK.scale_batches) for r in rows)
    ratios = [_number(part) for r in rows for cell in r[1:] for part in cell.split(" / ")]
    assert len(ratios) == 2 * len(QUICK.widths) * len(QUICK.scale_batches)
    assert all(ratio > 0 for ratio in ratios)


@pytest.mark.skipif(not HAS_TENSEAL, reason=f"TenSEAL not installed ({TENSEAL_PIP})")
def test_ckks_rows_are_measured(suite: tuple[Path, str, list[str]]) -> None:
    aggregation = {r[0].split(" (")[0]: r for r in _rows(suite[1], "2. One FedAvg round")}
    ckks = aggregation["CKKS FedAvg"]
    assert min(_number(c) for c in ckks[1:7]) > 0
    assert _number(ckks[1]) > _number(aggregation["MORE FedAvg"][1])  # ciphertext expansion
    assert _number(ckks[7]) < 1e-3  # CKKS is approximate, but close at scale 2^40
    logreg = {r[0].split(" (")[0]: r for r in _rows(suite[1], "3. Logistic regression")}
    assert min(_number(c) for c in logreg["CKKS"][1:4]) > 0


def test_ckks_rows_say_when_tenseal_is_missing_and_digits_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TenSEAL the CKKS rows carry the install hint; without MNIST files the
    logistic regression runs on synthetic classes and says so."""
    hint = f"TenSEAL not installed ({TENSEAL_PIP})"
    rows, _ = bench_aggregation(QUICK, None)
    assert rows[-1].note == hint
    assert hint in "\n".join(markdown.aggregation_table(rows, QUICK.sites))
    monkeypatch.setenv("MORE_FL_MNIST_DIR", str(tmp_path))
    logreg, source = bench_logreg(QUICK, None)
    assert source.startswith("synthetic Gaussian classes") and logreg[-1].note == hint
    assert logreg[1].accuracy == logreg[0].accuracy
    assert hint in "\n".join(markdown.logreg_table(logreg))
