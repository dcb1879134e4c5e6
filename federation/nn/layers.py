"""Encrypted twins of torch layers: same hyper-parameters, same ``state_dict`` keys.

Each parameter of shape ``[...]`` is stored as its ciphertext entries ``[..., 2, 2]`` under
the same name, so a twin's ``state_dict`` is the torch model's with a trailing ``2, 2``.
Layers only call :class:`EncryptedTensor` operations; none of them sees a key.
"""

from __future__ import annotations

import torch
from torch import nn

from federation.more.tensor import EncryptedTensor, encode_plain


class Square(nn.Module):
    """``x * x``: the polynomial activation (plain torch), encrypted as ``C @ C``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class EncryptedLayer(nn.Module):
    """Base of the twins. ``key_fingerprint`` tags the parameters' key (None: key-free)."""

    plain_type: type[nn.Module]

    def __init__(self) -> None:
        super().__init__()
        self.key_fingerprint: str | None = None

    def blocks(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """The ``[..., 2, 2]`` ciphertext view of a stored parameter (or of its gradient)."""
        return stored

    def param(self, name: str) -> EncryptedTensor:
        return EncryptedTensor(self.blocks(name, getattr(self, name)), self.key_fingerprint)

    def maybe_param(self, name: str) -> EncryptedTensor | None:
        return None if getattr(self, name) is None else self.param(name)

    def to_plain(self) -> nn.Module:
        """A fresh torch layer with the same hyper-parameters (weights loaded by the caller)."""
        return self.plain_type()

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

    plain_type = nn.Linear

    def __init__(self, plain: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = plain.in_features, plain.out_features
        entries = encode_plain(plain.weight.detach().to(dtype)).entries
        self.weight = nn.Parameter(entries.permute(1, 2, 0, 3).contiguous())
        self._register_encoded("bias", plain.bias, dtype)
        self.register_state_dict_post_hook(_weight_to_blocks)
        self.register_load_state_dict_pre_hook(_weight_from_blocks)

    def blocks(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        return stored.permute(2, 0, 1, 3) if name == "weight" else stored

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.linear(self.param("weight"), self.maybe_param("bias"))

    def to_plain(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)


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


class EncryptedConv2d(EncryptedLayer):
    plain_type = nn.Conv2d

    def __init__(self, plain: nn.Conv2d, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_channels, self.out_channels = plain.in_channels, plain.out_channels
        self.kernel_size = plain.kernel_size
        self.stride = plain.stride
        self.padding = plain.padding
        self._register_encoded("weight", plain.weight, dtype)
        self._register_encoded("bias", plain.bias, dtype)

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.conv2d(self.param("weight"), self.maybe_param("bias"), self.stride, self.padding)

    def to_plain(self) -> nn.Module:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            bias=self.bias is not None,
        )


class EncryptedAvgPool2d(EncryptedLayer):
    plain_type = nn.AvgPool2d

    def __init__(self, plain: nn.AvgPool2d, dtype: torch.dtype) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = plain.kernel_size, plain.stride, plain.padding

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.avg_pool2d(self.kernel_size, self.stride, self.padding)

    def to_plain(self) -> nn.Module:
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding)


class EncryptedFlatten(EncryptedLayer):
    plain_type = nn.Flatten

    def __init__(self, plain: nn.Flatten, dtype: torch.dtype) -> None:
        super().__init__()
        self.start_dim, self.end_dim = plain.start_dim, plain.end_dim

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.flatten(self.start_dim, self.end_dim)

    def to_plain(self) -> nn.Module:
        return nn.Flatten(self.start_dim, self.end_dim)


class EncryptedSigmoid(EncryptedLayer):
    plain_type = nn.Sigmoid

    def __init__(self, plain: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.sigmoid()


class EncryptedTanh(EncryptedSigmoid):
    plain_type = nn.Tanh

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.tanh()


class EncryptedSoftplus(EncryptedSigmoid):
    """``log(1 + exp(x))``. torch's Softplus switches to ``x`` above ``threshold`` (20), a
    comparison the algebra cannot make; the two differ by at most ``exp(-20) = 2e-9``."""

    plain_type = nn.Softplus

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.softplus()


class EncryptedSquare(EncryptedSigmoid):
    plain_type = Square

    def forward(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.square()
