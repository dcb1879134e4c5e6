"""Encrypted SGD / Adam / AdamW against torch's, step for step, state included.

Each test trains a small model with torch and its twin on ciphertexts from the same initial
weights, then decrypts parameters and optimiser state (momentum, Adam moments) and compares.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from federation.more import EncryptedTensor, FeatureRange, RegressionRange, decrypt, encrypt
from federation.nn import (
    EncryptedAdam,
    EncryptedSGD,
    loss_gradient,
    to_encrypted,
    to_plain,
)
from federation.nn.check import Deviation
from federation.nn.optim import (
    OPTIMIZERS,
    STATE_PREFIX,
    load_optimizer_arrays,
    optimizer_arrays,
    split_arrays,
)
from federation.nn.refresh import refresher

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only contend


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _check(dev: Deviation, dtype: torch.dtype) -> None:
    assert (dev.abs if dtype == torch.float64 else dev.rel) <= TOL[dtype], dev


class Pair:
    """A torch model and its key-free twin, trained side by side on one batch."""

    def __init__(self, key, dtype: torch.dtype, name: str, **hyper) -> None:
        torch.manual_seed(0)
        self.key, self.dtype = key, dtype
        self.plain = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
        self.twin = to_encrypted(self.plain, None, dtype=dtype)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.rand(12, 5, generator=gen, dtype=torch.float64).to(dtype)
        self.y = (torch.rand(12, 3, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        self.ex = encrypt(self.x, key, FeatureRange(0, 1), seed=2)
        self.ey = encrypt(self.y, key, RegressionRange(-1, 1), seed=3)
        plain_cls, enc_cls = OPTIMIZERS[name]
        self.popt = plain_cls(self.plain.parameters(), **hyper)
        self.eopt = enc_cls(self.twin, **hyper)

    def step(self, n: int = 1, *, hook=None) -> None:
        for i in range(n):
            self.popt.zero_grad()
            F.mse_loss(self.plain(self.x), self.y).backward()
            self.popt.step()
            self.eopt.zero_grad()
            out = self.twin(self.ex)
            out.backward(loss_gradient("mse", out.detach(), self.ey))
            self.eopt.step()
            if hook is not None:
                hook(0, i)

    def params(self) -> Deviation:
        dec = to_plain(self.twin, self.key).state_dict()
        return Deviation.of([(dec[k], v) for k, v in self.plain.state_dict().items()])

    def state(self) -> Deviation:
        """Every tensor of the optimiser state, decrypted, against torch's."""
        pairs = []
        for p, e in zip(self.plain.parameters(), self.twin.parameters(), strict=True):
            for name, t in self.popt.state[p].items():
                if name == "step":
                    assert float(self.eopt.state[e]["step"]) == float(t)
                else:
                    enc = EncryptedTensor(self.eopt.state[e][name], self.key.fingerprint)
                    pairs.append((decrypt(enc, self.key), t))
        return Deviation.of(pairs)


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
    dict(lr=0.05, momentum=0.5, maximize=True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hyper", SGD_CONFIGS)
def test_sgd_matches_torch(key, hyper, dtype) -> None:
    pair = Pair(key, dtype, "sgd", **hyper)
    pair.step(5)
    _check(pair.params(), dtype)
    _check(pair.state(), dtype)
    assert len(pair.eopt.encrypted_state()) == (4 if hyper.get("momentum") else 0)


ADAM_CONFIGS = [
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True)),
    ("adamw", dict(lr=0.01)),
    ("adamw", dict(lr=0.02, weight_decay=0.1, amsgrad=True, maximize=True)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "hyper"), ADAM_CONFIGS)
def test_adam_matches_torch(key, name, hyper, dtype) -> None:
    pair = Pair(key, dtype, name, **hyper)
    pair.step(6)
    _check(pair.params(), dtype)
    _check(pair.state(), dtype)
    per_param = 3 if hyper.get("amsgrad") else 2
    assert len(pair.eopt.encrypted_state()) == 4 * per_param


def test_adam_moves_the_weights_like_torch(key) -> None:
    # Guards the comparisons above against a vacuous pass (no update on either side).
    pair = Pair(key, torch.float64, "adam", lr=0.01)
    before = copy.deepcopy(pair.plain.state_dict())
    pair.step(3)
    moved = max(float((pair.plain.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 0.01
    assert pair.params().abs <= 1e-12


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_state_dict_round_trip_resumes_exactly(key, name) -> None:
    hyper = dict(lr=0.05, momentum=0.9) if name == "sgd" else dict(lr=0.01, amsgrad=True)
    pair = Pair(key, torch.float64, name, **hyper)
    pair.step(3)
    saved_model = copy.deepcopy(pair.twin.state_dict())
    saved_opt = copy.deepcopy(pair.eopt.state_dict())
    assert all(
        t.shape[-2:] == (2, 2)
        for s in saved_opt["state"].values()
        for k, t in s.items()
        if k != "step"
    )
    pair.step(3)
    resumed = to_encrypted(pair.plain, None, dtype=torch.float64)
    resumed.load_state_dict(saved_model)
    opt = type(pair.eopt)(resumed, **hyper)
    opt.load_state_dict(saved_opt)
    for _ in range(3):
        opt.zero_grad()
        out = resumed(pair.ex)
        out.backward(loss_gradient("mse", out.detach(), pair.ey))
        opt.step()
    for k, v in pair.twin.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


@pytest.mark.parametrize(
    "schedule",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=1e-3),
    ],
)
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_torch_lr_schedulers_drive_the_encrypted_optimisers(key, name, schedule) -> None:
    pair = Pair(key, torch.float64, name, lr=0.05)
    plain_sched, enc_sched = schedule(pair.popt), schedule(pair.eopt)
    for _ in range(5):
        pair.step()
        plain_sched.step()
        enc_sched.step()
        assert enc_sched.get_last_lr() == plain_sched.get_last_lr()
    assert pair.eopt.param_groups[0]["lr"] != 0.05
    _check(pair.params(), torch.float64)


def test_parameter_groups_with_their_own_learning_rates(key) -> None:
    pair = Pair(key, torch.float64, "adam", lr=0.01)
    weights = [pair.plain[0].weight, pair.plain[2].weight]
    biases = [pair.plain[0].bias, pair.plain[2].bias]
    pair.popt = torch.optim.Adam([{"params": weights}, {"params": biases, "lr": 0.05}], lr=0.01)
    groups = [
        {"params": [pair.twin[0].weight, pair.twin[2].weight]},
        {"params": [pair.twin[0].bias, pair.twin[2].bias], "lr": 0.05},
    ]
    pair.eopt = EncryptedAdam(pair.twin, lr=0.01, params=groups)
    pair.step(4)
    _check(pair.params(), torch.float64)
    with pytest.raises(ValueError, match="parameter of the twin"):
        EncryptedSGD(pair.twin, lr=0.1, params=[nn.Parameter(torch.zeros(2, 2, 2))])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_refreshing_the_encrypted_state_keeps_training_exact(key, name) -> None:
    # The site's refresh re-encrypts parameters and every optimiser state tensor in place.
    hyper = dict(lr=0.05, momentum=0.9) if name == "sgd" else dict(lr=0.01, amsgrad=True)
    pair = Pair(key, torch.float64, name, **hyper)
    pair.twin = to_encrypted(pair.plain, key, dtype=torch.float64, seed=4)
    pair.eopt = OPTIMIZERS[name][1](pair.twin, **hyper)
    pair.step(6, hook=refresher(pair.twin, pair.eopt, key, every=2))
    _check(pair.params(), torch.float64)
    _check(pair.state(), torch.float64)


def test_invalid_hyper_parameters_are_refused() -> None:
    twin = to_encrypted(nn.Sequential(nn.Linear(2, 2)).double())
    for bad in (dict(lr=0.0), dict(lr=0.1, weight_decay=-1.0), dict(lr=0.1, betas=(1.0, 0.9))):
        with pytest.raises(ValueError):
            EncryptedAdam(twin, **bad)
    with pytest.raises(ValueError, match="nesterov"):
        EncryptedSGD(twin, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum must be non-negative"):
        EncryptedSGD(twin, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError):  # torch refuses it too
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=-0.5)


RESUMABLE = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("adam", dict(lr=0.01, amsgrad=True)),
]


@pytest.mark.parametrize(("name", "hyper"), RESUMABLE)
def test_optimizer_arrays_resume_training_exactly_on_both_sides(key, name, hyper) -> None:
    """The state a federation sends beside the weights (``optimizer/<param>/<key>``): torch's
    and the twin's have the same names before the first step and after, and loading them
    into fresh optimisers continues bit for bit as if never interrupted."""
    pair = Pair(key, torch.float64, name, **hyper)
    fresh_plain = optimizer_arrays(pair.popt, pair.plain)
    fresh_enc = optimizer_arrays(pair.eopt, pair.twin)
    assert set(fresh_plain) == set(fresh_enc)
    assert all(k.startswith(STATE_PREFIX) for k in fresh_plain)
    assert len(fresh_plain) == 4 * {"sgd": 1 if hyper.get("momentum") else 0, "adam": 4}[name]
    for k, v in fresh_plain.items():
        enc = fresh_enc[k]
        assert not v.any() and not enc.any()  # zeros and step 0: the state before any step
        assert enc.shape == (v.shape if k.endswith("/step") else (*v.shape, 2, 2))

    pair.step(3)
    plain_arrays = optimizer_arrays(pair.popt, pair.plain)
    enc_arrays = optimizer_arrays(pair.eopt, pair.twin)
    assert set(plain_arrays) == set(fresh_plain) and set(enc_arrays) == set(fresh_enc)

    resumed = Pair(key, torch.float64, name, **hyper)
    resumed.plain.load_state_dict(pair.plain.state_dict())
    resumed.twin.load_state_dict(pair.twin.state_dict())
    load_optimizer_arrays(resumed.popt, resumed.plain, plain_arrays)
    load_optimizer_arrays(resumed.eopt, resumed.twin, enc_arrays)
    pair.step(3)
    resumed.step(3)
    for k, v in pair.plain.state_dict().items():
        assert torch.equal(resumed.plain.state_dict()[k], v), k
    for k, v in pair.twin.state_dict().items():
        assert torch.equal(resumed.twin.state_dict()[k], v), k
    _check(resumed.params(), torch.float64)
    _check(resumed.state(), torch.float64)


def test_optimizer_arrays_are_checked_and_split_from_the_model(key) -> None:
    pair = Pair(key, torch.float64, "sgd", lr=0.05, momentum=0.9)
    pair.step(1)
    arrays = optimizer_arrays(pair.eopt, pair.twin)
    name = f"{STATE_PREFIX}0.weight/momentum_buffer"
    model = {k: v.numpy() for k, v in pair.twin.state_dict().items()}
    weights, state = split_arrays({**model, **{k: v.numpy() for k, v in arrays.items()}})
    assert set(weights) == set(model) and state is not None
    assert all(torch.equal(state[k], v) for k, v in arrays.items()) and set(state) == set(arrays)
    assert split_arrays(model) == (model, None)
    with pytest.raises(KeyError, match=f"optimiser state '{name}' is missing"):
        load_optimizer_arrays(pair.eopt, pair.twin, {k: v for k, v in arrays.items() if k != name})
    wrong = {**arrays, name: torch.zeros(6, 5)}
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(6, 5\), expected \(6, 5, 2, 2\)"):
        load_optimizer_arrays(pair.eopt, pair.twin, wrong)
    rms = torch.optim.RMSprop(pair.plain.parameters(), lr=0.01)
    with pytest.raises(TypeError, match="no state layout known for RMSprop"):
        optimizer_arrays(rms, pair.plain)


def test_adam_moments_return_to_float64_after_a_float32_state_dict_load(key) -> None:
    """torch's ``load_state_dict`` casts the state to the parameters' dtype; the encrypted
    Adam keeps its moments in float64 and casts them back before its next step."""
    pair = Pair(key, torch.float32, "adam", lr=0.01)
    pair.step(3)
    saved = copy.deepcopy(pair.eopt.state_dict())
    pair.eopt = EncryptedAdam(pair.twin, lr=0.01)
    pair.eopt.load_state_dict(saved)
    moments = [s["exp_avg"].dtype for s in pair.eopt.state.values()]
    assert moments == [torch.float32] * 4
    pair.step(3)
    for s in pair.eopt.state.values():
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float64
    _check(pair.params(), torch.float32)
    _check(pair.state(), torch.float32)
