"""Any traceable ``nn.Module`` as an encrypted graph: torch.fx trace, then interpret.

The user's module is traced with ``torch.fx`` (torch layers and our twins are leaves). The
encrypted graph module holds each called layer's twin under the same dotted path, so its
``state_dict`` keys are the user's, and runs the traced graph on :class:`EncryptedTensor`
values: layers through their twins, functions and tensor methods through the tables below
(residual additions, concatenation, reshapes, means, functional activations, ...).
:func:`graph_problems` lists everything in a graph the algebra cannot run, all at once.
"""

from __future__ import annotations

import builtins
import copy
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from federation.more.tensor import EncryptedTensor
from federation.nn.layers import ACTIVATIONS, TWINS, layer_problems, meta_copy

Handler = Callable[..., Any]


class _Tracer(fx.Tracer):
    """torch's tracer, with every layer that has a twin (e.g. ``Square``) kept as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in TWINS or super().is_leaf_module(m, module_qualified_name)


class TraceFailure(Exception):
    """torch.fx could not trace the module's forward (the reason says why)."""


def trace(module: nn.Module) -> fx.Graph:
    """The module's forward as an fx graph; raises :class:`TraceFailure` if untraceable."""
    try:
        return _Tracer().trace(module)
    except Exception as exc:  # fx raises TraceError, NotImplementedError, TypeError, ...
        raise TraceFailure(f"{type(exc).__name__}: {exc}") from exc


def _unary(method: str, **fixed: Any) -> Handler:
    """A functional activation ``f(x, ..., inplace=False)`` -> ``x.method(**fixed)``."""

    def handler(x: EncryptedTensor, *args: Any, inplace: bool = False, **kwargs: Any) -> Any:
        return getattr(x, method)(*args, **kwargs, **fixed)

    return handler


def _activation(layer: nn.Module) -> Handler:
    """A functional form that runs the twin of ``layer`` (hyper-parameters from arguments)."""
    fn = ACTIVATIONS[type(layer)]
    return lambda x, inplace=False: fn(layer, x)


def _add(a: Any, b: Any, *, alpha: float = 1) -> Any:
    return a + b * alpha if alpha != 1 else a + b


def _sub(a: Any, b: Any, *, alpha: float = 1) -> Any:
    return a - b * alpha if alpha != 1 else a - b


def _cat(tensors: Sequence[EncryptedTensor], dim: int = 0) -> EncryptedTensor:
    return EncryptedTensor.cat(list(tensors), dim)


def _stack(tensors: Sequence[EncryptedTensor], dim: int = 0) -> EncryptedTensor:
    d = dim if dim >= 0 else dim + tensors[0].ndim + 1
    return EncryptedTensor.cat([t.unsqueeze(d) for t in tensors], d)


def _reshape(x: EncryptedTensor, *shape: Any) -> EncryptedTensor:
    return x.reshape(*shape)


def _max_pool2d(
    x: EncryptedTensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> EncryptedTensor:
    return x.max_pool2d(kernel_size, stride, padding, dilation, ceil_mode)


def _avg_pool2d(
    x: EncryptedTensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> EncryptedTensor:
    return x.avg_pool2d(kernel_size, stride, padding)


def _adaptive_max_pool2d(
    x: EncryptedTensor, output_size: Any, return_indices: bool = False
) -> EncryptedTensor:
    return x.adaptive_max_pool2d(output_size)


FUNCTIONS: dict[Callable[..., Any], Handler] = {
    operator.add: operator.add,
    operator.iadd: operator.add,
    operator.sub: operator.sub,
    operator.isub: operator.sub,
    operator.mul: operator.mul,
    operator.imul: operator.mul,
    operator.truediv: operator.truediv,
    operator.neg: operator.neg,
    operator.matmul: operator.matmul,
    operator.getitem: operator.getitem,
    builtins.getattr: builtins.getattr,
    torch.add: _add,
    torch.sub: _sub,
    torch.mul: operator.mul,
    torch.matmul: operator.matmul,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.concatenate: _cat,
    torch.stack: _stack,
    torch.flatten: lambda x, start_dim=0, end_dim=-1: x.flatten(start_dim, end_dim),
    torch.reshape: _reshape,
    torch.permute: lambda x, dims: x.permute(*dims),
    torch.transpose: lambda x, dim0, dim1: x.transpose(dim0, dim1),
    torch.unsqueeze: lambda x, dim: x.unsqueeze(dim),
    torch.squeeze: lambda x, dim=None: x.squeeze(dim),
    torch.mean: lambda x, dim=None, keepdim=False: x.mean(dim, keepdim),
    torch.sum: lambda x, dim=None, keepdim=False: x.sum(dim, keepdim),
    torch.clamp: lambda x, min=None, max=None: x.clamp(min, max),
    torch.relu: _unary("relu"),
    torch.sigmoid: _unary("sigmoid"),
    torch.tanh: _unary("tanh"),
    torch.exp: _unary("exp"),
    torch.abs: _unary("abs"),
    torch.square: _unary("square"),
    F.relu: _unary("relu"),
    F.relu6: _unary("hardtanh", min_val=0.0, max_val=6.0),
    F.leaky_relu: _unary("leaky_relu"),
    F.elu: _unary("elu"),
    F.gelu: _unary("gelu"),
    F.silu: _unary("silu"),
    F.hardtanh: _unary("hardtanh"),
    F.softplus: _unary("softplus"),
    F.sigmoid: _unary("sigmoid"),
    F.tanh: _unary("tanh"),
    F.selu: _activation(nn.SELU()),
    F.mish: _activation(nn.Mish()),
    F.hardswish: _activation(nn.Hardswish()),
    F.hardsigmoid: _activation(nn.Hardsigmoid()),
    F.logsigmoid: _activation(nn.LogSigmoid()),
    F.softsign: _activation(nn.Softsign()),
    F.tanhshrink: _activation(nn.Tanhshrink()),
    F.celu: lambda x, alpha=1.0, inplace=False: ACTIVATIONS[nn.CELU](nn.CELU(alpha), x),
    F.max_pool2d: _max_pool2d,
    F.avg_pool2d: _avg_pool2d,
    F.adaptive_avg_pool2d: lambda x, output_size: x.adaptive_avg_pool2d(output_size),
    F.adaptive_max_pool2d: _adaptive_max_pool2d,
    F.pad: lambda x, pad, mode="constant", value=None: x.pad(pad, mode, value or 0.0),
}
"""Traced function -> its implementation on encrypted (and plain) values."""

_FUNCTION_ALTERNATIVES: dict[Callable[..., Any], str] = {
    F.dropout: "an nn.Dropout layer (its train/eval mode is honoured)",
    F.dropout2d: "an nn.Dropout2d layer (its train/eval mode is honoured)",
    F.softmax: "no output softmax: the cross-entropy loss applies it",
    F.log_softmax: "no output softmax: the cross-entropy loss applies it",
    F.linear: "an nn.Linear layer (parameters must live in a layer)",
    F.conv2d: "an nn.Conv2d layer (parameters must live in a layer)",
    F.batch_norm: "an nn.BatchNorm2d layer",
    F.layer_norm: "an nn.LayerNorm layer",
    torch.where: "an element-wise activation (ReLU, clamp, ...): the algebra cannot branch",
    torch.max: "nn.MaxPool2d or nn.AdaptiveMaxPool2d (channel-wise maxima)",
    torch.argmax: "a decision taken by a site with the key, after decryption",
}

METHODS: dict[str, Handler] = {
    "relu": _unary("relu"),
    "sigmoid": _unary("sigmoid"),
    "tanh": _unary("tanh"),
    "exp": _unary("exp"),
    "abs": _unary("abs"),
    "square": _unary("square"),
    "clamp": lambda x, min=None, max=None: x.clamp(min, max),
    "add": _add,
    "sub": _sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "matmul": operator.matmul,
    "view": _reshape,
    "reshape": _reshape,
    "flatten": lambda x, start_dim=0, end_dim=-1: x.flatten(start_dim, end_dim),
    "permute": lambda x, *dims: x.permute(*(dims[0] if len(dims) == 1 else dims)),
    "transpose": lambda x, dim0, dim1: x.transpose(dim0, dim1),
    "unsqueeze": lambda x, dim: x.unsqueeze(dim),
    "squeeze": lambda x, dim=None: x.squeeze(dim),
    "mean": lambda x, dim=None, keepdim=False: x.mean(dim, keepdim),
    "sum": lambda x, dim=None, keepdim=False: x.sum(dim, keepdim),
    "size": lambda x, dim=None: x.size(dim),
    "dim": lambda x: x.ndim,
    "contiguous": lambda x: x,
}
"""Traced tensor method -> its implementation (in-place variants ``name_`` map to ``name``)."""

_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


def _inplace_method(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def _method(name: str) -> Handler | None:
    return METHODS.get(name[:-1] if _inplace_method(name) else name)


def _qualname(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "torch"
    return f"{module}.{getattr(fn, '__name__', repr(fn))}"


def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    if node.kwargs.get("inplace") is True or getattr(module, "inplace", False) is True:
        return True
    return node.op == "call_method" and _inplace_method(node.target)


def _used_after(node: fx.Node, value: Any) -> bool:
    """Whether the graph reads ``value`` (a node) again after ``node`` overwrote it in place."""
    if not isinstance(value, fx.Node):
        return False
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[u] > order[node] for u in value.users if u is not node)


def graph_problems(module: nn.Module, graph: fx.Graph) -> list[str]:
    """Every node of ``graph`` (traced from ``module``) the algebra cannot run, with why."""
    problems: list[str] = []
    used: set[str] = set()
    attrs = {n.target for n in graph.nodes if n.op == "get_attr"}
    for node in graph.nodes:
        sub = module.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "call_module":
            used.add(node.target)
            problems += layer_problems(node.target, sub)
        elif node.op == "call_function" and node.target not in FUNCTIONS:
            alt = _FUNCTION_ALTERNATIVES.get(node.target)
            hint = f"use {alt} instead" if alt else "it has no encrypted implementation"
            problems.append(f"function {_qualname(node.target)} at node '{node.name}': {hint}")
        elif node.op == "call_method" and _method(node.target) is None:
            problems.append(
                f"tensor method .{node.target}() at node '{node.name}' has no encrypted "
                f"implementation; supported methods: {', '.join(METHODS)}"
            )
        elif node.op == "get_attr":
            problems.append(
                f"attribute '{node.target}' is a tensor used outside a layer; move it into a "
                "supported layer (e.g. nn.Linear) so it is encrypted and trained with the model"
            )
        if node.op == "call_function" and node.target is builtins.getattr:
            if node.args[1] not in _ATTRIBUTES:
                problems.append(f"attribute .{node.args[1]} at node '{node.name}' is not supported")
        if _is_inplace(node, sub) and node.args and _used_after(node, node.args[0]):
            problems.append(
                f"in-place operation at node '{node.name}' overwrites a value used later; "
                "write it out of place (y = f(x))"
            )
    for path, child in module.named_modules():
        if path in used or any(path.startswith(u + ".") for u in used):
            continue
        own = [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]
        for name, _ in own:
            full = f"{path}.{name}" if path else name
            if full not in attrs:
                problems.append(
                    f"'{full}' is never used by forward through a layer; remove it (the twin "
                    "keeps only what forward uses, so the state_dict keys would differ)"
                )
    return problems


def _install(root: nn.Module, path: str, child: nn.Module) -> None:
    """Put ``child`` at dotted ``path`` under ``root``, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, child)


class EncryptedGraphModule(nn.Module):
    """The encrypted twin of a traced module: twins at the user's paths, the traced graph.

    ``to_plain`` returns a weightless instance of the user's own class for the decrypted
    ``state_dict``.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, dtype: torch.dtype) -> None:
        super().__init__()
        targets = {n.target for n in graph.nodes if n.op == "call_module"}
        for path, child in module.named_modules():
            if path in targets:
                _install(self, path, TWINS[type(child)](child, dtype))
        self.graph = graph
        self.__dict__["template"] = meta_copy(module)  # not a submodule: no state_dict entry

    def forward(self, *inputs: Any) -> Any:
        env: dict[fx.Node, Any] = {}
        given = iter(inputs)
        result = None

        def load(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(given, node.args[0] if node.args else None)
            elif node.op == "output":
                result = load(node.args[0])
            else:
                args, kwargs = load(node.args), load(node.kwargs)
                if node.op == "call_module":
                    env[node] = self.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_function":
                    env[node] = FUNCTIONS[node.target](*args, **kwargs)
                else:
                    env[node] = _method(node.target)(*args, **kwargs)
        return result

    def to_plain(self) -> nn.Module:
        """A fresh instance of the user's module (weights loaded by the caller)."""
        return copy.deepcopy(self.template).to_empty(device="cpu")
