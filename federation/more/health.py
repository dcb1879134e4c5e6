"""Shadow health: a site, holding the key, checks both channels of its model before it sends.

If the shadow network diverges, the data channel is lost too (decryption error grows like
eps * |r| * cond(S)^2, then NaN), so divergence is detected and reported, never returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from federation.more.cipher import decrypt, decrypt_shadow, leakage
from federation.more.keys import MoreKey
from federation.more.tensor import EncryptedTensor

DEFAULT_LIMIT = 1e4


class ShadowDivergenceError(RuntimeError):
    """A model's shadow (or data) channel is non-finite or exploded."""

    def __init__(self, report: HealthReport) -> None:
        super().__init__(report.describe())
        self.report = report


@dataclass(frozen=True)
class HealthReport:
    """Largest magnitude in each channel, whether each is finite, and the verdict."""

    data_max: float
    shadow_max: float
    data_finite: bool
    shadow_finite: bool
    entries_finite: bool
    limit: float
    mixing: float = 0.0
    mixing_tol: float = 1.5e-8
    shadow_ratio: float = 10.0
    """Shadows are drawn from the data's own declared ranges, so a healthy shadow channel
    stays on the data's scale; one more than ``shadow_ratio`` times larger is diverging."""

    @property
    def shadow_outgrew_data(self) -> bool:
        return self.shadow_max > self.shadow_ratio * max(1.0, self.data_max)

    @property
    def mixed(self) -> bool:
        """Off-diagonal residue of ``S^-1 C S`` beyond round-off: the channels no longer
        separate, which happens when one channel's dynamic range swamps the other's."""
        return not self.mixing <= self.mixing_tol * max(1.0, self.data_max, self.shadow_max)

    @property
    def healthy(self) -> bool:
        return (
            self.entries_finite
            and self.data_finite
            and self.shadow_finite
            and self.data_max <= self.limit
            and self.shadow_max <= self.limit
            and not self.shadow_outgrew_data
            and not self.mixed
        )

    @property
    def diverged_channel(self) -> str | None:
        """'shadow', 'data', 'both' (e.g. non-finite ciphertexts) or None when healthy."""
        if self.healthy:
            return None
        if not self.entries_finite:
            return "both"
        bad_shadow = (
            not self.shadow_finite or self.shadow_max > self.limit or self.shadow_outgrew_data
        )
        bad_data = not self.data_finite or self.data_max > self.limit
        if self.mixed and not (bad_shadow or bad_data):
            bad_shadow = self.shadow_max >= self.data_max
            bad_data = not bad_shadow
        return "both" if bad_shadow and bad_data else ("shadow" if bad_shadow else "data")

    def describe(self) -> str:
        if self.healthy:
            return (
                f"healthy: max |data| {self.data_max:.3g}, max |shadow| {self.shadow_max:.3g} "
                f"(limit {self.limit:.3g})"
            )
        return (
            f"{self.diverged_channel} channel diverged: max |data| {self.data_max:.3g}, "
            f"max |shadow| {self.shadow_max:.3g} (limit {self.limit:.3g}, channel mixing "
            f"{self.mixing:.3g}, finite ciphertexts: {self.entries_finite}); use the "
            "shadow-value policy for this data (valid labels for categorical targets, the "
            "declared range for features and regression targets)"
        )

    def raise_if_unhealthy(self) -> None:
        if not self.healthy:
            raise ShadowDivergenceError(self)


def _max_abs(t: torch.Tensor) -> tuple[float, bool]:
    finite = bool(torch.isfinite(t).all())
    return (float(t.abs().max()) if t.numel() else 0.0), finite


def check_tensors(
    tensors: Mapping[str, EncryptedTensor], key: MoreKey, *, limit: float = DEFAULT_LIMIT
) -> HealthReport:
    """Decrypt both channels of every tensor and summarise magnitudes and channel mixing.

    Mixing is judged against ``sqrt(eps)`` of the tensors' dtype (relative to the largest
    channel value): far above round-off, far below a lost channel.
    """
    data_max = shadow_max = mixing = 0.0
    data_ok = shadow_ok = entries_ok = True
    eps = 0.0
    for t in tensors.values():
        eps = max(eps, torch.finfo(t.dtype).eps)
        entries_ok &= t.all_finite()
        d, d_ok = _max_abs(decrypt(t, key).double())
        s, s_ok = _max_abs(decrypt_shadow(t, key).double())
        m, _ = _max_abs(leakage(t, key).double())
        data_max, shadow_max, mixing = max(data_max, d), max(shadow_max, s), max(mixing, m)
        data_ok &= d_ok
        shadow_ok &= s_ok
    return HealthReport(
        data_max, shadow_max, data_ok, shadow_ok, entries_ok, limit, mixing, (eps or 2e-16) ** 0.5
    )


@dataclass(frozen=True)
class LayerHealth:
    """Both channels of one layer's output on a batch."""

    index: int
    layer: str
    report: HealthReport


def trace_layers(
    model: torch.nn.Sequential, x: EncryptedTensor, key: MoreKey, *, limit: float = DEFAULT_LIMIT
) -> list[LayerHealth]:
    """Run a batch through an encrypted ``nn.Sequential`` and check each layer's output.

    After a divergence this tells where, and in which channel, values blew up: e.g. a shadow
    channel that grows in the first layer because the targets' shadows were ill-posed.
    """
    rows = []
    with torch.no_grad():
        for index, layer in enumerate(model):
            x = layer(x)
            rows.append(
                LayerHealth(
                    index, type(layer).__name__, check_tensors({"out": x}, key, limit=limit)
                )
            )
            if not rows[-1].report.healthy:
                break
    return rows


def diagnose(
    model: torch.nn.Sequential, x: EncryptedTensor, key: MoreKey, *, limit: float = DEFAULT_LIMIT
) -> str:
    """One line naming the diverged channel and the first layer where it left ``limit``."""
    params = check_tensors(
        {n: EncryptedTensor(t, x.fingerprint) for n, t in model.state_dict().items()},
        key,
        limit=limit,
    )
    if not params.healthy:
        return f"parameters: {params.describe()}"
    for row in trace_layers(model, x, key, limit=limit):
        if not row.report.healthy:
            return f"layer {row.index} ({row.layer}) output: {row.report.describe()}"
    return f"parameters and activations {params.describe()}"
