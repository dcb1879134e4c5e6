"""The tasks' modern models (MNIST relu-cnn, WBC bn-mlp, angio resnet) run on ciphertexts.

Each converts (the ResNet by torch.fx tracing), decrypts back to the user's own class with the
same state_dict keys, and a few SGD steps in train mode on a small slice of its task's data
give, decrypted, torch's parameters, batch-norm running statistics and eval-mode outputs:
to 1e-9 in float64 and 1e-4 relative in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from federation.config import load_experiment
from federation.experiment import initial_model
from federation.nn import EncryptedGraphModule, to_encrypted, to_plain
from federation.nn.check import compare_step, compare_training
from federation.nn.session import SessionConfig
from federation.tasks import angio, mnist, wbc
from federation.tasks.angio.model import AngioResNet
from federation.tasks.angio.render import generate
from tests.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only contend


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    loss: str
    outputs: int  # classes, or regression outputs
    feature_range: tuple[float, float]


CASES = {
    "mnist-relu-cnn": Case(lambda: mnist.build_model("relu-cnn"), "cross_entropy", 10, (0.0, 1.0)),
    "wbc-bn-mlp": Case(lambda: wbc.build_model("bn-mlp"), "mse", 8, (-1.0, 1.0)),
    "angio-resnet": Case(lambda: angio.build_model("resnet"), "cross_entropy", 8, (0.0, 1.0)),
}


def _load(name: str, request: pytest.FixtureRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """24 training examples of the task (float64 features)."""
    if name == "mnist-relu-cnn":
        digits = mnist.load_task_data(
            data_dir=request.getfixturevalue("mnist_dir"), split="carve", n_train=24, n_test=1
        )
        return digits.x_train.double(), digits.y_train
    if name == "angio-resnet":
        images = generate(24, seed=3, image_size=64)
        return torch.from_numpy(images.images).unsqueeze(1).double(), torch.from_numpy(images.view)
    sim = wbc.generate_dataset(24, seed=3, n_beats=30, steps_per_beat=200)
    outputs = (sim.outputs - sim.outputs.mean(axis=0)) / sim.outputs.std(axis=0)
    x = wbc.normalise_inputs(sim.inputs, sim.input_names)
    return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(outputs))


_LOADED: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


@pytest.fixture
def data(name: str, request: pytest.FixtureRequest) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in _LOADED:
        _LOADED[name] = _load(name, request)
    return _LOADED[name]


def _train(case: Case, x: torch.Tensor, y: torch.Tensor, key, dtype: torch.dtype):
    torch.manual_seed(0)
    model = case.build()
    targets = (y.min().item(), y.max().item()) if case.loss == "mse" else None
    return compare_training(
        model,
        x[:16],
        y[:16],
        key=key,
        loss=case.loss,
        config=SessionConfig(
            "sgd",
            {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
            batch_size=8,
            epochs=2,
            dtype=dtype,
            seed=5,
        ),
        num_classes=case.outputs if case.loss != "mse" else None,
        feature_range=case.feature_range,
        target_range=targets,
        x_eval=x[16:],
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_converts_and_decrypts_to_the_users_class(name: str, key) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().double()
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():  # running statistics other than the initial ones
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    twin = to_encrypted(model, key, dtype=torch.float64, seed=1)
    assert isinstance(twin, EncryptedGraphModule) == (name == "angio-resnet")
    plain = to_plain(twin, key)
    assert type(plain) is type(model)
    assert list(plain.state_dict()) == list(model.state_dict())
    fresh = case.build().double()
    fresh.load_state_dict(plain.state_dict())  # strict: same keys and shapes
    for k, v in model.state_dict().items():
        assert torch.allclose(fresh.state_dict()[k], v, rtol=0, atol=1e-12), k


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_mode_step_matches_torch(name: str, key, data) -> None:
    """One forward/backward in train mode: outputs, gradients and updated running stats.

    MNIST's blank background gives max-pooling windows of exactly equal values; torch sends
    such a tie's gradient to the first cell, the encrypted max to whichever cell round-off in
    the data channel favours. Parameter gradients agree either way (the tied cells come from
    identical input patches), the gradient with respect to the input does not: it is checked
    on noise instead.
    """
    x = data[0][:8]
    torch.manual_seed(0)
    cmp = compare_step(CASES[name].build(), x, key, dtype=torch.float64)
    assert max(cmp.outputs.abs, cmp.param_grads.abs, cmp.buffers.abs) <= 1e-9, cmp
    if name == "mnist-relu-cnn":
        torch.manual_seed(0)
        cmp = compare_step(CASES[name].build(), torch.rand_like(x), key, dtype=torch.float64)
    assert cmp.within(torch.float64), cmp


@pytest.mark.parametrize("name", sorted(CASES))
def test_encrypted_training_equals_plaintext_float64(name: str, key, data) -> None:
    x, y = data
    cmp = _train(CASES[name], x, y, key, torch.float64)
    assert cmp.state.abs <= 1e-9 and cmp.outputs.abs <= 1e-9, cmp


@pytest.mark.parametrize("name", sorted(CASES))
def test_encrypted_training_equals_plaintext_float32(name: str, key, data) -> None:
    x, y = data
    cmp = _train(CASES[name], x, y, key, torch.float32)
    assert cmp.state.rel <= 1e-4 and cmp.outputs.rel <= 1e-4, cmp


@pytest.mark.parametrize(
    ("config", "arch", "kind"),
    [
        ("mnist-relu.yaml", "relu-cnn", nn.Sequential),
        ("wbc-bn.yaml", "bn-mlp", nn.Sequential),
        ("angio-resnet.yaml", "resnet", AngioResNet),
    ],
)
def test_configs_select_the_modern_models(config: str, arch: str, kind: type) -> None:
    cfg = load_experiment(ROOT / "configs" / config)
    assert cfg.model.arch == arch
    model = initial_model(cfg)
    assert type(model) is kind
    again = initial_model(cfg)  # seeded: every process builds the same initial model
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_model_options_are_checked() -> None:
    assert mnist.build_model("relu-cnn", channels=4)[0].out_channels == 4
    no_bn = mnist.build_model("relu-cnn", batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn)
    assert no_bn(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(TypeError, match="activation"):
        mnist.build_model("relu-cnn", activation="tanh")
    with pytest.raises(ValueError, match="batch_norm"):
        mnist.build_model("relu-cnn", batch_norm="yes")
    deep = wbc.build_model("bn-mlp", hidden=16, depth=3)
    assert [type(m) for m in deep].count(nn.BatchNorm1d) == 3
    assert deep(torch.rand(4, len(wbc.INPUT_RANGES))).shape == (4, len(wbc.OUTPUT_NAMES))
    with pytest.raises(TypeError, match="activation"):
        wbc.build_model("bn-mlp", activation="tanh")
    net = angio.build_model("resnet", image_size=32, num_classes=2, channels=4, blocks=2)
    assert len(net.layer1) == 2 and net(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    for size in (64, 128):
        assert angio.build_model("resnet", image_size=size)(torch.rand(2, 1, size, size)).shape == (
            2,
            8,
        )
    with pytest.raises(TypeError, match="depth"):
        angio.build_model("resnet", depth=3)
    with pytest.raises(TypeError, match="channels"):
        angio.build_model("cnn", channels=4)
    with pytest.raises(ValueError, match="unknown angio arch"):
        angio.build_model("vit")
