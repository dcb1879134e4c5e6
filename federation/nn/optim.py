"""SGD, Adam and AdamW on ciphertexts, as ``torch.optim.Optimizer`` subclasses.

The optimisers' ``params`` are the twin's stored ciphertext entries, so ``param_groups``,
``state_dict()``, ``load_state_dict()`` and torch's LR schedulers work unchanged. ``step``
works in the algebra on each parameter's ``[..., 2, 2]`` block view: linear updates for SGD,
and for Adam the algebra product ``g * g``, the channel-wise ``sqrt`` and the algebra inverse,
so each channel follows exactly torch's rule. The algebra gradient is the transpose of
autograd's entry gradient (design note, section 3). The state (momentum, Adam moments) is
ciphertext entries in block layout; :meth:`EncryptedOptimizer.encrypted_state` exposes it for
a site's refresh. Nothing here takes a key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from federation.more.tensor import EncryptedTensor
from federation.nn.convert import layer_parameters, model_fingerprint
from federation.nn.layers import EncryptedLayer

ParamsArg = Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None


class EncryptedOptimizer(torch.optim.Optimizer):
    """Base of the encrypted optimisers: maps each stored parameter to its block view.

    ``params`` (default: every parameter of ``model``) may be parameter groups, as in torch;
    they must be parameters of ``model``'s encrypted layers.
    """

    #: names of the per-parameter state entries that are ciphertexts (all but ``step``).
    state_keys: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, params: ParamsArg, defaults: dict[str, Any]) -> None:
        self.model = model
        self._layers: dict[nn.Parameter, tuple[EncryptedLayer, str]] = {
            p: (layer, name) for _, layer, name, p in layer_parameters(model)
        }
        super().__init__(list(self._layers) if params is None else params, defaults)
        for group in self.param_groups:
            if any(p not in self._layers for p in group["params"]):
                raise ValueError("every optimised tensor must be a parameter of the twin")

    def _blocks(self, p: nn.Parameter, stored: torch.Tensor) -> torch.Tensor:
        layer, name = self._layers[p]
        return layer.blocks(name, stored)

    def _pairs(
        self, group: dict[str, Any], fp: str | None
    ) -> Iterator[tuple[nn.Parameter, EncryptedTensor]]:
        """Each parameter with a gradient, and that gradient in the algebra."""
        for p in group["params"]:
            if p.grad is not None:
                g = EncryptedTensor(self._blocks(p, p.grad).mT, fp)
                yield p, -g if group.get("maximize", False) else g

    def _param(self, p: nn.Parameter, fp: str | None) -> EncryptedTensor:
        """The parameter's ciphertexts, sharing its storage (in-place updates write through)."""
        return EncryptedTensor(self._blocks(p, p), fp)

    def _state(self, p: nn.Parameter, key: str, fp: str | None) -> EncryptedTensor:
        return EncryptedTensor(self.state[p][key], fp)

    def encrypted_state(self) -> list[EncryptedTensor]:
        """Every ciphertext of the optimiser state (sharing storage), for a site's refresh."""
        fp = model_fingerprint(self.model)
        return [
            EncryptedTensor(state[k], fp)
            for state in self.state.values()
            for k in self.state_keys
            if k in state
        ]

    def fresh_state(self, p: nn.Parameter, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The state ``p`` would have before its first step, as zeros (key-free ciphertexts
        of 0), so that a federation can send it like any other state."""
        raise NotImplementedError


def _check(lr: float, weight_decay: float) -> None:
    if lr <= 0 or weight_decay < 0:
        raise ValueError("lr must be positive and weight_decay non-negative")


class EncryptedSGD(EncryptedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay) in the algebra.

    Only linear operations on ciphertexts: both channels follow torch's rule.
    """

    state_keys = ("momentum_buffer",)

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        params: ParamsArg = None,
    ) -> None:
        _check(lr, weight_decay)
        if momentum < 0:
            raise ValueError("momentum must be non-negative")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(model, params, defaults)

    def fresh_state(self, p: nn.Parameter, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not group["momentum"]:
            return {}
        return {"momentum_buffer": torch.zeros_like(self._blocks(p, p))}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        fp = model_fingerprint(self.model)
        for group in self.param_groups:
            momentum, wd = group["momentum"], group["weight_decay"]
            for p, g in self._pairs(group, fp):
                param = self._param(p, fp)
                if wd:
                    g = g + param * wd
                if momentum:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = g.entries.clone(
                            memory_format=torch.contiguous_format
                        )
                        buf = self._state(p, "momentum_buffer", fp)
                    else:
                        buf = self._state(p, "momentum_buffer", fp)
                        buf.mul_(momentum).add_(g, alpha=1.0 - group["dampening"])
                    g = g + buf * momentum if group["nesterov"] else buf
                param.add_(g, alpha=-group["lr"])


class EncryptedAdam(EncryptedOptimizer):
    """``torch.optim.Adam`` in the algebra (``decoupled=True``: ``torch.optim.AdamW``).

    ``m = b1 m + (1 - b1) g`` and ``v = b2 v + (1 - b2) g g`` with the algebra product, then
    ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` with the channel-wise ``sqrt`` and the
    algebra inverse: each channel runs torch's Adam (eps placed as torch places it).

    The moments are kept in float64 whatever the parameters' dtype: ``g g`` squares the
    ratio between a channel's gradient and the other channel's, and a float32 ciphertext
    would lose a channel whose gradient is small next to its shadow's (then Adam's
    ``m / sqrt(v)`` turns that loss into a full-size step error). The gradient itself has the
    parameters' precision: in float32 a parameter whose data gradient is exactly 0 (a dead
    ReLU unit) carries round-off from its shadow (about ``1e-7 cond(S)^2 |shadow grad|``),
    which Adam, unlike torch on an exact 0, turns into a step of up to ``lr``.
    """

    state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled: bool = False,
        params: ParamsArg = None,
    ) -> None:
        _check(lr, weight_decay)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or eps <= 0:
            raise ValueError("betas must lie in [0, 1) and eps must be positive")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled,
        )
        super().__init__(model, params, defaults)

    def fresh_state(self, p: nn.Parameter, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        zeros = torch.zeros(self._blocks(p, p).shape, dtype=torch.float64, device=p.device)
        state = {
            "step": torch.tensor(0.0, dtype=torch.float64),
            "exp_avg": zeros.clone(),
            "exp_avg_sq": zeros.clone(),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros
        return state

    def _init_state(self, p: nn.Parameter, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state.update(self.fresh_state(p, group))
        for k in self.state_keys:  # load_state_dict casts the state to the parameters' dtype
            if k in state and state[k].dtype != torch.float64:
                state[k] = state[k].double()
        return state

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        fp = model_fingerprint(self.model)
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p, g in self._pairs(group, fp):
                state = self._init_state(p, group)
                state["step"] += 1
                step = float(state["step"])
                param = self._param(p, fp)
                g = g.double()
                if wd and group["decoupled_weight_decay"]:
                    param.mul_(1.0 - lr * wd)
                elif wd:
                    g = g + param.double() * wd
                m, v = self._state(p, "exp_avg", fp), self._state(p, "exp_avg_sq", fp)
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).add_(g * g, alpha=1.0 - beta2)
                if group["amsgrad"]:
                    vmax = self._state(p, "max_exp_avg_sq", fp)
                    vmax.entries.copy_(vmax.maximum(v).entries)
                    v = vmax
                bc1 = 1.0 - beta1**step
                bc2_sqrt = math.sqrt(1.0 - beta2**step)
                # v >= 0 on each channel; the clamp only removes round-off below zero
                # (a channel whose gradients vanish next to a large other channel).
                denom = v.clamp(min=0.0).sqrt() / bc2_sqrt + eps
                param.add_((m * denom.inverse()).to(param.dtype), alpha=-lr / bc1)


class EncryptedAdamW(EncryptedAdam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 0.01, as torch)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        params: ParamsArg = None,
    ) -> None:
        super().__init__(
            model,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            decoupled=True,
            params=params,
        )


OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], type[EncryptedOptimizer]]] = {
    "sgd": (torch.optim.SGD, EncryptedSGD),
    "adam": (torch.optim.Adam, EncryptedAdam),
    "adamw": (torch.optim.AdamW, EncryptedAdamW),
}
"""Optimiser name -> (torch's optimiser, its encrypted twin); both take torch's keywords."""

STATE_PREFIX = "optimizer/"
"""Prefix of the optimiser-state arrays that travel beside a model's ``state_dict``."""


def _named(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``name -> (parameter, its group)`` for every optimised parameter of ``model``."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: (p, g) for g in optimizer.param_groups for p in g["params"]}


def _fresh(optimizer: torch.optim.Optimizer, p: nn.Parameter, group: dict[str, Any]) -> dict:
    if isinstance(optimizer, EncryptedOptimizer):
        return optimizer.fresh_state(p, group)
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer": torch.zeros_like(p)} if group["momentum"] else {}
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        state = {
            "step": torch.tensor(0.0, dtype=torch.float64),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p)
        return state
    raise TypeError(f"no state layout known for {type(optimizer).__name__}")


def optimizer_arrays(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as named tensors (``optimizer/<param>/<key>``).

    Parameters without state yet get the state before their first step (zeros and step 0,
    which both torch's and the encrypted optimisers continue from exactly as from nothing),
    so the names and shapes do not depend on how far training got.
    """
    out = {}
    for name, (p, group) in _named(optimizer, model).items():
        state = optimizer.state.get(p) or _fresh(optimizer, p, group)
        for key, value in state.items():
            out[f"{STATE_PREFIX}{name}/{key}"] = value.detach().clone()
    return out


def load_optimizer_arrays(
    optimizer: torch.optim.Optimizer, model: nn.Module, arrays: dict[str, torch.Tensor]
) -> None:
    """Set the optimiser's state from :func:`optimizer_arrays`' names (all of them needed)."""
    for name, (p, group) in _named(optimizer, model).items():
        fresh = _fresh(optimizer, p, group)
        state = {}
        for key, like in fresh.items():
            full = f"{STATE_PREFIX}{name}/{key}"
            if full not in arrays:
                raise KeyError(f"optimiser state '{full}' is missing")
            value = torch.as_tensor(arrays[full])
            if value.shape != like.shape:
                raise ValueError(
                    f"optimiser state '{full}' has shape {tuple(value.shape)}, "
                    f"expected {tuple(like.shape)}"
                )
            state[key] = value.to(like.dtype).clone()
        optimizer.state[p] = state


def split_arrays(
    arrays: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """A received model's ``state_dict`` arrays and its optimiser state (``None`` if absent)."""
    model = {k: v for k, v in arrays.items() if not k.startswith(STATE_PREFIX)}
    state = {k: torch.as_tensor(v) for k, v in arrays.items() if k.startswith(STATE_PREFIX)}
    return model, state or None
