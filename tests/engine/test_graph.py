"""Any nn.Module, not only nn.Sequential: torch.fx conversion, keys, validation.

A traced twin must keep the user's ``state_dict`` keys (so decrypted weights load into the
user's own class), run residual additions, concatenations, reshapes and functional
activations exactly as torch does, and refuse everything else with every problem listed.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from federation.nn import (
    EncryptedGraphModule,
    Square,
    UnsupportedLayerError,
    to_encrypted,
    to_plain,
    validate,
)
from federation.nn.check import compare_step, compare_training
from federation.nn.session import SessionConfig


class Residual(nn.Module):
    """Residual branch, ``+=``, concatenation, view by size, means, scaling, F.* and methods."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1))
        self.side = nn.Conv2d(2, 2, 1)
        self.head = nn.ModuleDict({"fc": nn.Linear(36, 5), "out": nn.Linear(5 + 6, 3)})
        self.square = Square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        out = self.branch(h)
        out += h
        out = torch.add(out, h, alpha=0.5)
        z = torch.cat([out, F.sigmoid(self.side(x))], dim=1)
        z = F.avg_pool2d(z, 2) * 0.5
        pooled = z.mean((2, 3))
        flat = z.view(z.size(0), -1)
        flat = torch.flatten(flat.reshape(flat.shape[0], 6, 6).permute(0, 2, 1), 1)
        hidden = self.square(self.head["fc"](flat)).tanh()
        return self.head["out"](torch.cat((hidden, pooled - 1.0), -1))


def test_traced_twin_keeps_the_users_keys_and_class(key) -> None:
    torch.manual_seed(0)
    user = Residual().double()
    twin = to_encrypted(user, key, seed=0)
    assert isinstance(twin, EncryptedGraphModule)
    assert list(twin.state_dict()) == list(user.state_dict())
    back = to_plain(twin, key)
    assert type(back) is Residual
    fresh = Residual().double()
    fresh.load_state_dict(back.state_dict())
    for name, t in user.state_dict().items():
        assert torch.allclose(fresh.state_dict()[name], t, atol=1e-14, rtol=0), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_traced_twin_forward_and_backward_equal_torch(key, dtype) -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 2, 4, 6, dtype=torch.float64)
    cmp = compare_step(Residual(), x, key, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for part in (cmp.outputs, cmp.input_grad, cmp.param_grads):
        assert (part.abs if dtype == torch.float64 else part.rel) <= tol, cmp


class Functional(nn.Module):
    """Every functional activation and pooling form the graph supports, in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 9 + 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        acts = [
            F.relu(h),
            torch.relu(h),
            h.relu(),
            F.leaky_relu(h, 0.2),
            F.elu(h, alpha=0.7),
            F.gelu(h),
            F.gelu(h, approximate="tanh"),
            F.silu(h),
            F.hardtanh(h, -0.5, 0.5),
            F.relu6(h * 4.0),
            F.softplus(h, beta=2.0, threshold=1.0),
            F.mish(h),
            F.hardswish(h),
            F.hardsigmoid(h),
            F.selu(h),
            F.celu(h, 0.5),
            F.logsigmoid(h),
            F.softsign(h),
            torch.clamp(h, min=-0.2, max=0.3),
        ]
        h = sum(acts[1:], acts[0]) / len(acts)
        m = F.max_pool2d(h, 2, stride=1)
        a = F.adaptive_avg_pool2d(h, (3, 3)) + F.adaptive_max_pool2d(h, 3)
        b = F.pad(m, (0, 1, 1, 0), mode="replicate")
        z = torch.cat([a.flatten(1), b.mean(dim=(2, 3))], 1)
        return self.fc(z)


def test_functional_forms_equal_torch(key) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    cmp = compare_step(Functional(), x, key)
    assert cmp.within(torch.float64), cmp
    assert cmp.outputs.abs <= 1e-12 and cmp.param_grads.abs <= 1e-12, cmp


def test_traced_module_trains_like_torch(key) -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 2, 4, 6, dtype=torch.float64)
    y = torch.randint(3, (16,))
    cmp = compare_training(
        Residual(),
        x,
        y,
        key=key,
        loss="cross_entropy",
        config=SessionConfig("adam", {"lr": 0.01}, batch_size=8, epochs=2),
        num_classes=3,
        feature_range=(0.0, 1.0),
    )
    assert cmp.state.abs <= 1e-9 and cmp.outputs.abs <= 1e-9, cmp


def test_sequential_stays_sequential_and_custom_blocks_are_traced() -> None:
    seq = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Tanh(), nn.Linear(3, 1)))
    assert type(to_encrypted(seq)) is nn.Sequential

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.tanh(self.fc(x))

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    twin = to_encrypted(model)
    assert isinstance(twin, EncryptedGraphModule)
    assert list(twin.state_dict()) == ["0.fc.weight", "0.fc.bias", "1.weight", "1.bias"]


class TwoProblems(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rnn = nn.GRU(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc(x) + self.rnn(x)[0], dim=-1)


def test_two_problems_are_listed_in_one_error(key) -> None:
    problems = validate(TwoProblems())
    assert len(problems) == 2, problems
    assert problems[0].startswith("GRU at 'rnn' has no encrypted twin; supported layers: Linear")
    assert "torch.nn.functional.softmax at node 'softmax'" in problems[1]
    assert "the cross-entropy loss applies it" in problems[1]
    with pytest.raises(UnsupportedLayerError) as info:
        to_encrypted(TwoProblems(), key)
    assert info.value.problems == problems
    assert str(info.value).startswith("2 problems prevent encrypting this model:")
    assert all(p in str(info.value) for p in problems)
    assert validate(Residual()) == []


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -x


def test_untraceable_module_is_refused_clearly() -> None:
    [problem] = validate(DataDependent())
    assert problem.startswith("DataDependent: torch.fx cannot trace its forward")
    assert "control flow" in problem and "data-dependent" in problem
    with pytest.raises(UnsupportedLayerError, match="cannot trace"):
        to_encrypted(DataDependent())


class Awkward(nn.Module):
    """A bare parameter, a branch, an in-place op whose input is read again, an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.fc = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.where(x > 0, x, -x)) * self.scale
        z = y.relu_()
        return y + z


def test_attributes_in_place_reuse_and_unused_layers_are_refused() -> None:
    text = "\n".join(validate(Awkward()))
    assert "attribute 'scale'" in text
    assert "_operator.gt" in text and "torch.where" in text and "cannot branch" in text
    assert "in-place operation at node 'relu_'" in text
    assert "'unused.weight' is never used" in text and "'unused.bias'" in text


def test_in_place_activation_layers_are_fine_when_not_reused(key) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.fc2 = nn.Linear(3, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.fc(x), inplace=True)
            out = self.act(self.fc2(out))
            return operator.add(out, x)

    assert validate(Block()) == []
    cmp = compare_step(Block(), torch.randn(4, 3, dtype=torch.float64), key)
    assert cmp.within(torch.float64), cmp


class SubtractAndStack(nn.Module):
    """``torch.sub`` with ``alpha`` and ``torch.stack`` (at a negative dim) in a traced forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = torch.tanh(self.a(x)), self.b(x)
        d = torch.sub(u, v, alpha=0.5) - torch.sub(v, u)
        s = torch.stack([d, u], dim=-1)  # [N, 3, 2]
        return self.out(s.flatten(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subtraction_with_alpha_and_stacking_equal_torch(key, dtype) -> None:
    torch.manual_seed(0)
    model = SubtractAndStack()
    assert isinstance(to_encrypted(model), EncryptedGraphModule)
    cmp = compare_step(model, torch.rand(5, 4, dtype=torch.float64), key, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for part in (cmp.outputs, cmp.input_grad, cmp.param_grads):
        assert (part.abs if dtype == torch.float64 else part.rel) <= tol, cmp
