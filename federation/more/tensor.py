"""The encrypted tensor: a tensor of MORE ciphertexts that owns its algebra.

A logical tensor of shape ``[...]`` is stored as real 2x2 matrices ``[..., 2, 2]``. All
ciphertexts under one key lie in one commutative algebra isomorphic to R x R, so sums,
matrix products, inverses and analytic matrix functions act on the data and the shadow
channel independently. Nothing here holds or accepts a key: this type cannot decrypt.

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

from federation.more.analytic import ANALYTIC

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


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched 2x2 products: the element-wise ciphertext product."""
    return torch.matmul(a, b)


def _inv(c: torch.Tensor) -> torch.Tensor:
    """Batched 2x2 inverse by the adjugate (exact, differentiable, no LAPACK call)."""
    a, b = c[..., 0, 0], c[..., 0, 1]
    d_, e = c[..., 1, 0], c[..., 1, 1]
    det = a * e - b * d_
    adj = torch.stack((torch.stack((e, -b), -1), torch.stack((-d_, a), -1)), -2)
    return adj / det[..., None, None]


class _Analytic(torch.autograd.Function):
    """``f(C)`` with the algebra's chain rule: grad_C = f'(C)^T grad_Y.

    Inside the commutative algebra the Frechet derivative of ``f`` at ``C`` is multiplication
    by ``f'(C)``; every gradient that reaches here is (the transpose of) an algebra element,
    so this equals the true autograd result at the cost of one 2x2 product.
    """

    @staticmethod
    def forward(ctx: Any, entries: torch.Tensor, name: str) -> torch.Tensor:
        value, deriv = ANALYTIC[name](entries)
        ctx.save_for_backward(deriv)
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (deriv,) = ctx.saved_tensors
        return _mm(deriv.mT, grad), None


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

    def _analytic(self, name: str) -> EncryptedTensor:
        return self._wrap(_Analytic.apply(self._entries, name))

    def exp(self) -> EncryptedTensor:
        return self._analytic("exp")

    def sigmoid(self) -> EncryptedTensor:
        """``(I + tanh(C/2)) / 2``, i.e. ``inv(I + exp(-C))`` without the large ``exp``."""
        return self._analytic("sigmoid")

    def tanh(self) -> EncryptedTensor:
        return self._analytic("tanh")

    def softplus(self) -> EncryptedTensor:
        """``log(I + exp(C))`` by Newton iterations (no eigen-decomposition)."""
        return self._analytic("softplus")

    def entry_bound(self) -> float:
        """A key-free bound on the spectral norm of every block (2 x the largest entry).

        Scaling algorithms (tanh doubling, softmax squaring) size their steps with it, as
        ``torch.linalg.matrix_exp`` does with norms; it is not a comparison of plaintexts.
        """
        return 2.0 * float(self._entries.detach().abs().amax()) if self.numel() else 0.0

    def softmax(self, dim: int = -1) -> EncryptedTensor:
        """Softmax along ``dim`` by scaling and squaring, with every intermediate in (0, 1].

        ``exp`` of raw logits would be ``e^|r|`` large in a channel with large logits and its
        round-off would swamp the other channel. Instead the (mean-centred) logits are
        halved ``k`` times until ``exp`` is near ``I``, normalised, and squared back with
        ``softmax(2z) = softmax(z)^2 / sum(softmax(z)^2)``; relative round-off grows only
        like ``2^k eps``.
        """
        z = self - self.mean(dim=dim, keepdim=True)
        bound = z.entry_bound()
        if not math.isfinite(bound):
            return self._wrap(torch.full_like(self._entries, math.nan))
        k = max(0, math.ceil(math.log2(bound))) if bound > 1.0 else 0
        p = (z * (1.0 / 2**k)).exp()
        p = p * p.sum(dim=dim, keepdim=True).inverse()
        for _ in range(k):
            p = p * p
            p = p * p.sum(dim=dim, keepdim=True).inverse()
        return p

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

    def conv2d(
        self,
        weight: EncryptedTensor,
        bias: EncryptedTensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
    ) -> EncryptedTensor:
        """2-D convolution of ``[B, C, H, W]`` by ``[O, C, kh, kw]`` as one real convolution.

        The matrix rows of the input fold into the batch (2B), its columns and the weight's
        rows into the input channels (2C), the weight's columns into the outputs (2O).
        """
        fp = join_fingerprints(self._fingerprint, weight.fingerprint)
        x, w = self._entries, weight.entries
        if x.ndim != 6:
            raise ValueError(f"conv2d expects a [B, C, H, W] encrypted input, got {self.shape}")
        b, c, h, wd = x.shape[:4]
        o, ci, kh, kw = w.shape[:4]
        if ci != c:
            raise ValueError(f"conv2d: input has {c} channels, weight expects {ci}")
        x2 = x.permute(0, 4, 1, 5, 2, 3).reshape(2 * b, 2 * c, h, wd)
        w2 = w.permute(0, 5, 1, 4, 2, 3).reshape(2 * o, 2 * c, kh, kw)
        y = F.conv2d(x2, w2, stride=stride, padding=padding)
        ho, wo = y.shape[-2:]
        y = y.reshape(b, 2, o, 2, ho, wo).permute(0, 2, 4, 5, 1, 3)
        if bias is not None:
            fp = join_fingerprints(fp, bias.fingerprint)
            y = y + bias.entries[:, None, None]
        return EncryptedTensor(y, fp)

    def avg_pool2d(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> EncryptedTensor:
        """Average pooling: a plaintext linear map, applied to each matrix entry."""
        x = self._entries
        if x.ndim != 6:
            raise ValueError(f"avg_pool2d expects a [B, C, H, W] encrypted input, got {self.shape}")
        b, c, h, w = x.shape[:4]
        x2 = x.permute(0, 1, 4, 5, 2, 3).reshape(b, 4 * c, h, w)
        y = F.avg_pool2d(x2, kernel_size, stride=stride, padding=padding)
        ho, wo = y.shape[-2:]
        return self._wrap(y.reshape(b, c, 2, 2, ho, wo).permute(0, 1, 4, 5, 2, 3))

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
