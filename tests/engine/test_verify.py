"""``more-fl verify`` covers every supported operation, and ``more-fl bench`` its new models.

The full run (every case, both dtypes, within the bounds) is ``tests/tools/test_cli.py``'s
``test_verify_passes_and_ends_with_the_float64_deviation``; here: what the cases cover against
the engine's registries, how a run reports, and the bench models' structure and twins.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from federation.nn.check import compare_step
from federation.nn.graph import trace
from federation.nn.layers import TWINS
from federation.nn.losses import LOSSES
from federation.nn.optim import OPTIMIZERS
from federation.tools import verify
from federation.tools.bench import steps


def test_every_layer_with_an_encrypted_twin_has_a_verify_case() -> None:
    missing = verify.uncovered_layers()
    assert missing == [], "add these layers to a case in federation/tools/verify.py"
    assert set(verify.coverage()["layers"]) == {t.__name__ for t in TWINS}


def test_a_newly_supported_layer_without_a_case_is_reported(monkeypatch) -> None:
    monkeypatch.setitem(TWINS, nn.PixelShuffle, TWINS[nn.Identity])
    assert verify.uncovered_layers() == ["PixelShuffle"]


def test_every_loss_optimiser_and_graph_operation_is_covered() -> None:
    covered = verify.coverage()
    assert set(covered["losses"]) == set(LOSSES)
    assert set(covered["optimisers"]) == set(OPTIMIZERS)
    assert set(verify.GRAPH_OPS) <= set(covered["graph ops"])
    for option in ("groups", "dilation", "stride", "padding circular", "padding same"):
        assert option in covered["conv"]


def test_some_case_is_a_traced_module_and_every_case_converts() -> None:
    from federation.nn import validate

    assert any(type(c.build()) is not nn.Sequential for c in verify.CASES)
    for case in verify.CASES:
        assert validate(case.build()) == [], case.name


def test_the_site_path_takes_only_sgd_and_a_loss_name() -> None:
    with pytest.raises(ValueError, match="SGD and a loss by name"):
        verify.Case("x", "mse", nn.Identity, 1, optimizer="adam", site_refresh=True)
    with pytest.raises(ValueError, match="unknown optimiser"):
        verify.Case("x", "mse", nn.Identity, 1, optimizer="lbfgs")


TINY = (
    verify.Case(
        "tiny-site",
        "mse",
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
        3,
        samples=16,
        batch_size=8,
        site_refresh=True,
    ),
    verify.Case(
        "tiny-adam",
        "cross_entropy",
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Tanh()),
        4,
        optimizer="adam",
        hyper=verify.ADAM,
        samples=16,
        batch_size=8,
    ),
)


def test_a_run_prints_rows_coverage_and_ends_with_the_float64_deviation() -> None:
    lines: list[str] = []
    assert verify.run(print_fn=lines.append, cases=TINY)
    rows = [line for line in lines if line.startswith("tiny-")]
    assert len(rows) == 4 and all(r.endswith("  ok") for r in rows)
    assert [r.split()[2:4] for r in rows] == [
        ["sgd", "float64"],
        ["sgd", "float32"],
        ["adam", "float64"],
        ["adam", "float32"],
    ]
    layers = f"covered layers (3 of {len(TWINS)} with a twin): Linear, Flatten, Tanh"
    assert layers in lines
    assert any(line.startswith("not covered: ") and "BatchNorm2d" in line for line in lines)
    assert "covered losses: mse, cross_entropy" in lines
    assert "covered optimisers: sgd, adam" in lines
    assert lines[-1].startswith("max deviation float64: ")
    assert float(lines[-1].split(": ")[1]) <= verify.FLOAT64_ABS_TOL


def test_a_deviation_beyond_the_bound_fails_the_run(monkeypatch) -> None:
    monkeypatch.setattr(verify, "_compare", lambda *a: verify.Row(1.0, 1.0, 1.0, False))
    lines: list[str] = []
    assert not verify.run(print_fn=lines.append, cases=TINY)
    assert sum(line.endswith("  FAIL") for line in lines) == 4


NEW_BENCH_MODELS = ("cnn-bn-maxpool 1x28x28", "resnet 1x28x28")


def test_bench_has_a_bn_maxpool_cnn_and_a_residual_network_beside_mlp_and_cnn() -> None:
    models = steps.bench_models()
    assert list(models)[:2] == ["mlp 784-128-10", "cnn 1x28x28"]
    assert set(NEW_BENCH_MODELS) <= set(models)
    assert all(shape == (1, 28, 28) for _, shape in models.values())
    cnn = models["cnn-bn-maxpool 1x28x28"][0]()
    kinds = {type(m) for m in cnn.modules()}
    assert {nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d} <= kinds
    resnet = models["resnet 1x28x28"][0]()
    assert isinstance(resnet, nn.Module) and type(resnet) is not nn.Sequential
    graph = trace(resnet)
    (add,) = [n for n in graph.nodes if verify._op_name(n) == "add"]
    assert any(a.op == "call_function" and verify._op_name(a) == "relu" for a in add.args)


@pytest.mark.parametrize("name", NEW_BENCH_MODELS)
def test_new_bench_models_twins_match_torch(name: str, key) -> None:
    build, shape = steps.bench_models()[name]
    torch.manual_seed(0)
    got = compare_step(build(), torch.rand(4, *shape), key)
    assert got.within(torch.float64), got
