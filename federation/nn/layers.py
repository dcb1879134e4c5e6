"""Encrypted twins of torch layers: same hyper-parameters, same ``state_dict`` keys.

Each parameter of shape ``[...]`` is stored as its ciphertext entries ``[..., 2, 2]`` under
the same name, so a twin's ``state_dict`` is the torch model's with a trailing ``2, 2``
(plain buffers such as ``num_batches_tracked`` keep their shape). Layers only call
:class:`EncryptedTensor` operations; none of them sees a key. Comparisons (ReLU, max-pooling)
are channel-wise element-wise functions of the algebra, so every twin computes exactly its
torch layer on the data channel (design note, section 2).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from federation.more.tensor import EncryptedTensor, encode_plain


class Square(nn.Module):
    """``x * x``: the polynomial activation (plain torch), encrypted as ``C @ C``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose tensors live on the meta device: the hyper-parameters, no weights."""
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


class EncryptedLayer(nn.Module):
    """Base of the twins. ``key_fingerprint`` tags the parameters' key (None: key-free).

    The twin keeps a weightless copy of its torch layer, so :meth:`to_plain` rebuilds exactly
    the user's layer (every hyper-parameter) for a site to load decrypted weights into.
    """

    #: buffers that stay plaintext (counters); every other parameter and buffer is encrypted.
    plain_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, plain: nn.Module) -> None:
        super().__init__()
        self.key_fingerprint: str | None = None
        self.__dict__["template"] = meta_copy(plain)  # not a submodule: no state_dict entry

    def blocks(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """The ``[..., 2, 2]`` ciphertext view of a stored parameter (or of its gradient)."""
        return stored

    def param(self, name: str) -> EncryptedTensor:
        return EncryptedTensor(self.blocks(name, getattr(self, name)), self.key_fingerprint)

    def maybe_param(self, name: str) -> EncryptedTensor | None:
        return None if getattr(self, name) is None else self.param(name)

    def to_plain(self) -> nn.Module:
        """A fresh torch layer with the same hyper-parameters (weights loaded by the caller)."""
        return copy.deepcopy(self.template).to_empty(device="cpu")

    def _register_encoded(self, name: str, value: torch.Tensor | None, dtype: torch.dtype) -> None:
        if value is None:
            self.register_parameter(name, None)
        else:
            entries = encode_plain(value.detach().to(dtype)).entries
            self.register_parameter(name, nn.Parameter(entries.contiguous()))


class EncryptedLinear(EncryptedLayer):
    """The weight ``[out, in, 2, 2]`` is stored in the layout of the layer's GEMM,
    ``[in, 2, out, 2]``, so neither the forward nor the backward pass copies it (a copy of a
    2x2-block permutation costs more than the GEMM itself); ``state_dict`` still shows
    ``[out, in, 2, 2]``."""

    def __init__(self, plain: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__(plain)
        entries = encode_plain(plain.weight.detach().to(dtype)).entries
        self.weight = nn.Parameter(entries.permute(1, 2, 0, 3).contiguous())
        self._register_encoded("bias", plain.bias, dtype)
        self.register_state_dict_post_hook(_weight_to_blocks)
        self.register_load_state_dict_pre_hook(_weight_from_blocks)

    def blocks(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        return stored.permute(2, 0, 1, 3) if name == "weight" else stored

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.linear(self.param("weight"), self.maybe_param("bias"))


def _weight_to_blocks(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: object
) -> None:
    key = prefix + "weight"
    state[key] = state[key].permute(2, 0, 1, 3).contiguous()


def _weight_from_blocks(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    key = prefix + "weight"
    if key in state and state[key].ndim == 4:
        state[key] = state[key].permute(1, 2, 0, 3).contiguous()


# nn.Conv padding_mode -> F.pad mode
_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


class EncryptedConv(EncryptedLayer):
    """Conv1d / Conv2d with stride, dilation, groups and every padding mode.

    Zero padding that is the same on both sides goes to the convolution; any other padding
    (reflect, replicate, circular, or the asymmetric zeros of ``padding='same'``) is applied
    first with torch's own pad list, as ``nn.Conv2d`` does.
    """

    def __init__(self, plain: nn.Conv1d | nn.Conv2d, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self.stride, self.dilation, self.groups = plain.stride, plain.dilation, plain.groups
        pads = tuple(plain._reversed_padding_repeated_twice)
        symmetric = all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2))
        if plain.padding_mode == "zeros" and symmetric:
            self.pad: tuple[int, ...] | None = None
            self.padding: tuple[int, ...] = tuple(reversed(pads[::2]))
        else:
            self.pad, self.padding = pads, (0,) * len(plain.kernel_size)
        self.pad_mode = _PAD_MODES[plain.padding_mode]
        self.two_d = isinstance(plain, nn.Conv2d)
        self._register_encoded("weight", plain.weight, dtype)
        self._register_encoded("bias", plain.bias, dtype)

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        if self.pad is not None:
            x = x.pad(self.pad, mode=self.pad_mode)
        conv = x.conv2d if self.two_d else x.conv1d
        return conv(
            self.param("weight"),
            self.maybe_param("bias"),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )


class EncryptedAvgPool2d(EncryptedLayer):
    def __init__(self, plain: nn.AvgPool2d, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self.kernel_size, self.stride, self.padding = plain.kernel_size, plain.stride, plain.padding

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.avg_pool2d(self.kernel_size, self.stride, self.padding)


class EncryptedMaxPool2d(EncryptedLayer):
    """Max-pooling by the channel-wise ``max(a, b) = b + relu(a - b)`` (design note, 2)."""

    def __init__(self, plain: nn.MaxPool2d, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self.kernel_size, self.stride, self.padding = plain.kernel_size, plain.stride, plain.padding
        self.dilation, self.ceil_mode = plain.dilation, plain.ceil_mode

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.max_pool2d(
            self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
        )


class EncryptedAdaptivePool2d(EncryptedLayer):
    """AdaptiveAvgPool2d and AdaptiveMaxPool2d."""

    def __init__(
        self, plain: nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d, dtype: torch.dtype
    ) -> None:
        super().__init__(plain)
        self.output_size = plain.output_size
        self.max = isinstance(plain, nn.AdaptiveMaxPool2d)

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        if self.max:
            return x.adaptive_max_pool2d(self.output_size)
        return x.adaptive_avg_pool2d(self.output_size)


class EncryptedFlatten(EncryptedLayer):
    def __init__(self, plain: nn.Flatten, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self.start_dim, self.end_dim = plain.start_dim, plain.end_dim

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.flatten(self.start_dim, self.end_dim)


class EncryptedIdentity(EncryptedLayer):
    def __init__(self, plain: nn.Module, dtype: torch.dtype) -> None:
        super().__init__(plain)

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x


Activation = Callable[[Any, EncryptedTensor], EncryptedTensor]


def _torch_derivative(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``f'`` exactly as torch's autograd computes it (its own backward formula)."""

    def df(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            u = t.detach().requires_grad_()
            (grad,) = torch.autograd.grad(f(u).sum(), u)
        return grad

    return df


def elementwise(f: Callable[[torch.Tensor], torch.Tensor]) -> Activation:
    """Torch's own element-wise ``f`` on each channel, with torch's own derivative.

    Some torch kernels differentiate with single-precision constants even in float64
    (CELU, Hardsigmoid); taking value and derivative from torch keeps the twin exact.
    """
    df = _torch_derivative(f)
    return lambda m, x: x.map(f, df)


# (torch layer, x) -> twin's output; the layer is the twin's weightless template.
ACTIVATIONS: dict[type[nn.Module], Activation] = {
    nn.ReLU: lambda m, x: x.relu(),
    nn.ReLU6: lambda m, x: x.hardtanh(0.0, 6.0),
    nn.LeakyReLU: lambda m, x: x.leaky_relu(m.negative_slope),
    nn.ELU: lambda m, x: x.elu(m.alpha),
    nn.CELU: lambda m, x: elementwise(functools.partial(F.celu, alpha=m.alpha))(m, x),
    nn.SELU: elementwise(F.selu),
    nn.GELU: lambda m, x: x.gelu(m.approximate),
    nn.SiLU: lambda m, x: x.silu(),
    nn.Mish: elementwise(F.mish),
    nn.Hardtanh: lambda m, x: x.hardtanh(m.min_val, m.max_val),
    nn.Hardswish: elementwise(F.hardswish),
    nn.Hardsigmoid: elementwise(F.hardsigmoid),
    nn.Softplus: lambda m, x: x.softplus(m.beta, m.threshold),
    nn.LogSigmoid: elementwise(F.logsigmoid),
    nn.Softsign: elementwise(F.softsign),
    nn.Tanhshrink: elementwise(F.tanhshrink),
    nn.Tanh: lambda m, x: x.tanh(),
    nn.Sigmoid: lambda m, x: x.sigmoid(),
    Square: lambda m, x: x.square(),
}


class EncryptedActivation(EncryptedLayer):
    """Any activation of :data:`ACTIVATIONS`: channel-wise exact (analytic or element-wise)."""

    def __init__(self, plain: nn.Module, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self._fn = ACTIVATIONS[type(plain)]

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return self._fn(self.template, x)


def _normalise(centred: EncryptedTensor, var: EncryptedTensor, eps: float) -> EncryptedTensor:
    """``(x - mean) / sqrt(var + eps)`` with the channel-wise ``rsqrt``."""
    return centred * (var + eps).rsqrt()


class EncryptedBatchNorm(EncryptedLayer):
    """BatchNorm1d / BatchNorm2d, train and eval, with encrypted running statistics.

    Training normalises by the biased batch variance and updates ``running_var`` with the
    unbiased ``n / (n - 1)`` estimate, ``momentum=None`` meaning the cumulative average, as
    torch does; ``num_batches_tracked`` stays a plain counter.
    """

    plain_buffers = ("num_batches_tracked",)

    def __init__(self, plain: nn.BatchNorm1d | nn.BatchNorm2d, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self.eps, self.momentum = plain.eps, plain.momentum
        self.track_running_stats = plain.track_running_stats
        self.input_dims = (4,) if isinstance(plain, nn.BatchNorm2d) else (2, 3)
        self._register_encoded("weight", plain.weight, dtype)
        self._register_encoded("bias", plain.bias, dtype)
        for name in ("running_mean", "running_var"):
            stat = getattr(plain, name)
            self.register_buffer(
                name, None if stat is None else encode_plain(stat.detach().to(dtype)).entries
            )
        count = plain.num_batches_tracked
        self.register_buffer("num_batches_tracked", None if count is None else count.clone())

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        if x.ndim not in self.input_dims:
            raise ValueError(f"expected {self.input_dims}-d input, got {tuple(x.shape)}")
        dims = (0, *range(2, x.ndim))
        shape = (-1,) + (1,) * (x.ndim - 2)
        if self.training or not self.track_running_stats:
            n = x.numel() // x.shape[1]
            if self.training and n < 2:
                raise ValueError("expected more than 1 value per channel when training")
            mean = x.mean(dims, keepdim=True)
            centred = x - mean
            var = (centred * centred).mean(dims, keepdim=True)
            if self.training and self.track_running_stats:
                self._update(mean.reshape(-1), var.reshape(-1), n)
        else:
            centred = x - self._buffer("running_mean").reshape(shape)
            var = self._buffer("running_var").reshape(shape)
        y = _normalise(centred, var, self.eps)
        if self.weight is not None:
            y = y * self.param("weight").reshape(shape) + self.param("bias").reshape(shape)
        return y

    def _buffer(self, name: str) -> EncryptedTensor:
        return EncryptedTensor(getattr(self, name), self.key_fingerprint)

    @torch.no_grad()
    def _update(self, mean: EncryptedTensor, var: EncryptedTensor, n: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self._buffer("running_mean").mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
        unbiased = var.detach() * (n / (n - 1))
        self._buffer("running_var").mul_(1.0 - factor).add_(unbiased, alpha=factor)


class EncryptedLayerNorm(EncryptedLayer):
    """LayerNorm over the trailing ``normalized_shape`` (biased variance, as torch)."""

    def __init__(self, plain: nn.LayerNorm, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self.eps, self.normalized_shape = plain.eps, tuple(plain.normalized_shape)
        self._register_encoded("weight", plain.weight, dtype)
        self._register_encoded("bias", plain.bias, dtype)

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        dims = tuple(range(x.ndim - len(self.normalized_shape), x.ndim))
        centred = x - x.mean(dims, keepdim=True)
        y = _normalise(centred, (centred * centred).mean(dims, keepdim=True), self.eps)
        if self.weight is not None:
            y = y * self.param("weight")
        if self.bias is not None:
            y = y + self.param("bias")
        return y


class EncryptedDropout(EncryptedLayer):
    """Dropout / Dropout1d / Dropout2d with a plaintext mask drawn exactly as torch draws it.

    torch's CPU dropout fills a tensor of the input's shape and dtype (feature dropout: one
    value per sample and channel) with ``bernoulli_(1 - p)`` from the global generator and
    divides it by ``1 - p``; this twin does the same, so a plaintext and an encrypted run
    seeded alike drop the same units. The mask is no secret: it does not depend on data.
    """

    def __init__(self, plain: nn.Dropout | nn.Dropout1d | nn.Dropout2d, dtype: torch.dtype) -> None:
        super().__init__(plain)
        self.p = plain.p
        self.feature = not isinstance(plain, nn.Dropout)
        self.unbatched_ndim = 2 if isinstance(plain, nn.Dropout1d) else None

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        if self.p == 1:
            return x * 0.0
        if not self.feature:
            shape = x.shape
        elif x.ndim == self.unbatched_ndim:  # Dropout1d on (C, L): one sample, whole rows
            shape = (x.shape[0], 1)
        else:
            shape = (*x.shape[:2], *(1,) * (x.ndim - 2))
        noise = torch.empty(shape, dtype=x.dtype, device=x.device)
        return x * noise.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


TWINS: dict[type[nn.Module], Callable[[Any, torch.dtype], EncryptedLayer]] = {
    nn.Linear: EncryptedLinear,
    nn.Conv1d: EncryptedConv,
    nn.Conv2d: EncryptedConv,
    nn.AvgPool2d: EncryptedAvgPool2d,
    nn.MaxPool2d: EncryptedMaxPool2d,
    nn.AdaptiveAvgPool2d: EncryptedAdaptivePool2d,
    nn.AdaptiveMaxPool2d: EncryptedAdaptivePool2d,
    nn.BatchNorm1d: EncryptedBatchNorm,
    nn.BatchNorm2d: EncryptedBatchNorm,
    nn.LayerNorm: EncryptedLayerNorm,
    nn.Dropout: EncryptedDropout,
    nn.Dropout1d: EncryptedDropout,
    nn.Dropout2d: EncryptedDropout,
    nn.Flatten: EncryptedFlatten,
    nn.Identity: EncryptedIdentity,
    **dict.fromkeys(ACTIVATIONS, EncryptedActivation),
}
"""torch layer type -> its encrypted twin's constructor ``twin(layer, dtype)``."""

SUPPORTED_LAYERS = tuple(t.__name__ for t in TWINS)

_NO_SOFTMAX = "no output softmax: the cross-entropy loss applies it"
ALTERNATIVES: dict[type[nn.Module], str] = {
    nn.Softmax: _NO_SOFTMAX,
    nn.LogSoftmax: _NO_SOFTMAX,
    nn.MaxPool1d: "nn.MaxPool2d on an unsqueezed input",
    nn.AvgPool1d: "nn.AvgPool2d on an unsqueezed input",
    nn.Conv3d: "nn.Conv2d",
    nn.MaxPool3d: "nn.MaxPool2d",
    nn.BatchNorm3d: "nn.BatchNorm2d",
    nn.GroupNorm: "nn.LayerNorm or nn.BatchNorm2d",
    nn.InstanceNorm2d: "nn.BatchNorm2d",
    nn.AlphaDropout: "nn.Dropout",
    nn.Embedding: "one-hot encoded (encrypted) inputs and an nn.Linear layer",
}


def layer_problems(path: str, module: nn.Module) -> list[str]:
    """Why ``module`` (at ``path``) cannot be encrypted, with the alternative; [] if it can."""
    name = type(module).__name__
    where = f" at '{path}'" if path else ""
    twin = TWINS.get(type(module))
    if twin is None:
        alt = ALTERNATIVES.get(type(module))
        if alt:
            return [f"{name}{where} has no encrypted twin; use {alt} instead"]
        return [
            f"{name}{where} has no encrypted twin; supported layers: {', '.join(SUPPORTED_LAYERS)}"
        ]
    problems = []
    if isinstance(module, nn.AvgPool2d) and (
        module.ceil_mode or not module.count_include_pad or module.divisor_override
    ):
        problems.append(f"{name}{where}: use ceil_mode=False, count_include_pad=True")
    if getattr(module, "return_indices", False):
        problems.append(
            f"{name}{where}: return_indices=True is not supported (indices are a decision "
            "on the data); use return_indices=False"
        )
    return problems
