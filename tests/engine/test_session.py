"""Training sessions (federation/nn/session.py): one step, batch order, LR scheduler, resume
from optimiser arrays and the site's refresh, for torch's plaintext session and the encrypted
one alike; a non-finite loss gradient stops the encrypted session before its update.

Each check trains both sessions on the same data and compares the decrypted model with
torch's (float64: to round-off).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from federation.more import FeatureRange, RegressionRange, decrypt, encrypt
from federation.more.tensor import EncryptedTensor
from federation.nn import (
    EncryptedSession,
    PlainSession,
    SessionConfig,
    TrainingDivergedError,
    to_encrypted,
    to_plain,
)
from federation.nn.optim import optimizer_arrays
from federation.nn.session import batch_order

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only contend

TOL = 1e-12


def _data(key, n: int = 24):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    y = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1
    ex = encrypt(x, key, FeatureRange(0.0, 1.0), seed=1)
    ey = encrypt(y, key, RegressionRange(-1.0, 1.0), seed=2)
    return x, y, ex, ey


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _deviation(twin: nn.Module, plain: nn.Module, key) -> float:
    dec = to_plain(twin, key).state_dict()
    return max(float((dec[k] - v).abs().max()) for k, v in plain.state_dict().items())


def test_batch_order_is_a_seeded_permutation_per_epoch() -> None:
    first = batch_order(10, 4, seed=3, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    again = batch_order(10, 4, seed=3, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(batch_order(10, 4, seed=3, epoch=1)))
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        batch_order(10, 0, seed=3, epoch=0)


def test_a_scheduler_steps_once_per_epoch_in_both_sessions(key) -> None:
    x, y, ex, ey = _data(key)
    config = SessionConfig("sgd", {"lr": 0.2, "momentum": 0.5}, batch_size=8, epochs=3)

    def halve(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    plain = _model()
    twin = to_encrypted(plain, None)
    encrypted = EncryptedSession(twin, ex, ey, loss="mse", config=config, scheduler=halve)
    reference = PlainSession(plain, x, y, loss="mse", config=config, scheduler=halve)
    reports = encrypted.train()
    reference.train()
    assert [(r.epoch, r.steps) for r in reports] == [(0, 3), (1, 3), (2, 3)]
    lrs = [s.optimizer.param_groups[0]["lr"] for s in (encrypted, reference)]
    assert lrs[0] == lrs[1] == pytest.approx(0.2 * 0.5**3)
    assert _deviation(twin, plain, key) <= TOL


def test_a_non_finite_gradient_stops_the_session_before_its_update(key) -> None:
    x, y, ex, ey = _data(key)
    config = SessionConfig("sgd", {"lr": 0.1}, batch_size=8, epochs=2)
    order = batch_order(len(x), 8, config.seed, 0)
    ex.entries[int(order[2][0])] = float("inf")  # a corrupt row in the third batch
    plain = _model()
    twin = to_encrypted(plain, None)
    session = EncryptedSession(twin, ex, ey, loss="mse", config=config)
    with pytest.raises(TrainingDivergedError, match="diverged at epoch 0, step 2") as info:
        session.train()
    assert (info.value.epoch, info.value.step) == (0, 2)
    reference = PlainSession(plain, x, y, loss="mse", config=config)
    for idx in order[:2]:  # the model holds the last finite parameters: two steps' worth
        reference.step(idx)
    assert _deviation(twin, plain, key) <= TOL


@pytest.mark.parametrize(
    ("name", "hyper"), [("sgd", {"lr": 0.1, "momentum": 0.9}), ("adam", {"lr": 0.02})]
)
def test_a_resumed_session_continues_like_uninterrupted_torch(key, name, hyper) -> None:
    """A site's second round: the model and the optimiser arrays it sent, loaded into a new
    session under its key (the loaded state is re-encrypted, the model refreshed every 2
    steps), train epoch 1 exactly as torch's uninterrupted two epochs, and torch's own
    session resumed the same way does too."""
    x, y, ex, ey = _data(key)
    config = SessionConfig(name, hyper, batch_size=8, epochs=1, refresh_every=2)
    plain = _model()
    twin = to_encrypted(plain, key, seed=3)
    first = EncryptedSession(twin, ex, ey, loss="mse", config=config, key=key)
    first.train()
    sent = optimizer_arrays(first.optimizer, twin)
    second = EncryptedSession(
        twin, ex, ey, loss="mse", config=config, key=key, optimizer_state=sent
    )
    for full, value in optimizer_arrays(second.optimizer, twin).items():
        if not full.endswith("/step"):  # re-encrypted: the same values in both channels
            before = decrypt(EncryptedTensor(sent[full], key.fingerprint), key)
            after = decrypt(EncryptedTensor(value, key.fingerprint), key)
            assert float((after - before).abs().max()) <= TOL
    assert second.epoch(1).steps == 3

    uninterrupted = _model()
    PlainSession(uninterrupted, x, y, loss="mse", config=replace(config, epochs=2)).train()
    resumed = _model()
    torch_first = PlainSession(resumed, x, y, loss="mse", config=config)
    torch_first.train()
    torch_sent = optimizer_arrays(torch_first.optimizer, resumed)
    PlainSession(resumed, x, y, loss="mse", config=config, optimizer_state=torch_sent).epoch(1)
    for k, v in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert _deviation(twin, uninterrupted, key) <= 1e-10


def test_held_tensors_match_one_to_one_with_four_entries_each(key) -> None:
    """What a step keeps (the benches count its bytes): inputs, parameters, gradients and
    optimiser state, in the same number of tensors on both sides, each ciphertext 2x2."""
    x, y, ex, ey = _data(key)
    config = SessionConfig("sgd", {"lr": 0.1, "momentum": 0.9}, batch_size=8)
    plain = _model()
    twin = to_encrypted(plain, None)
    encrypted = EncryptedSession(twin, ex, ey, loss="mse", config=config)
    reference = PlainSession(plain, x, y, loss="mse", config=config)
    batch = batch_order(len(x), 8, config.seed, 0)[0]
    encrypted.step((ex[batch], ey[batch]))  # a ready pair, as the benches pass
    reference.step(batch)
    assert _deviation(twin, plain, key) <= TOL
    held_encrypted, held_plain = encrypted.held(ex[batch]), reference.held(x[batch])
    params = len(list(plain.parameters()))
    assert len(held_encrypted) == len(held_plain) == 1 + 3 * params
    assert sum(t.numel() for t in held_encrypted) == 4 * sum(t.numel() for t in held_plain)
