"""The encrypted tensor: a tensor of MORE ciphertexts that owns its algebra.

A logical tensor of shape ``[...]`` is stored as real 2x2 matrices ``[..., 2, 2]``. All
ciphertexts under one key lie in one commutative algebra isomorphic to R x R, so sums,
matrix products, inverses and any element-wise function (by the eigenvalue-symmetric formula
of :mod:`federation.more.elementwise`: relu, tanh, max pooling, ...) act on the data and the
shadow channel independently. Nothing here holds or accepts a key: this type cannot decrypt.

Gradients: for an encrypted scalar loss ``L``, the gradient in the algebra is the transpose
(last two dims) of the gradient torch autograd returns for ``trace(L)``; :attr:`grad` and
:meth:`backward` apply that transpose, so callers only see algebra elements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from federation.more import elementwise as ew
from federation.more.elementwise import ElementFn, FnPair

Plain = float | int | torch.Tensor | np.ndarray


class KeyMismatchError(ValueError):
    """Ciphertexts under different keys were combined; the result would be garbage."""


def join_fingerprints(a: str | None, b: str | None) -> str | None:
    if a is not None and b is not None and a != b:
        raise KeyMismatchError(
            f"cannot combine ciphertexts under different keys (fingerprints {a} and {b})"
        )
    return a if a is not None else b


def _eye(like: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, dtype=like.dtype, device=like.device)


class _BroadcastProduct(torch.autograd.Function):
    """Batched 2x2 products where one operand broadcasts (a per-channel scale, say).

    Through ``torch.matmul`` autograd saves the broadcast operand expanded to the full batch
    size: 4 numbers per value for every scaling in a batch norm. Here both operands are saved
    as given and each gradient is summed back to its operand's shape."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.matmul(grad, b.mT).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = torch.matmul(a.mT, grad).sum_to_size(b.shape)
        return grad_a, grad_b


class _AvgPool2d(torch.autograd.Function):
    """``F.avg_pool2d`` of the entry planes. Its gradient needs only the input's shape, but
    torch's own rule saves the whole input (4 numbers per value here): this saves none."""

    @staticmethod
    def forward(
        ctx: Any,
        planes: torch.Tensor,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.shape, ctx.options = planes.shape, (kernel, stride, padding)
        return F.avg_pool2d(planes, kernel, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        kernel, stride, padding = ctx.options
        shaped = grad.new_empty(ctx.shape)  # only its shape is read
        grad_in = torch.ops.aten.avg_pool2d_backward(
            grad, shaped, kernel, stride, padding, False, True, None
        )
        return grad_in, None, None, None


class _AdaptiveAvgPool2d(torch.autograd.Function):
    """``F.adaptive_avg_pool2d`` of the entry planes, saving no input (as above)."""

    @staticmethod
    def forward(ctx: Any, planes: torch.Tensor, output_size: Any) -> torch.Tensor:
        ctx.shape = planes.shape
        return F.adaptive_avg_pool2d(planes, output_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        shaped = grad.new_empty(ctx.shape)  # only its shape is read
        return torch.ops.aten._adaptive_avg_pool2d_backward(grad.contiguous(), shaped), None


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched 2x2 products: the element-wise ciphertext product. Equal shapes go to
    ``torch.matmul`` (contiguous operands reshape to views, so autograd saves no copy)."""
    if a.shape == b.shape or not (a.requires_grad or b.requires_grad):
        return torch.matmul(a, b)
    return _BroadcastProduct.apply(a, b)


def _inv(c: torch.Tensor) -> torch.Tensor:
    """Batched 2x2 inverse by the adjugate (exact, differentiable, no LAPACK call)."""
    a, b = c[..., 0, 0], c[..., 0, 1]
    d_, e = c[..., 1, 0], c[..., 1, 1]
    det = a * e - b * d_
    adj = torch.stack((torch.stack((e, -b), -1), torch.stack((-d_, a), -1)), -2)
    return adj / det[..., None, None]


def _per_dim(value: Any, n: int) -> tuple[Any, ...]:
    """An int (or None) for every dim, or a sequence of one or ``n``, as torch's pooling."""
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    return values * n if len(values) == 1 else values


def _window_index(
    size: int, out: int, kernel: int, stride: int, padding: int, dilation: int, device: Any
) -> torch.Tensor:
    """``[out, kernel]`` positions of pooling windows along one dim; cells in the padding
    repeat the window's first valid cell."""
    pos = torch.arange(out)[:, None] * stride - padding + torch.arange(kernel)[None] * dilation
    valid = (pos >= 0) & (pos < size)
    if not bool(valid.any(1).all()):
        raise ValueError("max pooling: a window lies entirely in the padding")
    first = pos.gather(1, valid.to(torch.int8).argmax(1, keepdim=True))
    return torch.where(valid, pos, first).to(device)


def _adaptive_index(size: int, out: int, device: Any) -> torch.Tensor:
    """torch's adaptive windows ``[floor(i size / out), ceil((i + 1) size / out))`` along
    one dim, as ``[out, longest]`` positions, short windows filled up with their first cell."""
    i = torch.arange(out)
    start, end = i * size // out, ((i + 1) * size + out - 1) // out
    pos = start[:, None] + torch.arange(int((end - start).max()))[None]
    return torch.where(pos < end[:, None], pos, start[:, None]).to(device)


def _tree_max(cells: torch.Tensor, dim: int) -> torch.Tensor:
    """The channel-wise maximum of ciphertext entries along entries dim ``dim`` (kept, size 1).

    A pairwise tree of ``max(a, b) = a + relu(b - a)`` over neighbours, ``a`` the earlier one
    and ``relu'(0) = 0``: a tie's gradient goes to the first maximum along ``dim``.
    """
    relu = ew.relu()
    dim %= cells.ndim
    while cells.shape[dim] > 1:
        count = cells.shape[dim]
        first = cells[(slice(None),) * dim + (slice(0, count - 1, 2),)]
        second = cells[(slice(None),) * dim + (slice(1, count, 2),)]
        paired = first + ew.channelwise(second - first, *relu)
        if count % 2:
            paired = torch.cat((paired, cells.narrow(dim, count - 1, 1)), dim)
        cells = paired
    return cells


def encode_plain(value: Plain, *, dtype: torch.dtype | None = None) -> EncryptedTensor:
    """The key-free encoding ``w * I``: a ciphertext of ``w`` under every key.

    The aggregator uses it to initialise a global model without holding a key.
    """
    w = torch.as_tensor(value, dtype=dtype)
    if not w.is_floating_point():
        w = w.to(torch.get_default_dtype())
    return EncryptedTensor(w[..., None, None] * _eye(w), None)


class EncryptedTensor:
    """A tensor of MORE ciphertexts. Shape is the logical shape; entries are ``[..., 2, 2]``.

    It prints shape, dtype and key fingerprint only, and refuses ``bool()`` and comparisons:
    a ciphertext has no truth value and no order.
    """

    __slots__ = ("_entries", "_fingerprint")
    __array_priority__ = 1000.0  # numpy defers to our reflected operators

    def __init__(self, entries: torch.Tensor, fingerprint: str | None = None) -> None:
        if not isinstance(entries, torch.Tensor):
            raise TypeError(f"entries must be a torch.Tensor, got {type(entries).__name__}")
        if entries.ndim < 2 or tuple(entries.shape[-2:]) != (2, 2):
            raise ValueError(
                f"ciphertext entries must have shape [..., 2, 2], got {tuple(entries.shape)}"
            )
        if not entries.is_floating_point():
            raise TypeError(f"ciphertext entries must be floating point, got {entries.dtype}")
        self._entries = entries
        self._fingerprint = fingerprint

    # --- storage and metadata -------------------------------------------------------------
    @property
    def entries(self) -> torch.Tensor:
        """The raw 2x2 matrices, for storage and transport (they are the ciphertext)."""
        return self._entries

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the key (``None`` for key-free encodings)."""
        return self._fingerprint

    @property
    def shape(self) -> torch.Size:
        return self._entries.shape[:-2]

    @property
    def ndim(self) -> int:
        return self._entries.ndim - 2

    @property
    def dtype(self) -> torch.dtype:
        return self._entries.dtype

    @property
    def device(self) -> torch.device:
        return self._entries.device

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d encrypted tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        fp = "key-free" if self._fingerprint is None else f"key={self._fingerprint}"
        return f"EncryptedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, {fp})"

    __str__ = __repr__

    def _wrap(self, entries: torch.Tensor, fingerprint: str | None = None) -> EncryptedTensor:
        return EncryptedTensor(entries, fingerprint or self._fingerprint)

    def to(self, *args: Any, **kwargs: Any) -> EncryptedTensor:
        return self._wrap(self._entries.to(*args, **kwargs))

    def double(self) -> EncryptedTensor:
        return self.to(torch.float64)

    def float(self) -> EncryptedTensor:
        return self.to(torch.float32)

    def all_finite(self) -> bool:
        """Whether every entry is finite: a key-free health check, not a comparison of values."""
        return bool(torch.isfinite(self._entries).all())

    # --- no truth value, no order, no values ----------------------------------------------
    def __bool__(self) -> bool:
        raise TypeError("a ciphertext has no truth value")

    def _no_order(self, other: object) -> bool:
        raise TypeError("ciphertexts cannot be compared: a ciphertext has no order")

    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _no_order  # type: ignore[assignment]
    __hash__ = None  # type: ignore[assignment]

    def __float__(self) -> float:
        raise TypeError("a ciphertext has no plaintext value; only a site can decrypt it")

    __int__ = __index__ = __float__  # type: ignore[assignment]

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("use .entries to get the ciphertext matrices; values need decryption")

    # --- autograd -------------------------------------------------------------------------
    @property
    def requires_grad(self) -> bool:
        return self._entries.requires_grad

    def requires_grad_(self, flag: bool = True) -> EncryptedTensor:
        self._entries.requires_grad_(flag)
        return self

    def detach(self) -> EncryptedTensor:
        return self._wrap(self._entries.detach())

    @property
    def grad(self) -> EncryptedTensor | None:
        """The gradient in the algebra (transpose of autograd's entry gradient)."""
        g = self._entries.grad
        return None if g is None else self._wrap(g.mT)

    def backward(self, gradient: EncryptedTensor | None = None) -> None:
        """Back-propagate an algebra gradient ``dL/dself`` (or ``trace`` of a 0-d loss)."""
        if gradient is None:
            if self.ndim != 0:
                raise ValueError("backward() without a gradient needs a 0-d encrypted loss")
            self._entries.diagonal(dim1=-2, dim2=-1).sum().backward()
            return
        if gradient.shape != self.shape:
            raise ValueError(f"gradient shape {tuple(gradient.shape)} != {tuple(self.shape)}")
        join_fingerprints(self._fingerprint, gradient.fingerprint)
        self._entries.backward(gradient.entries.mT)

    # --- element-wise algebra -------------------------------------------------------------
    def _operand(self, other: EncryptedTensor | Plain) -> tuple[torch.Tensor, str | None, bool]:
        """(entries or plain tensor, joined fingerprint, is_encrypted)."""
        if isinstance(other, EncryptedTensor):
            return other.entries, join_fingerprints(self._fingerprint, other.fingerprint), True
        w = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        return w, self._fingerprint, False

    def _plain_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w[..., None, None] * _eye(self._entries)

    def __add__(self, other: EncryptedTensor | Plain) -> EncryptedTensor:
        o, fp, enc = self._operand(other)
        return EncryptedTensor(self._entries + (o if enc else self._plain_matrix(o)), fp)

    __radd__ = __add__

    def __sub__(self, other: EncryptedTensor | Plain) -> EncryptedTensor:
        o, fp, enc = self._operand(other)
        return EncryptedTensor(self._entries - (o if enc else self._plain_matrix(o)), fp)

    def __rsub__(self, other: Plain) -> EncryptedTensor:
        return (-self) + other

    def __neg__(self) -> EncryptedTensor:
        return self._wrap(-self._entries)

    def __mul__(self, other: EncryptedTensor | Plain) -> EncryptedTensor:
        o, fp, enc = self._operand(other)
        if enc:
            return EncryptedTensor(_mm(self._entries, o), fp)
        return EncryptedTensor(self._entries * o[..., None, None], fp)

    __rmul__ = __mul__

    def __truediv__(self, other: EncryptedTensor | Plain) -> EncryptedTensor:
        if isinstance(other, EncryptedTensor):
            return self * other.inverse()
        w = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        return self._wrap(self._entries / w[..., None, None])

    def __rtruediv__(self, other: Plain) -> EncryptedTensor:
        return self.inverse() * other

    def square(self) -> EncryptedTensor:
        return self * self

    def _identity(self) -> EncryptedTensor:
        """The ciphertext of ones with this tensor's shape (``I`` in every position)."""
        eye = _eye(self._entries).expand(*self.shape, 2, 2)
        return self._wrap(eye.clone())

    def __pow__(self, n: int) -> EncryptedTensor:
        if not isinstance(n, int) or n < 0:
            raise ValueError("only non-negative integer powers stay in the algebra")
        result, base = self._identity(), self
        while n:
            if n & 1:
                result = result * base
            n >>= 1
            if n:
                base = base * base
        return result

    def polynomial(self, coeffs: Sequence[float]) -> EncryptedTensor:
        """``sum_i coeffs[i] * self**i`` by Horner's rule (coefficients in increasing order)."""
        if not coeffs:
            raise ValueError("a polynomial needs at least one coefficient")
        result = self._identity() * float(coeffs[-1])
        for c in reversed(coeffs[:-1]):
            result = result * self + float(c)
        return result

    def inverse(self) -> EncryptedTensor:
        """Element-wise inverse (both channels must be non-zero)."""
        return self._wrap(_inv(self._entries))

    # --- element-wise functions, channel by channel (federation.more.elementwise) ----------
    def map(self, f: ElementFn, df: ElementFn) -> EncryptedTensor:
        """``f`` applied to the data and to the shadow channel of every element, key-free.

        ``f`` and its derivative ``df`` take and return plain tensors of one shape; ``df``
        gives the backward pass (at a kink, the one-sided value torch uses).
        """
        return self._wrap(ew.channelwise(self._entries, f, df))

    def _map(self, pair: FnPair) -> EncryptedTensor:
        return self.map(*pair)

    def exp(self) -> EncryptedTensor:
        return self._map(ew.exp())

    def sigmoid(self) -> EncryptedTensor:
        return self._map(ew.sigmoid())

    def tanh(self) -> EncryptedTensor:
        return self._map(ew.tanh())

    def softplus(self, beta: float = 1.0, threshold: float = 20.0) -> EncryptedTensor:
        """torch's softplus, including its switch to ``x`` where ``x * beta > threshold``."""
        return self._map(ew.softplus(beta, threshold))

    def relu(self) -> EncryptedTensor:
        return self._map(ew.relu())

    def leaky_relu(self, negative_slope: float = 0.01) -> EncryptedTensor:
        return self._map(ew.leaky_relu(negative_slope))

    def elu(self, alpha: float = 1.0) -> EncryptedTensor:
        return self._map(ew.elu(alpha))

    def gelu(self, approximate: str = "none") -> EncryptedTensor:
        return self._map(ew.gelu(approximate))

    def silu(self) -> EncryptedTensor:
        return self._map(ew.silu())

    def hardtanh(self, min_val: float = -1.0, max_val: float = 1.0) -> EncryptedTensor:
        return self._map(ew.hardtanh(min_val, max_val))

    def clamp(self, min: float | None = None, max: float | None = None) -> EncryptedTensor:
        return self._map(ew.clamp(min, max))

    def abs(self) -> EncryptedTensor:
        return self._map(ew.absolute())

    def sqrt(self) -> EncryptedTensor:
        """Channels that round-off puts just below 0 give 0 rather than NaN."""
        return self._map(ew.sqrt())

    def rsqrt(self) -> EncryptedTensor:
        return self._map(ew.rsqrt())

    def log(self) -> EncryptedTensor:
        return self._map(ew.log())

    def maximum(self, other: EncryptedTensor | Plain) -> EncryptedTensor:
        """``other + relu(self - other)``: the difference is a ciphertext under the same key,
        so the comparison is channel-wise. Ties split the gradient evenly, as torch's."""
        return (self - other)._map(ew.relu_tie_half()) + other

    def amax(self, dim: int = -1, keepdim: bool = False) -> EncryptedTensor:
        """The channel-wise maximum along ``dim`` (see :func:`_tree_max`); a tie's gradient
        goes to the first maximum, as ``torch.max(dim)`` sends it (``torch.amax`` splits it)."""
        d = self._dim(dim)
        out = _tree_max(self._entries, d)
        return self._wrap(out if keepdim else out.squeeze(d))

    def softmax(self, dim: int = -1) -> EncryptedTensor:
        """Softmax along ``dim`` after subtracting the channel-wise maximum, as torch does.

        Every ``exp`` is then at most 1 in each channel and the sum at least 1: ``exp`` of raw
        logits would be ``e^|r|`` large in a channel with large logits and its round-off would
        swamp the other channel. (Measured in float32 against a scaling-and-squaring softmax:
        8x smaller error.)
        """
        p = (self - self.amax(dim, keepdim=True)).exp()
        return p * p.sum(dim=dim, keepdim=True).inverse()

    # --- reductions and shape ---------------------------------------------------------------
    def _dim(self, dim: int) -> int:
        if not -self.ndim <= dim < max(self.ndim, 1):
            raise IndexError(f"dim {dim} out of range for {self.ndim}-d encrypted tensor")
        return dim - 2 if dim < 0 else dim

    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> EncryptedTensor:
        if dim is None:
            return self._wrap(self._entries.reshape(-1, 2, 2).sum(0))
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        return self._wrap(self._entries.sum(tuple(self._dim(d) for d in dims), keepdim=keepdim))

    def mean(
        self, dim: int | Sequence[int] | None = None, keepdim: bool = False
    ) -> EncryptedTensor:
        if dim is None:
            count = self.numel()
        else:
            dims = (dim,) if isinstance(dim, int) else tuple(dim)
            count = math.prod(self.shape[d] for d in dims)
        return self.sum(dim, keepdim) / float(count)

    def reshape(self, *shape: int | Sequence[int]) -> EncryptedTensor:
        dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return self._wrap(self._entries.reshape(*dims, 2, 2))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> EncryptedTensor:
        if self.ndim == 0:
            return self.reshape(1)
        start = start_dim % self.ndim
        end = end_dim % self.ndim
        return self._wrap(self._entries.flatten(start, end))

    view = reshape

    def squeeze(self, dim: int | Sequence[int] | None = None) -> EncryptedTensor:
        if dim is None:
            lead = [n for n in self.shape if n != 1]
            return self.reshape(lead)
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        return self._wrap(self._entries.squeeze(tuple(self._dim(d) for d in dims)))

    def expand(self, *sizes: int | Sequence[int]) -> EncryptedTensor:
        """Broadcast to ``sizes`` (``-1`` keeps a dim), as torch's ``expand``: no copy."""
        dims = tuple(sizes[0]) if len(sizes) == 1 and not isinstance(sizes[0], int) else sizes
        return self._wrap(self._entries.expand(*dims, 2, 2))

    def unsqueeze(self, dim: int) -> EncryptedTensor:
        return self._wrap(self._entries.unsqueeze(dim if dim >= 0 else dim - 2))

    def permute(self, *dims: int) -> EncryptedTensor:
        order = [d % self.ndim for d in dims]
        return self._wrap(self._entries.permute(*order, self.ndim, self.ndim + 1))

    def transpose(self, dim0: int, dim1: int) -> EncryptedTensor:
        return self._wrap(self._entries.transpose(self._dim(dim0), self._dim(dim1)))

    def __getitem__(self, index: Any) -> EncryptedTensor:
        if not isinstance(index, tuple):
            index = (index,)
        if any(i is Ellipsis for i in index):
            raise IndexError("Ellipsis indexing is not supported on encrypted tensors")
        return self._wrap(self._entries[index])

    @staticmethod
    def cat(tensors: Sequence[EncryptedTensor], dim: int = 0) -> EncryptedTensor:
        fp = None
        for t in tensors:
            fp = join_fingerprints(fp, t.fingerprint)
        d = dim if dim >= 0 else dim - 2
        return EncryptedTensor(torch.cat([t.entries for t in tensors], d), fp)

    # --- contractions -----------------------------------------------------------------------
    def __matmul__(self, other: EncryptedTensor | Plain) -> EncryptedTensor:
        """Matrix product over the logical last two dims (ciphertext or plaintext operand)."""
        o, fp, enc = self._operand(other)
        if enc:
            return EncryptedTensor(torch.einsum("...nkab,...kmbc->...nmac", self._entries, o), fp)
        return EncryptedTensor(torch.einsum("...nkab,...km->...nmab", self._entries, o), fp)

    def __rmatmul__(self, other: Plain) -> EncryptedTensor:
        w = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        return self._wrap(torch.einsum("...nk,...kmab->...nmab", w, self._entries))

    def linear(
        self, weight: EncryptedTensor, bias: EncryptedTensor | None = None
    ) -> EncryptedTensor:
        """``self @ weight^T + bias`` for weight ``[out, in]`` as one real GEMM.

        ``Y[b,o] = sum_i X[b,i] W[o,i]`` with 2x2 products is a ``[2B, 2I] x [2I, 2O]`` matrix
        product after folding the matrix rows of X into the batch and the columns of W into
        the outputs.
        """
        fp = join_fingerprints(self._fingerprint, weight.fingerprint)
        x, w = self._entries, weight.entries
        lead, n_in = x.shape[:-3], x.shape[-3]
        n_out = w.shape[0]
        if w.shape[1] != n_in:
            raise ValueError(f"linear: input has {n_in} features, weight expects {w.shape[1]}")
        x2 = x.reshape(-1, n_in, 2, 2).transpose(1, 2).reshape(-1, 2 * n_in)
        w2 = w.permute(1, 2, 0, 3).reshape(2 * n_in, 2 * n_out)
        y = (x2 @ w2).reshape(-1, 2, n_out, 2).transpose(1, 2).reshape(*lead, n_out, 2, 2)
        if bias is not None:
            fp = join_fingerprints(fp, bias.fingerprint)
            y = y + bias.entries
        return EncryptedTensor(y, fp)

    def _conv(
        self, weight: EncryptedTensor, bias: EncryptedTensor | None, n: int, **options: Any
    ) -> EncryptedTensor:
        """``n``-d convolution of ``[B, C, *spatial]`` by ``[O, C / groups, *kernel]`` as one
        real convolution.

        The matrix rows of the input fold into the batch (2B), its columns and the weight's
        rows into the input channels (2C, channel-major, so groups stay contiguous), the
        weight's columns into the outputs (2O).
        """
        name = f"conv{n}d"
        self._spatial(n, name)
        if self.ndim == n + 1:
            return self.unsqueeze(0)._conv(weight, bias, n, **options)[0]
        fp = join_fingerprints(self._fingerprint, weight.fingerprint)
        x, w = self._entries, weight.entries
        if w.ndim != n + 4:
            raise ValueError(f"{name} expects a [O, C, *kernel] weight, got {weight.shape}")
        b, c, spatial = x.shape[0], x.shape[1], x.shape[2 : n + 2]
        o, ci, kernel = w.shape[0], w.shape[1], w.shape[2 : n + 2]
        groups = options["groups"]
        if ci * groups != c:
            raise ValueError(f"{name}: input has {c} channels, weight expects {ci} x {groups}")
        space = tuple(range(2, n + 2))
        x2 = x.permute(0, n + 2, 1, n + 3, *space).reshape(2 * b, 2 * c, *spatial)
        w2 = w.permute(0, n + 3, 1, n + 2, *space).reshape(2 * o, 2 * ci, *kernel)
        y = (F.conv1d if n == 1 else F.conv2d)(x2, w2, **options)
        # contiguous: what follows (element-wise, batch norm, products) then runs on views
        y = y.reshape(b, 2, o, 2, *y.shape[2:]).permute(0, 2, *(d + 2 for d in space), 1, 3)
        y = y.contiguous()
        if bias is not None:
            fp = join_fingerprints(fp, bias.fingerprint)
            y = y + bias.entries.reshape(o, *(1,) * n, 2, 2)
        return EncryptedTensor(y, fp)

    def conv1d(
        self,
        weight: EncryptedTensor,
        bias: EncryptedTensor | None = None,
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] | str = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
    ) -> EncryptedTensor:
        """``F.conv1d`` of ``[B, C, L]`` by ``[O, C / groups, k]``."""
        return self._conv(
            weight, bias, 1, stride=stride, padding=padding, dilation=dilation, groups=groups
        )

    def conv2d(
        self,
        weight: EncryptedTensor,
        bias: EncryptedTensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
    ) -> EncryptedTensor:
        """``F.conv2d`` of ``[B, C, H, W]`` by ``[O, C / groups, kh, kw]`` (padding an int, a
        pair, ``"same"`` or ``"valid"``)."""
        return self._conv(
            weight, bias, 2, stride=stride, padding=padding, dilation=dilation, groups=groups
        )

    def _spatial(self, n: int, name: str) -> None:
        if self.ndim not in (n + 1, n + 2):
            raise ValueError(
                f"{name} expects a [B, C, *spatial] or [C, *spatial] encrypted input with "
                f"{n} spatial dims, got {tuple(self.shape)}"
            )

    def _planes(self, n: int) -> torch.Tensor:
        """The entries as ``[1, 4 * lead, *last n dims]``: a plaintext map of the last ``n``
        dims then acts on each matrix entry alike (see :meth:`_from_planes`)."""
        planes = self._entries.flatten(-2).movedim(-1, 0)
        return planes.reshape(1, -1, *self.shape[self.ndim - n :])

    def _from_planes(self, y: torch.Tensor, n: int) -> EncryptedTensor:
        lead = self.shape[: self.ndim - n]
        return self._wrap(y.reshape(4, *lead, *y.shape[2:]).movedim(0, -1).unflatten(-1, (2, 2)))

    def avg_pool2d(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> EncryptedTensor:
        """Average pooling: a plaintext linear map, applied to each matrix entry."""
        self._spatial(2, "avg_pool2d")

        kernel = _pair(kernel_size)
        steps = kernel if stride is None else _pair(stride)
        planes = _AvgPool2d.apply(self._planes(2), kernel, steps, _pair(padding))
        return self._from_planes(planes, 2)

    def adaptive_avg_pool2d(
        self, output_size: int | tuple[int | None, int | None]
    ) -> EncryptedTensor:
        self._spatial(2, "adaptive_avg_pool2d")

        return self._from_planes(_AdaptiveAvgPool2d.apply(self._planes(2), output_size), 2)

    def pad(
        self, pad: Sequence[int], mode: str = "constant", value: float = 0.0
    ) -> EncryptedTensor:
        """``F.pad`` of the last ``len(pad) // 2`` logical dims. ``"constant"`` pads with the
        key-free ``value * I``; ``"reflect"``, ``"replicate"`` and ``"circular"`` copy cells."""
        pad = tuple(pad)
        n = len(pad) // 2
        if len(pad) % 2 or not 0 < n <= self.ndim:
            raise ValueError(f"pad needs (left, right) pairs for 1 to {self.ndim} dims, got {pad}")
        planes = self._planes(n)
        if mode != "constant":
            return self._from_planes(F.pad(planes, pad, mode=mode), n)
        y = F.pad(planes, pad)
        if value:
            inner = torch.zeros(planes.shape[2:], dtype=self.dtype, device=self.device)
            border = F.pad(inner, pad, value=float(value))
            diagonal = _eye(inner).reshape(4, 1, *(1,) * n)
            y = (y.unflatten(1, (4, -1)) + diagonal * border).flatten(1, 2)
        return self._from_planes(y, n)

    def _max_windows(self, index: Sequence[torch.Tensor]) -> EncryptedTensor:
        """The channel-wise maximum of windows: ``index[i]`` (``[out_i, k_i]``) holds the
        positions along the ``i``-th of the last ``len(index)`` dims; result ``[..., *out]``.
        Cells are in row-major window order, so a tie's gradient goes to the first maximum,
        where torch's max pooling sends it."""
        n = len(index)
        lead = self.ndim - n
        x = self._entries
        for i, idx in enumerate(index):
            x = x.index_select(lead + i, idx.reshape(-1))
        outs = [int(idx.shape[0]) for idx in index]
        sizes = [int(idx.shape[1]) for idx in index]
        windows = (d for o, k in zip(outs, sizes, strict=True) for d in (o, k))
        x = x.reshape(*self.shape[:lead], *windows, 2, 2)
        order = [lead + 2 * i for i in range(n)] + [lead + 2 * i + 1 for i in range(n)]
        x = x.permute(*range(lead), *order, x.ndim - 2, x.ndim - 1)
        cells = x.reshape(*self.shape[:lead], *outs, math.prod(sizes), 2, 2)
        return self._wrap(_tree_max(cells, cells.ndim - 3).squeeze(-3))

    def _max_pool(
        self,
        n: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None,
        padding: int | Sequence[int],
        dilation: int | Sequence[int],
        ceil_mode: bool,
    ) -> EncryptedTensor:
        """Max pooling over the last ``n`` dims as torch's (which also checks the arguments).

        torch pads with ``-inf``, which has no ciphertext; a padded or overhanging cell here
        repeats its window's first valid cell instead, which neither changes the maximum nor,
        at ties, the first-maximum order of the gradient.
        """
        self._spatial(n, f"max_pool{n}d")
        size = self.shape[self.ndim - n :]
        pool = F.max_pool1d if n == 1 else F.max_pool2d
        probe = torch.empty(1, 1, *size, device="meta")
        out = pool(probe, kernel_size, stride, padding, dilation, ceil_mode).shape[2:]
        args = (kernel_size, stride or kernel_size, padding, dilation)
        k, s, p, d = (_per_dim(v, n) for v in args)
        index = [
            _window_index(size[i], out[i], k[i], s[i], p[i], d[i], self.device) for i in range(n)
        ]
        return self._max_windows(index)

    def max_pool1d(
        self,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] | None = None,
        padding: int | tuple[int] = 0,
        dilation: int | tuple[int] = 1,
        ceil_mode: bool = False,
    ) -> EncryptedTensor:
        """``F.max_pool1d`` of ``[B, C, L]``, channel-wise."""
        return self._max_pool(1, kernel_size, stride, padding, dilation, ceil_mode)

    def max_pool2d(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        ceil_mode: bool = False,
    ) -> EncryptedTensor:
        """``F.max_pool2d`` of ``[B, C, H, W]``, channel-wise."""
        return self._max_pool(2, kernel_size, stride, padding, dilation, ceil_mode)

    def adaptive_max_pool2d(
        self, output_size: int | tuple[int | None, int | None]
    ) -> EncryptedTensor:
        """``F.adaptive_max_pool2d``: torch's windows ``[floor(i H / o), ceil((i + 1) H / o))``,
        shorter ones filled up with their first cell."""
        self._spatial(2, "adaptive_max_pool2d")
        size = self.shape[-2:]
        outs = _per_dim(output_size, 2)
        index = [
            _adaptive_index(size[i], size[i] if outs[i] is None else outs[i], self.device)
            for i in range(2)
        ]
        return self._max_windows(index)

    # --- in place, for optimisers (no autograd) -------------------------------------------
    @torch.no_grad()
    def add_(self, other: EncryptedTensor, alpha: float = 1.0) -> EncryptedTensor:
        self._fingerprint = join_fingerprints(self._fingerprint, other.fingerprint)
        self._entries.add_(other.entries, alpha=alpha)
        return self

    @torch.no_grad()
    def mul_(self, scalar: float) -> EncryptedTensor:
        self._entries.mul_(scalar)
        return self

    def clone(self) -> EncryptedTensor:
        return self._wrap(self._entries.clone())
