"""Generic models for the generic data sources (``tabular``, ``arrays``).

A source knows its input and output sizes from its options alone (``model_io``), so the
engine builds the model as ``build_model(arch, **model_io(task_options), **model_options)``
without reading data. Every layer used here is one the encrypted engine converts
(:func:`federation.nn.convert.to_encrypted`).

Architectures (``model.arch``) and their ``model.options``:

- ``mlp``: ``depth`` x (Linear -> [BatchNorm1d] -> activation -> [Dropout]) -> Linear;
  options ``hidden`` (an int, or a list of widths, one per hidden layer), ``depth``
  (default 2; with a list of widths it must match the list), ``activation`` (relu, tanh,
  gelu, silu or sigmoid; default relu), ``batch_norm`` (default false; the linear layer
  before a batch norm has no bias), ``dropout`` (a probability in [0, 1), default 0).
- ``linear``: one Linear layer (logistic regression under cross-entropy, linear regression
  under MSE); no options.
- ``cnn`` (image inputs ``input_shape=(C, H, W)`` only): per entry of ``channels`` a 3x3
  Conv2d (padding 1) -> [BatchNorm2d] -> ReLU -> MaxPool2d(2) (pooling only while the map is
  at least 2x2), then AdaptiveAvgPool2d(1) -> Flatten -> [Dropout] -> Linear, so any image
  size works; options ``channels`` (an int or a list, default [8, 16]), ``batch_norm``
  (default true), ``dropout`` (default 0).

``mlp`` and ``linear`` also take image inputs (flattened first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": 64, "depth": 2, "activation": "relu", "batch_norm": False, "dropout": 0.0},
    "linear": {},
    "cnn": {"channels": [8, 16], "batch_norm": True, "dropout": 0.0},
}
"""Every architecture's options with their defaults."""

ARCHS = tuple(DEFAULTS)


def _int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model.options.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _widths(name: str, value: object) -> list[int]:
    """An int or a non-empty list of ints (layer widths)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ValueError(f"model.options.{name} must not be an empty list")
        return [_int(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [_int(name, value)]


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"model.options.{name} must be true or false, got {value!r}")
    return value


def _dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"model.options.dropout must be a probability in [0, 1), got {value!r}")
    return float(value)


def _inputs(
    arch: str, in_features: int | None, input_shape: Sequence[int] | None
) -> tuple[int, tuple[int, ...] | None]:
    """(flat input width, image shape or None) from exactly one of the two descriptions."""
    if (in_features is None) == (input_shape is None):
        raise ValueError(
            f"model {arch!r} needs exactly one of in_features (flat inputs) or input_shape "
            f"(images), got in_features={in_features!r}, input_shape={input_shape!r}"
        )
    if in_features is not None:
        return _int("in_features", in_features), None
    if isinstance(input_shape, str) or not isinstance(input_shape, Sequence) or not input_shape:
        raise ValueError(f"input_shape must be a list of sizes, got {input_shape!r}")
    shape = tuple(_int(f"input_shape[{i}]", s) for i, s in enumerate(input_shape))
    if len(shape) == 1:
        return shape[0], None
    return math.prod(shape), shape


def build_model(
    arch: str,
    *,
    num_outputs: int,
    in_features: int | None = None,
    input_shape: Sequence[int] | None = None,
    **options: Any,
) -> nn.Sequential:
    """The generic model ``arch`` for inputs of ``in_features`` (flat) or ``input_shape``
    (``(C, H, W)`` images) and ``num_outputs`` outputs (logits, or regression outputs).

    Unknown architectures and option values are refused with ``ValueError``, unknown option
    names with ``TypeError`` naming them (as for a function's unknown keyword).
    """
    if arch not in DEFAULTS:
        choices = ", ".join(repr(name) for name in ARCHS)
        raise ValueError(f"unknown model.arch {arch!r} for this data source; choose {choices}")
    allowed = DEFAULTS[arch]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise TypeError(f"unknown model.options for {arch!r}: {', '.join(unknown)} ({takes})")
    settings = {**allowed, **options}
    outputs = _int("num_outputs", num_outputs)
    width, image = _inputs(arch, in_features, input_shape)
    if arch == "cnn":
        if image is None or len(image) != 3:
            raise ValueError(
                f"model 'cnn' needs image inputs, input_shape (C, H, W); this data has "
                f"{'flat inputs of ' + str(width) if image is None else 'shape ' + str(image)}"
                " (use 'mlp' or 'linear')"
            )
        return _cnn(image, outputs, settings)
    front: list[nn.Module] = [nn.Flatten()] if image is not None else []
    if arch == "linear":
        return nn.Sequential(*front, nn.Linear(width, outputs))
    return nn.Sequential(*front, *_mlp_body(width, outputs, settings, "depth" in options))


def _mlp_body(
    width: int, outputs: int, settings: dict[str, Any], depth_given: bool
) -> list[nn.Module]:
    hidden = settings["hidden"]
    widths = _widths("hidden", hidden)
    depth = _int("depth", settings["depth"])
    if isinstance(hidden, str) or not isinstance(hidden, Sequence):
        widths = widths * depth
    elif depth_given and len(widths) != depth:
        raise ValueError(
            f"model.options.depth is {depth} but hidden lists {len(widths)} widths {widths}; "
            "give one of them"
        )
    activation = settings["activation"]
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"model.options.activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}"
        )
    batch_norm = _bool("batch_norm", settings["batch_norm"])
    dropout = _dropout(settings["dropout"])
    layers: list[nn.Module] = []
    for w in widths:
        layers.append(nn.Linear(width, w, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = w
    layers.append(nn.Linear(width, outputs))
    return layers


def _cnn(shape: tuple[int, ...], outputs: int, settings: dict[str, Any]) -> nn.Sequential:
    channels = _widths("channels", settings["channels"])
    batch_norm = _bool("batch_norm", settings["batch_norm"])
    dropout = _dropout(settings["dropout"])
    c, h, w = shape
    layers: list[nn.Module] = []
    for out in channels:
        layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c, outputs))
    return nn.Sequential(*layers)
