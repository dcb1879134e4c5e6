"""The numbers behind secure aggregation of MORE updates (Flower's SecAgg+), without Flower.

SecAgg+ sums integers modulo ``MODULUS``. Each site sends
``round((clip(w_i p_i) + c) * Q / 2c)`` (stochastically rounded) for its update ``p_i``
weighted by ``w_i = round(n_i / max_weight * Q) / Q``; the aggregator unmasks the sum and
divides by ``sum w_i``. Two things decide whether that equals FedAvg:

- nothing may be clipped: a clipped ciphertext entry corrupts both channels of the
  plaintext it encodes, so a site refuses instead (:func:`check_quantisable`);
- the sum of ``n`` sites' integers, each in ``[0, Q]``, must stay below the modulus, and
  within that ``Q`` should be as large as possible (:func:`quantization_range`).

The result then differs from exact FedAvg by at most :func:`error_bound`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

MODULUS = 2**32
"""SecAgg+'s mask modulus (Flower documents 2**32 as its largest)."""

MAX_LEVELS = 2**30
"""Flower's stochastic rounding casts to int32: keep every level well inside it."""


def quantization_range(num_sites: int, modulus: int = MODULUS) -> int:
    """The most levels ``Q`` for which ``num_sites`` values in ``[0, Q]`` (and the sites'
    weight factors, also at most ``Q``) sum below ``modulus``."""
    if num_sites < 1:
        raise ValueError(f"secure aggregation needs at least one site, got {num_sites}")
    return min(MAX_LEVELS, (modulus - 1) // num_sites)


def weight_factor(num_examples: int, max_weight: float, levels: int) -> float:
    """The site's weight ``w_i`` exactly as SecAgg+ quantises it."""
    return round(num_examples / max_weight * levels) / levels


def check_quantisable(
    arrays: Mapping[str, np.ndarray],
    num_examples: int,
    *,
    clipping_range: float,
    max_weight: float,
    levels: int,
) -> None:
    """Refuse (ValueError) an update that SecAgg+ would clip or whose weight overflows."""
    if num_examples > max_weight:
        raise ValueError(
            f"{num_examples} training examples exceed the secure-aggregation max_weight "
            f"{max_weight:g}: raise federation.secure_aggregation.max_weight to at least "
            f"{num_examples}"
        )
    w = weight_factor(num_examples, max_weight, levels)
    if w <= 0:
        raise ValueError(
            f"{num_examples} training examples round to weight 0 at max_weight {max_weight:g}: "
            "lower federation.secure_aggregation.max_weight"
        )
    peak = max((float(np.abs(a).max()) for a in arrays.values() if a.size), default=0.0)
    if not math.isfinite(peak) or peak * w > clipping_range:
        needed = math.ceil(peak * w * 1.5) if math.isfinite(peak) else "a finite update"
        raise ValueError(
            f"the update's entries reach {peak:.4g} (weighted {peak * w:.4g}), outside the "
            f"secure-aggregation clipping range +-{clipping_range:g}; clipping would corrupt "
            f"the ciphertexts: raise federation.secure_aggregation.clipping_range to {needed}"
        )


def error_bound(
    num_examples: list[int], *, clipping_range: float, max_weight: float, levels: int, peak: float
) -> float:
    """Largest entry-wise difference between the SecAgg+ result and exact FedAvg.

    Each site's stochastic rounding is off by less than one level ``2c/Q`` and its weight by
    at most ``1/2Q``; after the division by ``W = sum w_i`` that is at most
    ``n (2c + peak) / (Q W)`` (``peak``: the largest entry of any update), plus float64
    round-off of the dequantisation.
    """
    n = len(num_examples)
    total = sum(weight_factor(k, max_weight, levels) for k in num_examples)
    quantisation = n * (2 * clipping_range + peak) / (levels * total)
    round_off = 16 * np.finfo(np.float64).eps * n * clipping_range / total
    return quantisation + round_off
