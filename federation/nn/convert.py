"""Convert a plain ``nn.Module`` to its encrypted twin and back (Opacus-style wrapping).

An ``nn.Sequential`` of supported layers becomes an ``nn.Sequential`` of twins; any other
module is traced with torch.fx into an :class:`~federation.nn.graph.EncryptedGraphModule`.
Either way the twin keeps the ``state_dict`` keys; only the shapes of encrypted entries gain a
trailing ``2, 2``. :func:`validate` lists every obstacle at once, and :func:`to_encrypted`
refuses a module with all of them before any data is encrypted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from federation.more.cipher import FeatureRange, decrypt, encrypt
from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor, encode_plain
from federation.nn.graph import EncryptedGraphModule, TraceFailure, graph_problems, trace
from federation.nn.layers import TWINS, EncryptedLayer, layer_problems


class UnsupportedLayerError(TypeError):
    """The module cannot run on ciphertexts; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{len(problems)} problems prevent encrypting this model:\n{lines}")


def _is_layer(module: nn.Module) -> bool:
    """A leaf to convert as a whole: a layer with a twin, or any torch layer (to refuse)."""
    if type(module) in TWINS:
        return True
    return type(module).__module__.startswith("torch.nn") and not isinstance(
        module, nn.Sequential | nn.ModuleList | nn.ModuleDict
    )


def _is_sequential_tree(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose descendants are nested ``nn.Sequential`` or layers."""
    return type(module) is nn.Sequential and all(
        _is_sequential_tree(c) or _is_layer(c) for c in module.children()
    )


def _sequential_problems(module: nn.Module, path: str = "") -> list[str]:
    problems = []
    for name, child in module.named_children():
        where = f"{path}.{name}" if path else name
        if type(child) is nn.Sequential:
            problems += _sequential_problems(child, where)
        else:
            problems += layer_problems(where, child)
    return problems


_UNTRACEABLE = (
    "{name}: torch.fx cannot trace its forward ({reason}); convert an nn.Sequential of "
    "supported layers, or a module whose forward takes no data-dependent Python decision "
    "(an `if` on a tensor value, a loop over its values, a conversion to a Python number)"
)


def _analyse(module: nn.Module) -> tuple[list[str], torch.fx.Graph | None]:
    """(every problem, the traced graph when the module needs one)."""
    if _is_sequential_tree(module):
        return _sequential_problems(module), None
    if _is_layer(module):
        return layer_problems("", module), None
    try:
        graph = trace(module)
    except TraceFailure as exc:
        return [_UNTRACEABLE.format(name=type(module).__name__, reason=exc)], None
    return graph_problems(module, graph), graph


def validate(module: nn.Module) -> list[str]:
    """Everything that keeps ``module`` from running on ciphertexts ([] if nothing).

    Like Opacus' ``ModuleValidator.validate``: all problems at once, each naming the layer or
    operation, its path, and the alternative.
    """
    return _analyse(module)[0]


def _convert(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    if type(module) is nn.Sequential:
        return nn.Sequential(*(_convert(child, dtype) for child in module.children()))
    return TWINS[type(module)](module, dtype)


def _plain(module: nn.Module) -> nn.Module:
    if type(module) is nn.Sequential:
        return nn.Sequential(*(_plain(child) for child in module.children()))
    if not isinstance(module, EncryptedLayer | EncryptedGraphModule):
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


def layer_parameters(
    model: nn.Module,
) -> Iterator[tuple[str, EncryptedLayer, str, nn.Parameter]]:
    """(state_dict key, layer, name in the layer, stored parameter) of each parameter."""
    for prefix, layer in model.named_modules():
        if isinstance(layer, EncryptedLayer):
            for name, p in layer.named_parameters(recurse=False):
                yield (f"{prefix}.{name}" if prefix else name), layer, name, p


def encrypted_parameters(model: nn.Module) -> dict[str, EncryptedTensor]:
    """Each parameter as an :class:`EncryptedTensor` sharing the parameter's storage."""
    fp = model_fingerprint(model)
    return {
        key: EncryptedTensor(layer.blocks(name, p), fp)
        for key, layer, name, p in layer_parameters(model)
    }


def encrypted_buffers(model: nn.Module) -> dict[str, EncryptedTensor]:
    """Each encrypted buffer (batch-norm running statistics), sharing its storage."""
    fp = model_fingerprint(model)
    out = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, EncryptedLayer):
            for name, b in layer.named_buffers(recurse=False):
                if name not in layer.plain_buffers:
                    out[f"{prefix}.{name}" if prefix else name] = EncryptedTensor(b, fp)
    return out


def plain_state_keys(model: nn.Module) -> set[str]:
    """The ``state_dict`` keys that stay plaintext (counters such as num_batches_tracked)."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, layer in model.named_modules()
        if isinstance(layer, EncryptedLayer)
        for name in layer.plain_buffers
        if getattr(layer, name) is not None
    }


def encrypted_gradients(model: nn.Module) -> dict[str, EncryptedTensor]:
    """The algebra gradient of each parameter that has one (transpose of autograd's)."""
    fp = model_fingerprint(model)
    return {
        key: EncryptedTensor(layer.blocks(name, p.grad).mT, fp)
        for key, layer, name, p in layer_parameters(model)
        if p.grad is not None
    }


def to_encrypted(
    module: nn.Module,
    key: MoreKey | None = None,
    *,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The encrypted twin of ``module`` (an ``nn.Sequential`` or any traceable module).

    Without a key the parameters take the key-free encoding ``w * I`` (what the aggregator
    does); with a key each parameter and running statistic is encrypted with shadows uniform
    over its range. Raises :class:`UnsupportedLayerError` listing every problem first.
    """
    problems, graph = _analyse(module)
    if problems:
        raise UnsupportedLayerError(problems)
    if dtype is None:
        params = list(module.parameters())
        dtype = params[0].dtype if params else torch.get_default_dtype()
    twin = _convert(module, dtype) if graph is None else EncryptedGraphModule(module, graph, dtype)
    if key is not None:
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        plain = module.state_dict()
        state = {**encrypted_parameters(twin), **encrypted_buffers(twin)}
        with torch.no_grad():
            for name, p in state.items():
                w = plain[name].detach().to(dtype)
                lo, hi = float(w.min()), float(w.max())
                p.entries.copy_(encrypt(w, key, FeatureRange(lo, hi), generator=gen).entries)
        set_model_fingerprint(twin, key.fingerprint)
    return twin


def to_plain(twin: nn.Module, key: MoreKey) -> nn.Module:
    """Decrypt a twin into a torch module with the same ``state_dict`` keys (site only).

    For a traced module this is an instance of the user's own class.
    """
    fp = model_fingerprint(twin)
    if fp is not None and fp != key.fingerprint:
        raise ValueError(f"model is under key {fp}, not under this key ({key.fingerprint})")
    keep = plain_state_keys(twin)
    state = {
        name: t.clone() if name in keep else decrypt(EncryptedTensor(t, fp), key)
        for name, t in twin.state_dict().items()
    }
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    plain = _plain(twin).to(floats[0] if floats else torch.get_default_dtype())
    plain.load_state_dict(state)
    return plain


def encode_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key-free encodings ``w * I`` of a plain state dict: the aggregator's initial model.

    Integer buffers (batch-norm's ``num_batches_tracked``) stay plaintext, as in the twin.
    """
    return {
        name: encode_plain(t.detach()).entries if t.is_floating_point() else t.detach().clone()
        for name, t in state.items()
    }


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
