"""A site's periodic re-encryption of the model it is training (it holds the key).

The training step never sees the key; an encrypted session given the site's key calls this
step hook after each step, and it re-encrypts the parameters, the batch-norm running
statistics and the optimiser's state (momentum, Adam moments) in place every ``every`` steps,
which keeps round-off from growing outside the key's algebra (see
:func:`federation.more.refresh`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from federation.more.cipher import refresh
from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor
from federation.nn.convert import encrypted_buffers, encrypted_parameters
from federation.nn.optim import EncryptedOptimizer

StepHook = Callable[[int, int], None]


@torch.no_grad()
def refresh_in_place(tensors: list[EncryptedTensor], key: MoreKey) -> None:
    """Re-encrypt each tensor in place (same values in both channels, in-algebra again)."""
    for t in tensors:
        t.entries.copy_(refresh(t.detach(), key).entries)


def model_ciphertexts(model: nn.Module) -> list[EncryptedTensor]:
    """A twin's parameters and encrypted buffers, sharing their storage."""
    return list(encrypted_parameters(model).values()) + list(encrypted_buffers(model).values())


def refresher(
    model: nn.Module, optimizer: EncryptedOptimizer, key: MoreKey, every: int
) -> StepHook | None:
    """A step hook that refreshes ``model`` and ``optimizer`` state every ``every`` steps."""
    if every <= 0:
        return None
    count = 0

    @torch.no_grad()
    def hook(epoch: int, step: int) -> None:
        nonlocal count
        count += 1
        if count % every:
            return
        refresh_in_place(model_ciphertexts(model) + optimizer.encrypted_state(), key)

    return hook
