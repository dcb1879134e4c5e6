"""Convert a plain ``nn.Module`` to its encrypted twin and back (Opacus-style wrapping).

The twin keeps the module tree and the ``state_dict`` keys; only the parameter shapes gain a
trailing ``2, 2``. Layers the algebra cannot express are refused with the alternative.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from federation.more.cipher import FeatureRange, decrypt, encrypt
from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor, encode_plain
from federation.nn.layers import (
    EncryptedAvgPool2d,
    EncryptedConv2d,
    EncryptedFlatten,
    EncryptedLayer,
    EncryptedLinear,
    EncryptedSigmoid,
    EncryptedSoftplus,
    EncryptedSquare,
    EncryptedTanh,
    Square,
)

_TWINS: dict[type[nn.Module], type[EncryptedLayer]] = {
    nn.Linear: EncryptedLinear,
    nn.Conv2d: EncryptedConv2d,
    nn.AvgPool2d: EncryptedAvgPool2d,
    nn.Flatten: EncryptedFlatten,
    nn.Sigmoid: EncryptedSigmoid,
    nn.Tanh: EncryptedTanh,
    nn.Softplus: EncryptedSoftplus,
    Square: EncryptedSquare,
}

_ACTIVATIONS = "nn.Sigmoid, nn.Tanh, nn.Softplus or federation.nn.Square"
_ALTERNATIVES: dict[type[nn.Module], str] = {
    nn.ReLU: _ACTIVATIONS,
    nn.ReLU6: _ACTIVATIONS,
    nn.LeakyReLU: _ACTIVATIONS,
    nn.ELU: _ACTIVATIONS,
    nn.GELU: _ACTIVATIONS,
    nn.SiLU: _ACTIVATIONS,
    nn.Hardtanh: "nn.Tanh",
    nn.MaxPool1d: "nn.AvgPool2d",
    nn.MaxPool2d: "nn.AvgPool2d",
    nn.AdaptiveMaxPool2d: "nn.AvgPool2d",
    nn.BatchNorm1d: "no normalisation layer: standardise the inputs in the data pipeline",
    nn.BatchNorm2d: "no normalisation layer: standardise the inputs in the data pipeline",
    nn.LayerNorm: "no normalisation layer: standardise the inputs in the data pipeline",
    nn.Dropout: "no dropout: regularise with SGD weight decay",
    nn.Dropout2d: "no dropout: regularise with SGD weight decay",
    nn.Softmax: "no output softmax: the cross-entropy loss applies it",
    nn.LogSoftmax: "no output softmax: the cross-entropy loss applies it",
}

SUPPORTED_LAYERS = tuple(t.__name__ for t in _TWINS)


class UnsupportedLayerError(TypeError):
    """A layer compares values (ReLU, max-pooling, ...) or is otherwise not in the algebra."""


def _refuse(path: str, module: nn.Module, reason: str | None = None) -> UnsupportedLayerError:
    name = type(module).__name__
    where = f" at '{path}'" if path else ""
    alt = _ALTERNATIVES.get(type(module))
    if reason:
        return UnsupportedLayerError(f"{name}{where}: {reason}")
    if alt:
        return UnsupportedLayerError(
            f"{name}{where} cannot run on MORE ciphertexts (it compares values or is not "
            f"an algebra operation); use {alt} instead"
        )
    return UnsupportedLayerError(
        f"{name}{where} has no encrypted twin; supported layers: {', '.join(SUPPORTED_LAYERS)} "
        "inside nn.Sequential"
    )


def _check_layer(path: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1):
            raise _refuse(path, module, "groups and dilation are not supported; use groups=1")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise _refuse(path, module, "use numeric zero padding (padding_mode='zeros')")
    if isinstance(module, nn.AvgPool2d):
        if module.ceil_mode or not module.count_include_pad or module.divisor_override:
            raise _refuse(path, module, "use ceil_mode=False, count_include_pad=True")
    if isinstance(module, nn.Softplus) and module.beta != 1:
        raise _refuse(path, module, "only beta=1 is supported")


def _convert(module: nn.Module, dtype: torch.dtype, path: str = "") -> nn.Module:
    if type(module) is nn.Sequential:
        return nn.Sequential(
            *(
                _convert(child, dtype, f"{path}.{n}" if path else n)
                for n, child in module.named_children()
            )
        )
    twin = _TWINS.get(type(module))
    if twin is None:
        raise _refuse(path, module)
    _check_layer(path, module)
    return twin(module, dtype)


def _plain(module: nn.Module) -> nn.Module:
    if type(module) is nn.Sequential:
        return nn.Sequential(*(_plain(child) for child in module.children()))
    if not isinstance(module, EncryptedLayer):
        raise TypeError(f"{type(module).__name__} is not an encrypted twin")
    return module.to_plain()


def encrypted_layers(model: nn.Module) -> Iterator[EncryptedLayer]:
    for m in model.modules():
        if isinstance(m, EncryptedLayer):
            yield m


def model_fingerprint(model: nn.Module) -> str | None:
    """The key the twin's parameters are under (None while they are key-free encodings)."""
    fps = {layer.key_fingerprint for layer in encrypted_layers(model)} - {None}
    if len(fps) > 1:
        raise ValueError(f"model mixes parameters under different keys: {sorted(fps)}")
    return fps.pop() if fps else None


def set_model_fingerprint(model: nn.Module, fingerprint: str | None) -> None:
    for layer in encrypted_layers(model):
        layer.key_fingerprint = fingerprint


def encrypted_parameters(model: nn.Module) -> dict[str, EncryptedTensor]:
    """Each parameter as an :class:`EncryptedTensor` sharing the parameter's storage."""
    fp = model_fingerprint(model)
    out = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, EncryptedLayer):
            for name, p in layer.named_parameters(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                out[key] = EncryptedTensor(layer.blocks(name, p), fp)
    return out


def encrypted_gradients(model: nn.Module) -> dict[str, EncryptedTensor]:
    """The algebra gradient of each parameter that has one (transpose of autograd's)."""
    fp = model_fingerprint(model)
    out = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, EncryptedLayer):
            for name, p in layer.named_parameters(recurse=False):
                if p.grad is not None:
                    key = f"{prefix}.{name}" if prefix else name
                    out[key] = EncryptedTensor(layer.blocks(name, p.grad).mT, fp)
    return out


def to_encrypted(
    module: nn.Module,
    key: MoreKey | None = None,
    *,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The encrypted twin of ``module`` (an ``nn.Sequential`` of supported layers).

    Without a key the parameters take the key-free encoding ``w * I`` (what the aggregator
    does); with a key each parameter is encrypted with shadows uniform over its range.
    """
    if dtype is None:
        params = list(module.parameters())
        dtype = params[0].dtype if params else torch.get_default_dtype()
    twin = _convert(module, dtype)
    if key is not None:
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        plain = dict(module.named_parameters())
        with torch.no_grad():
            for name, p in encrypted_parameters(twin).items():
                w = plain[name].detach().to(dtype)
                lo, hi = float(w.min()), float(w.max())
                p.entries.copy_(encrypt(w, key, FeatureRange(lo, hi), generator=gen).entries)
        set_model_fingerprint(twin, key.fingerprint)
    return twin


def to_plain(twin: nn.Module, key: MoreKey) -> nn.Module:
    """Decrypt a twin into a torch module with the same ``state_dict`` keys (site only)."""
    fp = model_fingerprint(twin)
    if fp is not None and fp != key.fingerprint:
        raise ValueError(f"model is under key {fp}, not under this key ({key.fingerprint})")
    state = {name: decrypt(EncryptedTensor(t, fp), key) for name, t in twin.state_dict().items()}
    dtype = next(iter(state.values())).dtype if state else torch.get_default_dtype()
    plain = _plain(twin).to(dtype)
    plain.load_state_dict(state)
    return plain


def encode_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key-free encodings ``w * I`` of a plain state dict: the aggregator's initial model."""
    return {name: encode_plain(t.detach()).entries for name, t in state.items()}


def load_encrypted_state(
    twin: nn.Module, state: Mapping[str, torch.Tensor], fingerprint: str | None
) -> None:
    """Load ciphertext entries (e.g. a received global model) into a twin, checking shapes."""
    own = twin.state_dict()
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"encrypted state mismatch: missing {missing}, unexpected {extra}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(
                f"encrypted state '{name}': shape {tuple(t.shape)}, "
                f"expected {tuple(own[name].shape)}"
            )
    twin.load_state_dict({n: torch.as_tensor(t, dtype=own[n].dtype) for n, t in state.items()})
    set_model_fingerprint(twin, fingerprint)
